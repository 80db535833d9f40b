"""Which backend serves a filesystem: one row per protocol, anything else is a plain fsspec store.

A new backend (S3 with conditional PUT, Azure) is one new module plus its row here.
"""

from __future__ import annotations

from typing import Callable

from fsspec import AbstractFileSystem

from resilient_train.storage.backend import Backend
from resilient_train.storage.fsspec_store import FsspecBackend
from resilient_train.storage.gcs import GcsBackend
from resilient_train.storage.local import LocalBackend

BACKENDS: dict[str, Callable[[AbstractFileSystem], Backend]] = {
    "file": LocalBackend,
    "local": LocalBackend,
    "gs": GcsBackend,
    "gcs": GcsBackend,
}


def backend_for(fs: AbstractFileSystem) -> Backend:
    """The backend of the first of `fs`'s protocols that has a row; the fsspec fallback otherwise."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    for protocol in protocols:
        make = BACKENDS.get(protocol)
        if make is not None:
            return make(fs)
    return FsspecBackend(fs)
