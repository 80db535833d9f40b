"""Copying checkpoints and run files between storages, verifying what arrives.

Used by the background mirror and by `sync`. A checkpoint is copied file by file, each file is
verified at the destination (against the store's own crc32c where it keeps one, else by reading
it back), and the manifest is written last, so an interrupted copy is an incomplete checkpoint at
the destination, never a corrupt "valid" one.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from resilient_train.checkpoint.manager import COMMITTED, CheckpointInfo, CheckpointManager
from resilient_train.checkpoint.manifest import MANIFEST, check_file, step_dir
from resilient_train.errors import CheckpointError
from resilient_train.storage import Storage

log = logging.getLogger(__name__)

RUN_FILES = ("run.yaml", "sessions.json")
RUN_FOLDERS = ("task", "logs")


def verify_remote_file(storage: Storage, folder: str, name: str, record: dict, data: Optional[bytes] = None) -> Optional[str]:
    """Why the stored file differs from its manifest record, or None when it matches."""
    stored = storage.checksum_from_store(folder, name)
    if stored is not None and "crc32c" in record:
        return None if stored == record["crc32c"] else f"{name}: store crc32c {stored}, manifest says {record['crc32c']}"
    return check_file(name, storage.read_bytes(folder, name) if data is None else data, record)


def same_checkpoint(a: CheckpointInfo, b: CheckpointInfo) -> bool:
    return a.status == b.status == COMMITTED and a.manifest is not None and b.manifest is not None and a.manifest["files"] == b.manifest["files"]


def copy_checkpoint(src: CheckpointManager, dst: CheckpointManager, info: CheckpointInfo, on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Copy one committed checkpoint; returns the bytes copied. Raises CheckpointError on a bad copy."""
    if info.manifest is None:
        raise CheckpointError(f"{info.path} is not committed")
    folder = step_dir(info.step)
    dst.prepare(info.step)
    dst.root.makedirs(folder)
    total = 0
    for name, record in info.manifest["files"].items():
        data = src.root.read_bytes(folder, name)
        problem = check_file(name, data, record)
        if problem:
            raise CheckpointError(f"source {info.path} is corrupt: {problem}")
        dst.root.write_bytes(data, folder, name)
        problem = verify_remote_file(dst.root, folder, name, record)
        if problem:
            raise CheckpointError(f"copy to {dst.root.display(folder)} did not verify: {problem}")
        total += len(data)
        on_bytes(len(data))
    dst.root.write_bytes(src.root.read_bytes(folder, MANIFEST), folder, MANIFEST)
    return total


def copy_run_files(src: Storage, dst: Storage) -> int:
    """run.yaml, sessions.json, the task snapshot and logs; returns the number of files copied."""
    count = 0
    for name in RUN_FILES:
        if src.exists(name):
            dst.write_bytes(src.read_bytes(name), name)
            count += 1
    for folder in RUN_FOLDERS:
        count += _copy_tree(src, dst, folder)
    return count


def _copy_tree(src: Storage, dst: Storage, folder: str) -> int:
    count = 0
    for entry in src.list_dir(folder):
        rel = f"{folder}/{entry['basename']}"
        if entry.get("type") == "directory":
            count += _copy_tree(src, dst, rel)
        else:
            dst.write_bytes(src.read_bytes(*rel.split("/")), *rel.split("/"))
            count += 1
    return count


__all__ = ["copy_checkpoint", "copy_run_files", "same_checkpoint", "verify_remote_file"]
