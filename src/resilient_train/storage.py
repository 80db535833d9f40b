"""The fsspec seam: one run folder on local disk, a Drive mount, `gs://`, `memory://` or `s3://`.

Paths stay strings end to end (`pathlib` turns `gs://b` into `gs:/b`). Listings are always fresh:
gcsfs caches directory listings, and a stale listing is how a resume picks an old checkpoint.
Nothing is ever renamed on an object store; on a local filesystem (which includes the Colab Drive
mount) a file is written to a temporary name in the same folder, fsynced and `os.replace`d, so a
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import posixpath
import random
import time
import uuid
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from resilient_train.errors import UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")
Buffer = Union[bytes, bytearray, memoryview]

# errno values a flaky mount or network produces and that a retry can cure: EIO and ENOTCONN
# ("Transport endpoint is not connected") from the Colab Drive FUSE client, resets and timeouts.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EAGAIN, errno.EPIPE})
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})


def is_transient(exc: BaseException) -> bool:
    """Whether an error from a storage call is worth retrying (by type and code, never by text)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    code = getattr(exc, "code", None) or getattr(exc, "status", None)
    if isinstance(code, int) and code in TRANSIENT_HTTP:
        return True
    try:  # aiohttp (used by gcsfs) raises its own connection errors
        import aiohttp

        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def with_retries(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call `fn`, retrying transient storage errors with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


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
        sub.retry_attempts, sub.retry_base_delay = self.retry_attempts, self.retry_base_delay
        sub.root = self.path(*parts)
        return sub

    def _fresh(self, path: str) -> str:
        """Drop cached listings of `path` and its folder: another process may have changed them."""
        self.fs.invalidate_cache(path)
        self.fs.invalidate_cache(posixpath.dirname(path))
        return path

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what, self.retry_attempts, self.retry_base_delay)

    # -- reads ---------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        path = self._fresh(self.path(*parts))
        return self._retry(lambda: self.fs.exists(path), f"checking {path}")

    def read_bytes(self, *parts: str) -> bytes:
        path = self.path(*parts)
        return self._retry(lambda: self.fs.cat_file(path), f"reading {path}")

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

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

    # -- writes --------------------------------------------------------------------------------
    def makedirs(self, *parts: str) -> None:
        path = self.path(*parts)
        self._retry(lambda: self.fs.makedirs(path, exist_ok=True), f"creating {path}")

    def write_bytes(self, data: Union[bytes, Sequence[Buffer]], *parts: str) -> None:
        """Write a whole file so readers see all of it or none of it (see module docstring).

        `data` is bytes or a sequence of buffers (chunks written in order without joining them
        first on local disk, which saves a copy of large tensor files).
        """
        path = self.path(*parts)
        chunks: Sequence[Buffer] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        if self.is_local:
            self._retry(lambda: _write_local(path, chunks), f"writing {path}")
        else:
            joined = chunks[0] if len(chunks) == 1 and isinstance(chunks[0], bytes) else b"".join(chunks)
            self._retry(lambda: self.fs.pipe_file(path, joined), f"writing {path}")

    def read_buffer(self, *parts: str) -> bytearray:
        """A file's contents as a writable buffer (tensors can view it without another copy)."""
        path = self.path(*parts)
        if not self.is_local:
            return bytearray(self.read_bytes(*parts))

        def read() -> bytearray:
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

        return self._retry(read, f"reading {path}")

    def checksum_from_store(self, *parts: str) -> Optional[str]:
        """The crc32c (hex) the object store itself keeps for a file, where it keeps one (GCS)."""
        if self.is_local:
            return None
        path = self._fresh(self.path(*parts))
        info = self._retry(lambda: self.fs.info(path), f"stat {path}")
        value = info.get("crc32c")
        if not isinstance(value, str):
            return None
        try:
            return base64.b64decode(value).hex()
        except ValueError:
            return None

    def create_exclusive(self, data: bytes, *parts: str) -> None:
        """Write a small file only if it does not exist yet: the commit of a checkpoint.

        Raises FileExistsError when the file exists (another writer committed first). Local disk
        and mounts (Drive): a temporary file is fsynced and hard-linked to the final name, which
        fails atomically when the name exists; where links are refused, `O_EXCL` creation. GCS: an
        upload with the precondition `ifGenerationMatch=0` (gcsfs `mode="create"`). Other stores
        (memory://, s3://) have no such primitive: the name is checked just before the write.
        A retried request whose first attempt did land finds its own bytes and counts as done.
        """
        path = self.path(*parts)

        def create() -> None:
            try:
                if self.is_local:
                    _create_local(path, data)
                elif _is_gcs(self.fs):
                    self.fs.invalidate_cache(posixpath.dirname(path))
                    if self.fs.exists(path):  # the emulator ignores preconditions; GCS does not
                        raise FileExistsError(path)
                    self.fs.pipe_file(path, data, mode="create")
                else:
                    self.fs.invalidate_cache(posixpath.dirname(path))
                    if self.fs.exists(path):
                        raise FileExistsError(path)
                    self.fs.pipe_file(path, data)
            except FileExistsError:
                if self._retry(lambda: self.fs.cat_file(path), f"reading {path}") == data:
                    return  # our own earlier attempt landed before its answer was lost
                raise

        self._retry(create, f"creating {path}")
        self.fs.invalidate_cache(posixpath.dirname(path))

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode("utf-8"), *parts)

    def remove(self, *parts: str, recursive: bool = False) -> None:
        path = self.path(*parts)

        def rm() -> None:
            try:
                self.fs.rm(path, recursive=recursive)
            except FileNotFoundError:
                pass

        self._retry(rm, f"removing {path}")
        self.fs.invalidate_cache(posixpath.dirname(path))


def _write_local(path: str, chunks: Sequence[Buffer]) -> None:
    """Temp file in the same folder, fsync, `os.replace`, fsync the folder."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


def _create_local(path: str, data: bytes) -> None:
    """Exclusive create with complete contents: fsynced temp file, then `os.link` to the name."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:  # a mount without hard links: exclusive create, then fill it
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EACCES):
                raise
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(folder)


def _is_gcs(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "gs" in protocol or "gcs" in protocol


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
