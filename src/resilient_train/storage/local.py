"""Local disk (and mounts that look like it, such as the Colab Drive FUSE mount).

Whole-file writes go to a temporary file in the same folder, fsynced, `os.replace`d over the
final name, then the folder is fsynced: a reader sees the old file or the new one, never half of
one. The commit is an exclusive create: an fsynced temporary file hard-linked to the final name
(which fails atomically when the name exists), or `O_EXCL` where a mount refuses hard links.
"""

from __future__ import annotations

import errno
import os
import uuid
from typing import Any, Mapping, Optional, Sequence, Union

from fsspec import AbstractFileSystem

from resilient_train.storage.backend import Buffer

# errno values of a mount that cannot hard-link: fall back to O_EXCL creation
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EACCES)


class LocalBackend:
    """fsspec's LocalFileSystem: paths are OS paths, so the OS gives us atomic renames and links."""

    name = "local"
    atomic_create = True
    keeps_checksums = False
    local_paths = True
    trusted_writes = True
    retries_itself = False

    def __init__(self, fs: AbstractFileSystem) -> None:
        self.fs = fs

    def write(self, path: str, chunks: Sequence[Buffer]) -> None:
        """Chunks are written in order without joining them first (saves a copy of large tensors)."""
        _write_local(path, chunks)

    def read_buffer(self, path: str) -> bytearray:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buffer = bytearray(size)
            view, done = memoryview(buffer), 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(errno.EIO, f"{path} shrank while being read")
                done += n
            return buffer

    def create(self, path: str, data: Union[bytes, Sequence[Buffer]]) -> None:
        _create_local(path, [data] if isinstance(data, bytes) else data)

    def stored_checksum(self, entry: Mapping[str, Any]) -> Optional[str]:
        return None

    def url(self, path: str) -> str:
        return path


def _temp_name(path: str) -> str:
    """A temporary name in the same folder (`.name.<8 hex>.tmp`, which garbage collection knows)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")


def _write_fsynced(path: str, chunks: Sequence[Buffer], flags: str = "wb") -> None:
    """Write the chunks in order and fsync before returning."""
    with open(path, flags) as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _write_local(path: str, chunks: Sequence[Buffer]) -> None:
    """Temp file in the same folder, fsync, `os.replace`, fsync the folder."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(path)
    try:
        _write_fsynced(tmp, chunks)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


def _create_local(path: str, chunks: Sequence[Buffer]) -> None:
    """Exclusive create with complete contents: fsynced temp file, then `os.link` to the name."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _temp_name(path)
    try:
        _write_fsynced(tmp, chunks)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:  # a mount without hard links: exclusive create, then fill it
            if exc.errno not in _NO_LINKS:
                raise
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))  # the name is ours now
            _write_fsynced(path, chunks, "r+b")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make a rename durable; some filesystems (FUSE mounts, Windows) cannot, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
