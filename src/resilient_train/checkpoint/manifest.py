"""The manifest: the commit marker of a checkpoint, and the checksums that make it verifiable.

A checkpoint exists only once `manifest.json` exists and every file it lists has the listed size;
it is valid when the checksums match too. crc32c is what GCS itself keeps per object and
google-crc32c computes it at memory speed; sha256 is the portable fallback.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Optional, Union

from resilient_train.checkpoint.jsonio import describe, dumps_json, loads_json
from resilient_train.errors import CheckpointError

Buffer = Union[bytes, bytearray, memoryview]
_BOUNCE = 1 << 20

FORMAT_NAME = "resilient_train.checkpoint"
# 2: data files carry their save attempt's token (`path` in each file record); write-once commit.
# 3: tensors that did not change are stored once per run in `checkpoints/shared/` under
#    content-derived names, listed in the manifest's `shared` section (see shared.py).
# Versions 1 and 2 (no `shared`; version 1 files under their logical names) are still read.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20  # a record is ~120 bytes: room for a hundred thousand ranks
_MAX_MANIFEST_DEPTH = 16  # what we write nests 4 deep
_STEP_DIR = re.compile(r"^step-(\d{9})$")
# a file name inside a step folder: a plain basename, no separators, no `..`, no leading dot
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
# a shared file: 32 hex digits derived from its content (shared.py)
SHARED_NAME = re.compile(r"[0-9a-f]{32}\.safetensors")
_HEX = {"crc32c": re.compile(r"[0-9a-f]{8}"), "sha256": re.compile(r"[0-9a-f]{64}")}

try:
    import google_crc32c
except ImportError:  # pragma: no cover - google-crc32c is a dependency; keep working without it
    google_crc32c = None  # type: ignore[assignment]  # callers check for None


class FormatTooNewError(CheckpointError):
    """Written by a newer resilient_train: resuming from an older checkpoint instead would lose work."""


def step_dir(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> Optional[int]:
    """The step of a folder we write (`step-000001200`), or None for anything else."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def crc32c_hex(chunks: Iterable[Buffer]) -> str:
    """crc32c of buffers in order; google-crc32c takes only `bytes`, so other buffers pass
    through a small bounce copy (1 MiB at a time stays in cache: ~5 GB/s)."""
    crc = 0
    for chunk in chunks:
        if isinstance(chunk, bytes):
            crc = google_crc32c.extend(crc, chunk)
            continue
        view = memoryview(chunk).cast("B")
        for start in range(0, len(view), _BOUNCE):
            crc = google_crc32c.extend(crc, bytes(view[start : start + _BOUNCE]))
    return f"{crc:08x}"


def _chunks(data: Union[Buffer, Iterable[Buffer]]) -> list[Buffer]:
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)


def file_record(data: Union[Buffer, Iterable[Buffer]], kind: Optional[str] = None) -> dict[str, Any]:
    """Size and checksum of one file's bytes, as the manifest stores them: crc32c where
    google-crc32c is installed, else sha256 (or the `kind` asked for)."""
    chunks = _chunks(data)
    size = sum(len(c) for c in chunks)
    if kind != "sha256" and google_crc32c is not None:
        return {"bytes": size, "crc32c": crc32c_hex(chunks)}
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def check_file(name: str, data: Buffer, record: dict[str, Any]) -> Optional[str]:
    """Why `data` does not match its manifest record, or None when it does."""
    if len(data) != record.get("bytes"):
        return f"{name}: {len(data)} bytes, manifest says {record.get('bytes')}"
    if "crc32c" in record:
        if google_crc32c is None:
            return None  # cannot check crc32c here; sizes matched
        actual = crc32c_hex([data])
        if actual != record["crc32c"]:
            return f"{name}: crc32c {actual}, manifest says {record['crc32c']}"
    elif "sha256" in record:
        actual = hashlib.sha256(data).hexdigest()
        if actual != record["sha256"]:
            return f"{name}: sha256 mismatch"
    return None


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    return dumps_json({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest})


