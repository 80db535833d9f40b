"""Listing, writing, committing, loading and pruning the checkpoints of one run folder.

The protocol (design guide, section 4): every rank writes its files under their final names in
`checkpoints/step-NNNNNNNNN/`; after a barrier, global rank 0 writes `manifest.json` last, listing
every file with size and checksum. Resume walks from the newest checkpoint to the oldest and takes
the first that verifies. Retention runs only after a newer checkpoint is committed, orders by step
and never removes the newest valid checkpoint nor any folder it did not name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.manifest import (
    MANIFEST,
    FormatTooNewError,
    check_file,
    decode_manifest,
    encode_manifest,
    file_record,
    parse_step_dir,
    step_dir,
)
from resilient_train.errors import CheckpointError
from resilient_train.storage import Storage

if TYPE_CHECKING:
    from resilient_train.checkpoint.retention import RetentionPolicy

log = logging.getLogger(__name__)

COMMITTED, INCOMPLETE, CORRUPT = "committed", "incomplete", "corrupt"


@dataclass
class CheckpointInfo:
    """One `step-N` folder as `ls` shows it."""

    step: int
    path: str
    status: str
    bytes: int = 0
    created_at: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    manifest: Optional[dict[str, Any]] = None
    reason: Optional[str] = None
    too_new: bool = False  # written by a newer format version

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "path": self.path, "status": self.status, "bytes": self.bytes,
            "created_at": self.created_at, "metrics": self.metrics, "reason": self.reason,
        }


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint's manifest and the file contents one rank needs."""

    info: CheckpointInfo
    manifest: dict[str, Any]
    files: dict[str, bytes]

    def snapshot(self, rank: int) -> fmt.Snapshot:
        return fmt.decode(self.files, rank)


