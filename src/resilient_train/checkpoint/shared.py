"""Tensors stored once per run: content-named files in `checkpoints/shared/`, referenced by manifests.

Fine-tuning leaves most weights untouched (a frozen base under a LoRA adapter, a frozen backbone),
so writing the whole model at every save costs the base again and again. The tensors that did not
change since the last save go into shared files instead, each named by its content (32 hex digits
derived from its bytes, see checkpoint/frozen.py), written once with an exclusive create and never
written again; every manifest that needs one lists it in its `shared` section with size and
checksum. The rules that keep this as safe as the rest of the protocol:

- A name is only ever created, never overwritten: a writer that finds the name taken checks the
  file's size (and the store's own crc32c where it keeps one) and uses it, or, when the file there
  is damaged, stores those tensors in the step folder instead.
- A checkpoint is committed only when every shared file it lists exists with the listed size, and
  valid when their checksums match: the same rule as for its own files.
- A shared file is deleted only when no manifest in the run references it (garbage collection,
  after a commit or at session start, by the writer holding the lease).
- `cp -r`, `sync` and the mirror carry `shared/` along, so a copied run folder is complete.

This module imports no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from resilient_train.checkpoint.manifest import SHARED_NAME, Buffer, check_file
from resilient_train.errors import CheckpointError
from resilient_train.storage import Storage

log = logging.getLogger("resilient_train.checkpoint.manager")

SHARED_DIR = "shared"
_PREFIX = "shared/"  # the logical name a shared file's record travels under among a save's records


def logical(name: str) -> str:
    return _PREFIX + name


def shared_name(logical_name: str) -> Optional[str]:
    """The shared file a logical name stands for, or None for a file of the step folder."""
    return logical_name[len(_PREFIX):] if logical_name.startswith(_PREFIX) else None


@dataclass(frozen=True)
class Placed:
    """A shared file a save references: written by it (`written` bytes) or found intact (0)."""

    name: str
    record: dict[str, Any]
    written: int = 0


class SharedFiles:
    """The `shared/` folder of a run's `checkpoints/`."""

    def __init__(self, root: Storage) -> None:
        self.root = root  # the checkpoints/ folder

    def listing(self) -> dict[str, dict]:
        """Every shared file, by name, from one fresh listing (empty when the folder does not exist)."""
        try:
            entries = self.root.list_dir(SHARED_DIR)
        except FileNotFoundError:
            return {}
        return {e["basename"]: e for e in entries if e.get("type") != "directory"}

    def place(self, name: str, chunks: Sequence[Buffer], record: dict[str, Any], listing: dict[str, dict]) -> Optional[Placed]:
        """Store one shared file unless an intact copy is there; None when a damaged file holds the name."""
        if name not in listing:
            size = sum(len(c) for c in chunks)
            self.root.makedirs(SHARED_DIR)
            if self.root.create_new(list(chunks), SHARED_DIR, name):  # zero-copy on local disk
                listing[name] = {"basename": name, "size": size}
                return Placed(name, record, size)
            listing.update(self.listing())  # another writer made it meanwhile: look at theirs
        problem = self.mismatch(name, record, listing.get(name, {}))
        if problem is None:
            return Placed(name, record)
        log.warning("shared file %s is damaged (%s); the tensors it would hold go into the checkpoint itself",
                    self.root.display(SHARED_DIR, name), problem)
        return None

    def mismatch(self, name: str, record: dict[str, Any], entry: dict) -> Optional[str]:
        """Why a listed shared file does not match `record` (size, store crc32c), or None; reads nothing."""
        if not entry:
            return "missing"
        size = entry.get("size")
        if size != record.get("bytes"):
            return f"{size} bytes, expected {record.get('bytes')}"
        stored = self.root.stored_checksum(entry)
        if stored is not None and "crc32c" in record and stored != record["crc32c"]:
            return f"store crc32c {stored}, expected {record['crc32c']}"
        return None

    def read(self, name: str, record: dict[str, Any]) -> bytearray:
        """A shared file's bytes, checked against its record (CheckpointError naming the file)."""
        where = self.root.display(SHARED_DIR, name)
        try:
            data = self.root.read_buffer(SHARED_DIR, name)
        except FileNotFoundError:
            raise CheckpointError(f"shared file {where} is missing") from None
        problem = check_file(name, data, record)
        if problem:
            raise CheckpointError(f"shared file {where} is damaged: {problem}")
        return data

    def garbage(self, manifests: Iterable[Optional[dict[str, Any]]], listing: dict[str, dict]) -> list[str]:
        """Shared files (names we write) that no manifest references."""
        referenced: set[str] = set()
        for manifest in manifests:
            if manifest is not None:
                referenced.update(manifest.get("shared", {}))
        return sorted(name for name in listing if SHARED_NAME.fullmatch(name) and name not in referenced)

    def remove(self, name: str) -> None:
        self.root.remove(SHARED_DIR, name)