def decode_manifest(data: bytes) -> dict[str, Any]:
    """The manifest in `data`, its whole shape checked: any defect is a one-line CheckpointError.

    A manifest may be foreign or hostile (a shared folder, a bucket others write), and every
    command reads it, so nothing a reader uses afterwards is left unchecked: the file records
    (sizes, checksums, plain file names that cannot leave the step folder) and the types of the
    fields `ls`, `inspect` and resume show or compare.
    """
    manifest = loads_json(data, MANIFEST, max_bytes=MAX_MANIFEST_BYTES, max_depth=_MAX_MANIFEST_DEPTH)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError("manifest.json is not a resilient_train manifest")
    version = manifest.get("format_version", 0)
    if not _is_count(version):
        raise CheckpointError("manifest.json: format_version is not a whole number")
    if version > FORMAT_VERSION:
        raise FormatTooNewError(
            f"checkpoint format {version} is newer than this resilient_train "
            f"understands ({FORMAT_VERSION}); upgrade resilient_train"
        )
    if not isinstance(manifest.get("files"), dict) or "step" not in manifest:
        raise CheckpointError("manifest.json lacks its file list or step")
    for key, check in _FIELDS.items():
        if key in manifest and not check(manifest[key]):
            raise CheckpointError(f"manifest.json: '{key}' is not {_WHAT[key]}; the manifest is corrupt or not ours")
    _check_files(manifest["files"])
    _check_shared(manifest.get("shared", {}))
    return manifest


def physical_name(logical: str, record: dict[str, Any]) -> str:
    """Where a file's bytes live in its step folder: the record's `path`, else the logical name
    (checkpoints written before write-once names have no `path`). Checked by `decode_manifest`."""
    return record.get("path", logical)


def _check_files(files: dict[str, Any]) -> None:
    if not files:
        raise CheckpointError("manifest.json lists no files; the manifest is corrupt or not ours")
    physical: set[str] = set()
    for logical, record in files.items():
        shown = logical[:80]
        if not FILE_NAME.fullmatch(logical) or logical == MANIFEST:
            raise CheckpointError(f"manifest.json: file name {shown!r} is not a plain file name; the manifest is corrupt or not ours")
        _check_record(shown, record)
        path = record.get("path", logical)
        if not isinstance(path, str) or not FILE_NAME.fullmatch(path) or path == MANIFEST:
            raise CheckpointError(f"manifest.json: the path of {shown} is not a plain file name in its step folder")
        if path in physical:
            raise CheckpointError(f"manifest.json: two files share the path {path}")
        physical.add(path)


def _check_record(shown: str, record: Any) -> None:
    if not isinstance(record, dict):
        raise CheckpointError(f"manifest.json: the record of {shown} is {describe(record)}, not an object")
    if not _is_count(record.get("bytes")):
        raise CheckpointError(f"manifest.json: the record of {shown} has no valid byte count")
    sums = [kind for kind in _HEX if kind in record]
    if not sums or any(not (isinstance(record[k], str) and _HEX[k].fullmatch(record[k])) for k in sums):
        raise CheckpointError(f"manifest.json: the record of {shown} has no valid crc32c or sha256")


def _check_shared(shared: Any) -> None:
    """The `shared` section: content-named files in `checkpoints/shared/`, each with size and checksum."""
    if not isinstance(shared, dict):
        raise CheckpointError(f"manifest.json: 'shared' is {describe(shared)}, not an object; the manifest is corrupt or not ours")
    for name, record in shared.items():
        if not isinstance(name, str) or not SHARED_NAME.fullmatch(name):
            raise CheckpointError(f"manifest.json: shared file name {str(name)[:80]!r} is not one we write; "
                                  "the manifest is corrupt or not ours")
        _check_record(f"shared/{name}", record)


def _is_count(value: Any) -> bool:
    """A non-negative int (JSON `true` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_positive_or_none(value: Any) -> bool:
    return value is None or (_is_count(value) and value > 0)


def _is_metrics(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values())


def _is_environment(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    gpus = value.get("gpus")
    return gpus is None or (isinstance(gpus, list) and all(isinstance(g, dict) and isinstance(g.get("name", "?"), str) for g in gpus))


# the fields readers use beside `files`, and what each must be when present
_FIELDS = {
    "step": _is_count, "epoch": _is_count, "cursor": _is_count, "samples_seen": _is_count,
    "world_size": lambda v: _is_count(v) and v > 0,
    "micro_batch": _is_positive_or_none, "global_batch": _is_positive_or_none,
    "precision": lambda v: isinstance(v, str), "config_hash": lambda v: isinstance(v, str),
    "created_at": lambda v: v is None or isinstance(v, str),
    "metrics": _is_metrics, "environment": _is_environment,
}
_WHAT = {
    "step": "a whole number", "epoch": "a whole number", "cursor": "a whole number", "samples_seen": "a whole number",
    "world_size": "a positive whole number", "micro_batch": "a positive whole number", "global_batch": "a positive whole number",
    "precision": "a string", "config_hash": "a string", "created_at": "a string",
    "metrics": "a map of numbers", "environment": "an environment map",
}