class CheckpointManager:
    """The `checkpoints/` folder of a run."""

    def __init__(self, run: Storage) -> None:
        self.run = run
        self.root = run.child("checkpoints")
        # steps whose checkpoint verified but could not be decoded (foreign or hostile files):
        # a save at such a step replaces it instead of keeping it as "already committed"
        self.distrusted: set[int] = set()

    # -- listing -------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every `step-N` folder, oldest first, with status from the manifest and file sizes."""
        infos = []
        for entry in self.root.list_dir():
            step = parse_step_dir(entry["basename"])
            if step is None or entry.get("type") != "directory":
                continue
            infos.append(self._describe(step))
        return sorted(infos, key=lambda info: info.step)

    def info(self, step: int) -> CheckpointInfo:
        return self._describe(step)

    def _describe(self, step: int) -> CheckpointInfo:
        name = step_dir(step)
        listing = {e["basename"]: e for e in self.root.list_dir(name)}
        info = CheckpointInfo(step=step, path=self.root.display(name), status=INCOMPLETE)
        info.bytes = sum(int(e.get("size") or 0) for e in listing.values())
        if MANIFEST not in listing:
            info.reason = "no manifest (save in flight or interrupted)"
            return info
        try:
            manifest = decode_manifest(self.root.read_bytes(name, MANIFEST))
        except CheckpointError as exc:
            info.status, info.reason = CORRUPT, str(exc)
            info.too_new = isinstance(exc, FormatTooNewError)
            return info
        info.manifest = manifest
        info.created_at = manifest.get("created_at")
        info.metrics = manifest.get("metrics", {})
        if manifest["step"] != step:
            info.status, info.reason = CORRUPT, f"manifest says step {manifest['step']}"
            return info
        for fname, record in manifest["files"].items():
            entry = listing.get(fname)
            if entry is None:
                info.status, info.reason = CORRUPT, f"{fname} is missing"
                return info
            if int(entry.get("size") or 0) != record.get("bytes"):
                info.status = CORRUPT
                info.reason = f"{fname}: {entry.get('size')} bytes, manifest says {record.get('bytes')}"
                return info
        info.status = COMMITTED
        return info

    # -- saving --------------------------------------------------------------------------------
    def prepare(self, step: int) -> bool:
        """Clear debris of an interrupted save at `step`; False if `step` is already committed."""
        info = self._describe(step)
        if info.status == COMMITTED:
            if step not in self.distrusted and not self.verify(info):
                return False
            log.warning("rewriting checkpoint %s: it does not verify or decode", info.path)
            self.distrusted.discard(step)
        if self.root.exists(step_dir(step)):
            self.root.remove(step_dir(step), recursive=True)
        return True

    def write_files(self, step: int, files: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Write one rank's files of a checkpoint (bytes or chunk lists); returns their records."""
        name = step_dir(step)
        self.root.makedirs(name)
        records = {}
        for fname, data in files.items():
            chunks = [data] if isinstance(data, bytes) else list(data)
            self.root.write_bytes(chunks, name, fname)
            records[fname] = file_record(chunks)
        return records

    def commit(self, step: int, records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> CheckpointInfo:
        """Write the manifest: from here on the checkpoint exists."""
        manifest = {**meta, "step": step, "files": records}
        self.root.write_bytes(encode_manifest(manifest), step_dir(step), MANIFEST)
        return self._describe(step)

    # -- loading -------------------------------------------------------------------------------
    def load(self, info: CheckpointInfo, wanted: Optional[set[str]] = None) -> LoadedCheckpoint:
        """Read and verify the files of a committed checkpoint (all of them, or `wanted`)."""
        if info.status != COMMITTED or info.manifest is None:
            raise CheckpointError(f"{info.path} is {info.status}: {info.reason}")
        name = step_dir(info.step)
        files = {}
        for fname, record in info.manifest["files"].items():
            if wanted is not None and fname not in wanted:
                continue
            data = self.root.read_buffer(name, fname)
            problem = check_file(fname, data, record)
            if problem:
                raise CheckpointError(f"{info.path} is corrupt: {problem}")
            files[fname] = data
        return LoadedCheckpoint(info=info, manifest=info.manifest, files=files)

    def verify(self, info: CheckpointInfo) -> list[str]:
        """Re-read every byte of a checkpoint; one line per file that does not match its manifest.

        On stores that keep a checksum per object (GCS) that checksum is compared as well, which
        catches an object replaced behind our back even when its size is unchanged.
        """
        if info.status != COMMITTED or info.manifest is None:
            return [f"{step_dir(info.step)}: {info.status} ({info.reason})"]
        name = step_dir(info.step)
        problems = []
        for fname, record in info.manifest["files"].items():
            try:
                data = self.root.read_buffer(name, fname)
            except FileNotFoundError:
                problems.append(f"{name}/{fname}: missing")
                continue
            problem = check_file(fname, data, record)
            if problem is None and "crc32c" in record:
                stored = self.root.checksum_from_store(name, fname)
                if stored is not None and stored != record["crc32c"]:
                    problem = f"{fname}: store crc32c {stored}, manifest says {record['crc32c']}"
            if problem:
                problems.append(f"{name}/{problem}")
        return problems

    def load_latest(self, wanted: Optional[set[str]] = None) -> Optional[LoadedCheckpoint]:
        """The newest checkpoint that verifies; each one skipped is reported in one line."""
        found = load_newest_valid([self], wanted)
        return found[1] if found else None

    # -- retention -----------------------------------------------------------------------------
    def prune(self, policy: "RetentionPolicy", newest_step: int) -> list[int]:
        """Apply `policy` right after `newest_step` was committed; returns the steps removed.

        Nothing is deleted unless `newest_step` is committed and its files verify (re-read and
        checksummed); only lower steps are candidates, so the newest valid checkpoint survives.
        """
        infos = [i for i in self.list() if i.step <= newest_step]
        if not infos or infos[-1].step != newest_step or infos[-1].status != COMMITTED:
            return []
        doomed = policy.doomed(infos)
        if not doomed:
            return []
        try:
            self.load(infos[-1])  # verify the newer checkpoint before deleting older ones
        except CheckpointError as exc:
            log.warning("not pruning: the newest checkpoint does not verify (%s)", exc)
            return []
        for info in doomed:
            self.delete(info.step)
        return [info.step for info in doomed]

    def delete(self, step: int) -> None:
        """Remove one checkpoint, manifest first: a half-deleted folder reads as incomplete, never valid."""
        self.root.remove(step_dir(step), MANIFEST)
        self.root.remove(step_dir(step), recursive=True)


def load_newest_valid(
    managers: list[CheckpointManager],
    wanted: Optional[set[str]] = None,
    decode: Optional[Callable[[LoadedCheckpoint], Any]] = None,
) -> Optional[tuple[int, LoadedCheckpoint, Any]]:
    """Across several storages (run folder, mirror), the newest checkpoint that verifies and decodes.

    Returns (index of the manager it came from, the loaded checkpoint, `decode(loaded)`); ties go
    to the first manager. A checkpoint whose files verify but do not decode (a foreign or hostile
    file under our name) is skipped like a corrupt one. Every skip is reported in one line.
    """
    candidates = sorted(
        ((info, index) for index, manager in enumerate(managers) for info in manager.list()),
        key=lambda pair: (-pair[0].step, pair[1]),
    )
    for info, index in candidates:
        if info.too_new:
            raise FormatTooNewError(f"{info.path}: {info.reason}")
        if info.status != COMMITTED:
            log.warning("skipping checkpoint %s: %s (%s)", info.path, info.status, info.reason)
            continue
        try:
            loaded = managers[index].load(info, wanted)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", info.path, exc)
            continue
        try:
            return index, loaded, decode(loaded) if decode is not None else None
        except CheckpointError as exc:
            managers[index].distrusted.add(info.step)
            log.warning("skipping checkpoint %s: %s", info.path, exc)
    return None
