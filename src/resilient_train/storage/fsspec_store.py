"""Any other fsspec store (memory://, s3://, ...): whole-object writes, no atomic create.

Each file is uploaded once under its final name (nothing is renamed on an object store). Such
stores have no create-if-absent primitive fsspec exposes, so the commit checks the name just
before the write; the window that leaves is documented per store in docs/storage.md.
"""

from __future__ import annotations

import posixpath
from typing import Any, Mapping, Optional, Sequence, Union

from fsspec import AbstractFileSystem

from resilient_train.storage.backend import Buffer


class FsspecBackend:
    """The fallback for every protocol the registry has no row for."""

    name = "fsspec"
    atomic_create = False
    keeps_checksums = False
    local_paths = False
    trusted_writes = False
    retries_itself = False

    def __init__(self, fs: AbstractFileSystem) -> None:
        self.fs = fs

    def write(self, path: str, chunks: Sequence[Buffer]) -> None:
        self.fs.pipe_file(path, join(chunks))

    def read_buffer(self, path: str) -> bytearray:
        return bytearray(self.fs.cat_file(path))

    def create(self, path: str, data: Union[bytes, Sequence[Buffer]]) -> None:
        refuse_existing(self.fs, path)
        self.fs.pipe_file(path, data if isinstance(data, bytes) else join(data))

    def stored_checksum(self, entry: Mapping[str, Any]) -> Optional[str]:
        return None

    def url(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))


def join(chunks: Sequence[Buffer]) -> bytes:
    """One bytes object for a single upload (no copy when it already is one)."""
    first = chunks[0] if len(chunks) == 1 else None
    return first if isinstance(first, bytes) else b"".join(chunks)


def refuse_existing(fs: AbstractFileSystem, path: str) -> None:
    """FileExistsError when `path` exists, judged from a fresh look (listings may be cached)."""
    fs.invalidate_cache(posixpath.dirname(path))
    if fs.exists(path):
        raise FileExistsError(path)
