"""What a storage backend is: the per-store half of `Storage`, with its capabilities by name.

`Storage` owns what every store shares (paths as strings, retries, fresh listings, messages);
a backend owns what differs between stores: how a whole file is written, how a file is created
only if it does not exist (the commit of a checkpoint), how a file is read into a writable
buffer, where the store keeps a checksum per object, and how a path is shown as a URL. Callers
outside this package ask a capability (`storage.backend.keeps_checksums`) or a method that says
what they need (`storage.local_path(...)`), never "is it local?".
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Sequence, Union

Buffer = Union[bytes, bytearray, memoryview]


class Backend(Protocol):
    """One kind of store (local disk, GCS, any other fsspec store); see `registry.BACKENDS`."""

    name: str
    # Creating a file only if it does not exist is one atomic step of the store (a hard link or
    # O_EXCL on local disk, `ifGenerationMatch=0` on GCS), not a check followed by a write.
    atomic_create: bool
    # The store keeps a checksum per object that we can compare with a manifest's crc32c
    # without reading the bytes (GCS lists one per object).
    keeps_checksums: bool
    # Paths are OS paths: `open`, `os.replace`, `os.path.islink` and appends work on them.
    local_paths: bool
    # A write that returned holds exactly the bytes given: written through the OS from our own
    # buffers and fsynced, so a save just written needs no read-back before older ones are pruned.
    trusted_writes: bool
    # The client retries transient failures itself (gcsfs: 5xx, 429, dropped connections, with
    # backoff up to ~30 s): retrying its retries again multiplied the wait for an unreachable
    # bucket to minutes before the one-line error.
    retries_itself: bool

    def write(self, path: str, chunks: Sequence[Buffer]) -> None:
        """Write a whole file so readers see all of it or none of it."""

    def read_buffer(self, path: str) -> bytearray:
        """A file's contents as a writable buffer."""

    def create(self, path: str, data: Union[bytes, Sequence[Buffer]]) -> None:
        """Write `data` (bytes, or chunks in order) to `path` only if it does not exist; FileExistsError when it does."""

    def stored_checksum(self, entry: Mapping[str, Any]) -> Optional[str]:
        """The store's crc32c (8 hex digits) in a listing or info entry; None where it keeps none."""

    def url(self, path: str) -> str:
        """The URL a user would type for an absolute path of this store."""
