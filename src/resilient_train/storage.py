"""The fsspec seam: one run folder on local disk, a Drive mount, `gs://`, `memory://` or `s3://`.

Paths stay strings end to end (`pathlib` turns `gs://b` into `gs:/b`). Listings are always fresh:
gcsfs caches directory listings, and a stale listing is how a resume picks an old checkpoint.
Nothing is ever renamed on an object store; on a local filesystem (which includes the Colab Drive
mount) a file is written to a temporary name in the same folder, fsynced and `os.replace`d, so a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class Storage:
    """A root URL and the filesystem that serves it; every path is relative to the root."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url.rstrip("/") or url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/") or root
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Absolute filesystem path of `parts` under the root."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def display(self, *parts: str) -> str:
        """The URL a user would type for `parts` (for messages)."""
        return posixpath.join(self.url, *parts) if parts else self.url

    def child(self, *parts: str) -> "Storage":
        """A Storage rooted at a sub-folder, sharing this filesystem instance."""
        sub = Storage.__new__(Storage)
        sub.url, sub.fs, sub.is_local = self.display(*parts), self.fs, self.is_local
        sub.root = self.path(*parts)
        return sub

    # -- reads ---------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        path = self.path(*parts)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def list_dir(self, *parts: str) -> list[dict]:
        """Fresh listing of a folder as fsspec detail dicts with `basename` added; [] if absent."""
        path = self.path(*parts)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            entry["basename"] = posixpath.basename(entry["name"].rstrip("/"))
        return [e for e in entries if e["name"].rstrip("/") != path.rstrip("/")]

    # -- writes --------------------------------------------------------------------------------
    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a whole file so readers see all of it or none of it (see module docstring)."""
        path = self.path(*parts)
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _fsync_dir(folder)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode("utf-8"), *parts)

    def remove(self, *parts: str, recursive: bool = False) -> None:
        path = self.path(*parts)
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(posixpath.dirname(path))


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
