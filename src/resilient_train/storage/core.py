"""`Storage`: one run folder on local disk, a Drive mount, `gs://`, `memory://` or `s3://`.

Paths stay strings end to end (`pathlib` turns `gs://b` into `gs:/b`). Listings are always fresh:
gcsfs caches directory listings, and a stale listing is how a resume picks an old checkpoint.
Every call is retried on transient errors. What differs between stores (whole-file writes, the
exclusive create that commits a checkpoint, checksums the store keeps) is the backend's
(`storage.backend`, chosen by protocol in `registry.py`).
"""

from __future__ import annotations

import posixpath
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

import fsspec

from resilient_train.errors import UsageError
from resilient_train.storage.backend import Backend, Buffer
from resilient_train.storage.registry import backend_for
from resilient_train.storage.retry import with_retries

T = TypeVar("T")


class Storage:
    """A root URL and the filesystem that serves it; every path is relative to the root."""

    retry_attempts = 5
    retry_base_delay = 0.2

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url.rstrip("/") or url
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        except ImportError as exc:  # e.g. s3:// without s3fs
            raise UsageError(f"cannot open '{url}': {exc}") from None
        except ValueError as exc:  # unknown protocol
            raise UsageError(f"cannot open '{url}': {exc}; use a local path, gs://, s3:// or memory://") from None
        self.root = root.rstrip("/") or root
        self.backend: Backend = backend_for(self.fs)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Absolute filesystem path of `parts` under the root."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def local_path(self, *parts: str) -> Optional[str]:
        """The OS path of `parts` where the store's paths are OS paths (local disk, Drive), else None.

        For callers that need the OS itself (appending to a file, copying without reading it into
        memory, refusing symlinks); everything else goes through the methods below.
        """
        return self.path(*parts) if self.backend.local_paths else None

    def display(self, *parts: str) -> str:
        """The URL a user would type for `parts` (for messages)."""
        return posixpath.join(self.url, *parts) if parts else self.url

    def url_of(self, path: str) -> str:
        """The URL a user would type for an absolute path of this store, under the root or not."""
        return self.backend.url(path)

    def child(self, *parts: str) -> "Storage":
        """A Storage rooted at a sub-folder, sharing this filesystem and backend instance."""
        sub = Storage.__new__(Storage)
        sub.url, sub.fs, sub.backend = self.display(*parts), self.fs, self.backend
        sub.retry_attempts, sub.retry_base_delay = self.retry_attempts, self.retry_base_delay
        sub.root = self.path(*parts)
        return sub

    def _fresh(self, path: str) -> str:
        """Drop cached listings of `path` and its folder: another process may have changed them."""
        self.fs.invalidate_cache(path)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return path

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        attempts = 1 if self.backend.retries_itself else self.retry_attempts
        return with_retries(fn, what, attempts, self.retry_base_delay)

    # -- reads ---------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        path = self._fresh(self.path(*parts))
        return self._retry(lambda: self.fs.exists(path), f"checking {path}")

    def read_bytes(self, *parts: str) -> bytes:
        path = self.path(*parts)
        return self._retry(lambda: self.fs.cat_file(path), f"reading {path}")

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def read_buffer(self, *parts: str) -> bytearray:
        """A file's contents as a writable buffer (tensors can view it without another copy)."""
        path = self.path(*parts)
        return self._retry(lambda: self.backend.read_buffer(path), f"reading {path}")

    def list_dir(self, *parts: str) -> list[dict]:
        """Fresh listing of a folder as fsspec detail dicts with `basename` added; [] if absent."""
        path = self._fresh(self.path(*parts))
        try:
            entries = self._retry(lambda: self.fs.ls(path, detail=True), f"listing {path}")
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            entry["basename"] = posixpath.basename(entry["name"].rstrip("/"))
        return [e for e in entries if e["name"].rstrip("/") != path.rstrip("/")]

    def walk(self, *parts: str) -> dict[str, dict]:
        """Every file under a folder in one fresh listing: {relative path: fsspec detail dict}.

        One recursive listing (one request on an object store) instead of a listing per folder;
        empty folders appear with `type` "directory". Symlinks are reported as such (`islink`),
        never followed into.
        """
        path = self._fresh(self.path(*parts))
        self.fs.invalidate_cache(path)
        try:
            found = self._retry(lambda: self.fs.find(path, withdirs=True, detail=True), f"listing {path}")
        except (FileNotFoundError, NotADirectoryError):
            return {}
        base = path.rstrip("/") + "/"
        out = {}
        for name, entry in found.items():
            name = name.rstrip("/")
            if not name.startswith(base):
                continue
            out[name[len(base):]] = entry
        return out

    # -- checksums the store keeps -------------------------------------------------------------
    def stored_checksum(self, entry: Mapping[str, Any]) -> Optional[str]:
        """The crc32c (hex) the store keeps for the file of a `list_dir`/`walk` entry; None where
        it keeps none. Free: it reads the entry, not the store."""
        return self.backend.stored_checksum(entry)

    def checksum_from_store(self, *parts: str) -> Optional[str]:
        """The crc32c (hex) the object store itself keeps for a file, where it keeps one (GCS)."""
        if not self.backend.keeps_checksums:
            return None
        path = self._fresh(self.path(*parts))
        info = self._retry(lambda: self.fs.info(path), f"stat {path}")
        return self.backend.stored_checksum(info)

    # -- writes --------------------------------------------------------------------------------
    def makedirs(self, *parts: str) -> None:
        path = self.path(*parts)
        self._retry(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {path}")

    def write_bytes(self, data: Union[bytes, Sequence[Buffer]], *parts: str) -> None:
        """Write a whole file so readers see all of it or none of it (the backend says how).

        `data` is bytes or a sequence of buffers (chunks written in order without joining them
        first on local disk, which saves a copy of large tensor files).
        """
        path = self.path(*parts)
        chunks: Sequence[Buffer] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        self._retry(lambda: self.backend.write(path, chunks), f"writing {path}")

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode("utf-8"), *parts)

    def create_exclusive(self, data: bytes, *parts: str) -> None:
        """Write a small file only if it does not exist yet: the commit of a checkpoint.

        Raises FileExistsError when the file exists (another writer committed first). Local disk
        and mounts (Drive): a temporary file is fsynced and hard-linked to the final name, which
        fails atomically when the name exists; where links are refused, `O_EXCL` creation. GCS: an
        upload with the precondition `ifGenerationMatch=0` (gcsfs `mode="create"`). Other stores
        (memory://, s3://) have no such primitive: the name is checked just before the write
        (`backend.atomic_create` says which). A retried request whose first attempt did land
        finds its own bytes and counts as done.
        """
        path = self.path(*parts)

        def create() -> None:
            try:
                self.backend.create(path, data)
            except FileExistsError:
                if self._retry(lambda: self.fs.cat_file(path), f"reading {path}") == data:
                    return  # our own earlier attempt landed before its answer was lost
                raise

        self._retry(create, f"creating {path}")
        self.fs.invalidate_cache(posixpath.dirname(path))

    def create_new(self, data: Union[bytes, Sequence[Buffer]], *parts: str) -> bool:
        """Create a file only if it does not exist; False when it does (nothing is written then).

        For content-named files (checkpoint/shared.py): a name that exists was made from the same
        content, so the caller checks its size and checksum instead of reading it back. Exclusive
        the same way as `create_exclusive`.
        """
        path = self.path(*parts)

        def create() -> bool:
            try:
                self.backend.create(path, data)
            except FileExistsError:
                return False
            return True

        created = self._retry(create, f"creating {path}")
        self.fs.invalidate_cache(posixpath.dirname(path))
        return created

    def remove(self, *parts: str, recursive: bool = False) -> None:
        path = self.path(*parts)

        def rm() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._retry(rm, f"removing {path}")
        self.fs.invalidate_cache(posixpath.dirname(path))
