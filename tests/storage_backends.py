"""pytest plugin: the one parametrised storage fixture every backend-behaviour test shares.

Loaded through `pytest_plugins` in conftest.py. A test that asks for `backend`, `storage_url` or
`storage` runs once per backend: local disk, `memory://` and `gs://` on the session's GCS
emulator (gcs_emulator.py), like fsspec's shared behaviour suite. A module that covers fewer
backends says which with `pytestmark = pytest.mark.backends("local", "memory")`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest

from resilient_train.storage import Storage

BACKENDS = ("local", "memory", "gcs")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): run the storage fixtures only on these backends")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise `backend` by the closest `backends` marker (every backend without one)."""
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = marker.args if marker else BACKENDS
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown storage backends {sorted(unknown)}; known: {BACKENDS}")
    metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The backend's name: "local", "memory" or "gcs"."""
    return request.param


@pytest.fixture
def storage_url(backend: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty root URL on one backend, unique to this test (memory:// is emptied afterwards)."""
    if backend == "local":
        yield str(request.getfixturevalue("tmp_path") / "run")
    elif backend == "memory":
        url = f"memory://rt-{uuid.uuid4().hex}"
        yield url
        fs, root = fsspec.core.url_to_fs(url)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        yield request.getfixturevalue("gcs_url")


@pytest.fixture
def storage(storage_url: str) -> Storage:
    """A `Storage` on `storage_url`."""
    return Storage(storage_url)
