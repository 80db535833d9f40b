"""Where a checkpoint's data files really are, for tests that read, damage or replace them.

Under the write-once protocol (issue 8) each save attempt stores a logical file such as
`model.safetensors` under a name of its own (`model.3f9a1c2b7d.safetensors`), and the manifest
record of the logical name says which (`path`). Checkpoints of format 1 without `path` keep the
logical name. A test that flips, truncates or replaces "the model file" of step N must therefore
go through the manifest, as every reader does, or it damages nothing (or a file no one reads).

The rule is restated here on purpose instead of calling the library's `stored_name`: the tests
check the library against the format, not against itself.

Every function takes the run folder as a `CheckpointManager`, a `Storage` of the run folder, or a
local path / URL of it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Union

from resilient_train.checkpoint.manager import CheckpointManager
from resilient_train.checkpoint.manifest import MANIFEST, step_dir
from resilient_train.storage import Storage

RunFolder = Union[CheckpointManager, Storage, str, "os.PathLike[str]"]

# a physical name written by a save attempt: the logical name with 10 hex digits before its extension
_TOKENED = re.compile(r"^(?P<stem>.+)\.[0-9a-f]{10}(?P<ext>\.[A-Za-z0-9]+)$")


def checkpoints_of(run: RunFolder) -> Storage:
    """The `checkpoints/` folder of `run`."""
    if isinstance(run, CheckpointManager):
        return run.root
    storage = run if isinstance(run, Storage) else Storage(os.fspath(run))
    return storage.child("checkpoints")


def read_manifest(run: RunFolder, step: int) -> dict[str, Any]:
    """The manifest of `step`, parsed as plain JSON (no validation: tests also read broken ones)."""
    return json.loads(checkpoints_of(run).read_bytes(step_dir(step), MANIFEST))


def stored_name(logical: str, record: dict[str, Any]) -> str:
    """The physical basename a manifest record points at (the logical name for format-1 records)."""
    return record.get("path", logical)


def logical_name(basename: str) -> str:
    """`model.3f9a1c2b7d.safetensors` -> `model.safetensors`; other names unchanged."""
    match = _TOKENED.match(basename)
    return match.group("stem") + match.group("ext") if match else basename


def data_name(run: RunFolder, step: int, logical: str) -> str:
    """The physical basename of logical file `logical` in checkpoint `step`."""
    files = read_manifest(run, step)["files"]
    assert logical in files, f"step {step} lists no {logical}: {sorted(files)}"
    return stored_name(logical, files[logical])


def data_names(run: RunFolder, step: int) -> dict[str, str]:
    """Every logical file of checkpoint `step` and its physical basename."""
    return {name: stored_name(name, record) for name, record in read_manifest(run, step)["files"].items()}


def data_path(run: RunFolder, step: int, logical: str) -> str:
    """Path (local) or URL of the bytes of `logical` in checkpoint `step`."""
    return checkpoints_of(run).display(step_dir(step), data_name(run, step, logical))


def read_data(run: RunFolder, step: int, logical: str) -> bytes:
    return checkpoints_of(run).read_bytes(step_dir(step), data_name(run, step, logical))


def write_data(run: RunFolder, step: int, logical: str, data: bytes) -> None:
    """Replace the bytes of `logical` behind the manifest's back (truncation, bit rot, an attacker)."""
    checkpoints_of(run).write_bytes(data, step_dir(step), data_name(run, step, logical))


def flip_byte(run: RunFolder, step: int, logical: str, offset: Optional[int] = None) -> int:
    """Invert one byte of `logical` in checkpoint `step`, keeping its size; returns the offset.

    By default the byte is in the middle of the payload: for a safetensors file, in the middle of
    its first non-empty tensor (the header still parses, so only the checksum can tell).
    """
    data = bytearray(read_data(run, step, logical))
    if offset is None:
        offset = _tensor_middle(data) if logical.endswith(".safetensors") else len(data) // 2
    data[offset] ^= 0xFF
    write_data(run, step, logical, bytes(data))
    return offset


def _tensor_middle(data: bytes) -> int:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    begin, end = next(v["data_offsets"] for k, v in sorted(header.items())
                      if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0])
    return 8 + header_len + (begin + end) // 2


def folder_names(run: RunFolder, step: int) -> set[str]:
    """Every file name in the folder of checkpoint `step`."""
    return {e["basename"] for e in checkpoints_of(run).list_dir(step_dir(step)) if e.get("type") != "directory"}


def listed_names(run: RunFolder, step: int) -> set[str]:
    """What a committed checkpoint's folder should hold once debris is gone: its files and manifest."""
    return set(data_names(run, step).values()) | {MANIFEST}
