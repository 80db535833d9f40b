"""pytest plugin: a real GCS JSON API server (`gcp-storage-emulator`) on loopback for `gs://` tests.

Loaded through `pytest_plugins = ["gcs_emulator"]` in conftest.py, which also sets
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` before gcsfs is imported (design guide, section 5).

`gcs_emulator` (session) starts the server once, points `STORAGE_EMULATOR_HOST` at it (inherited by
subprocesses, so the real CLI talks to it too; gcsfs then connects anonymously) and creates a
bucket. `gcs_url` (function) gives each test its own `gs://<bucket>/<uuid>` prefix.

gcsfs reads `STORAGE_EMULATOR_HOST` on every request (`GCSFileSystem._location` is a property
calling `gcsfs.core._location()`), but it picks its credentials once, in the constructor, and
fsspec caches instances: one made before the variable was set would keep whatever credentials it
found. The instance cache is therefore cleared when the variable is set and again when it is
restored.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "rt-test"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class GcsEmulator:
    host: str  # "http://127.0.0.1:PORT", the value of STORAGE_EMULATOR_HOST
    bucket: str
    port: int

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host: str) -> bool:
    try:
        with urllib.request.urlopen(f"{host}/storage/v1/b", timeout=1) as response:
            response.read()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


def _clear_gcsfs_cache() -> None:
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
    # `gcsfs.GCSFileSystem` may be the experimental subclass; clear the core class too
    from gcsfs.core import GCSFileSystem as CoreGCSFileSystem

    CoreGCSFileSystem.clear_instance_cache()


def _log_tail(log_path: Path) -> str:
    try:
        return log_path.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """A `gcp-storage-emulator` on 127.0.0.1 with bucket `rt-test`, for the whole session."""
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    if not exe.exists():
        pytest.fail(f"gcs emulator: {exe} not found; install the `gcp-storage-emulator` package")
    port = _free_port()
    host = f"http://127.0.0.1:{port}"
    log_fd, log_name = tempfile.mkstemp(prefix="gcs-emulator-", suffix=".log")
    log_path = Path(log_name)
    proc = subprocess.Popen(
        [str(exe), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
        stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
    )
    os.close(log_fd)
    old_host: str | None = os.environ.get("STORAGE_EMULATOR_HOST")

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(host):
            if proc.poll() is not None:
                pytest.fail(
                    f"gcs emulator exited with code {proc.returncode} before answering on {host}:\n"
                    f"{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"gcs emulator did not answer on {host} within {START_TIMEOUT_S:.0f}s:\n"
                    f"{_log_tail(log_path)}"
                )
            time.sleep(0.05)

        os.environ["STORAGE_EMULATOR_HOST"] = host
        _clear_gcsfs_cache()
        import gcsfs

        fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
        try:
            fs.mkdir(BUCKET)
        except Exception as exc:  # noqa: BLE001 - turned into a clear failure
            pytest.fail(f"gcs emulator on {host}: cannot create bucket {BUCKET!r}: {exc!r}\n{_log_tail(log_path)}")

        yield GcsEmulator(host=host, bucket=BUCKET, port=port)
    finally:
        stop()
        if old_host is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old_host
        try:
            _clear_gcsfs_cache()
        except ImportError:  # pragma: no cover
            pass
        log_path.unlink(missing_ok=True)


@pytest.fixture
def gcs_url(gcs_emulator: GcsEmulator) -> str:
    """A fresh `gs://rt-test/<uuid>` prefix for one test (nothing there yet)."""
    return gcs_emulator.url(uuid.uuid4().hex)
