"""The manifest: the commit marker of a checkpoint, and the checksums that make it verifiable.

A checkpoint exists only once `manifest.json` exists and every file it lists has the listed size;
it is valid when the checksums match too. crc32c is what GCS itself keeps per object and
google-crc32c computes it at memory speed; sha256 is the portable fallback.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterable, Optional, Union

Buffer = Union[bytes, bytearray, memoryview]
_BOUNCE = 1 << 20

from resilient_train.checkpoint.codec import dumps_json, loads_json
from resilient_train.errors import CheckpointError

FORMAT_NAME = "resilient_train.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{9})$")

try:
    import google_crc32c
except ImportError:  # pragma: no cover - google-crc32c is a dependency; keep working without it
    google_crc32c = None


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


def file_record(data: Union[Buffer, Iterable[Buffer]]) -> dict[str, Any]:
    """Size and checksum of one file's bytes, as the manifest stores them."""
    chunks = _chunks(data)
    size = sum(len(c) for c in chunks)
    if google_crc32c is not None:
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
    manifest = loads_json(data, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError("manifest.json is not a resilient_train manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise FormatTooNewError(
            f"checkpoint format {manifest['format_version']} is newer than this resilient_train "
            f"understands ({FORMAT_VERSION}); upgrade resilient_train"
        )
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError("manifest.json lacks its file list or step")
    return manifest
