"""Copying runs and checkpoints between storages, verifying what arrives, writing nothing committed.

Used by `sync` and by the background mirror. The rules (design guide, section 4):
- A checkpoint is copied under names of its own at DST (token-suffixed, as a save writes them),
  each file verified at DST (the store's crc32c where it keeps one, else read back), and
  committed by creating DST's manifest only if absent. A step DST already holds is never written:
  an identical checkpoint is skipped, a different one is reported and left alone.
- A step that disappears at SRC during the copy (SRC is a live run pruning) is skipped and the
  copy's own files are removed; nothing else at DST is touched.
- Only regular files travel: a symlink is never followed (it could point anywhere on SRC's disk).
- Run files (`run.yaml`, the task snapshot, logs) are replaced at DST only when DST has not moved
  past SRC; two different runs (their run ids differ) are never merged. The history
  (`sessions.json`, `logs/metrics.csv`) is merged, never replaced (run/history.py): DST keeps
  every session record and logged row it had, so no copy ever shortens another's history.

This module imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from resilient_train.checkpoint.manager import (
    COMMITTED,
    CheckpointInfo,
    CheckpointManager,
    new_token,
    physical,
    stored_name,
)
from resilient_train.checkpoint.manifest import check_file, step_dir
from resilient_train.checkpoint.shared import SHARED_DIR, logical
from resilient_train.errors import CheckpointError, UsageError
from resilient_train.run.history import HISTORY_FILES, copy_history
from resilient_train.storage import Storage

log = logging.getLogger(__name__)

RUN_FILES = ("run.json", "run.yaml", "sessions.json")
RUN_FOLDERS = ("task", "logs")
RUN_YAML = "run.yaml"
TASK_JSON = "task/task.json"
RUN_ID_FILE = "run.json"


class SourceVanished(CheckpointError):
    """The checkpoint disappeared at SRC during the copy (pruned by a live run)."""


class Conflict(CheckpointError):
    """DST already holds a different checkpoint at this step; it is not overwritten."""


def verify_remote_file(storage: Storage, folder: str, name: str, record: dict, data: Optional[bytes] = None) -> Optional[str]:
    """Why the stored file differs from its manifest record, or None when it matches."""
    stored = storage.checksum_from_store(folder, name)
    if stored is not None and "crc32c" in record:
        return None if stored == record["crc32c"] else f"{name}: store crc32c {stored}, manifest says {record['crc32c']}"
    return check_file(name, storage.read_bytes(folder, name) if data is None else data, record)


def _content(info: CheckpointInfo) -> dict[str, Any]:
    """A checkpoint's identity: its logical files' sizes and checksums (not where they are stored)."""
    files = (info.manifest or {}).get("files", {})
    content = {name: {k: v for k, v in record.items() if k != "path"} for name, record in files.items()}
    content.update({logical(name): record for name, record in (info.manifest or {}).get("shared", {}).items()})
    return content


def same_checkpoint(a: CheckpointInfo, b: CheckpointInfo) -> bool:
    return a.status == b.status == COMMITTED and a.manifest is not None and b.manifest is not None and _content(a) == _content(b)


def copy_checkpoint(src: CheckpointManager, dst: CheckpointManager, info: CheckpointInfo,
                    on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Copy one committed checkpoint to DST under new names and commit it there; bytes copied.

    Raises SourceVanished when SRC lost the step meanwhile, Conflict when DST holds a different
    checkpoint at the step, CheckpointError when a file is corrupt at SRC or did not arrive intact.
    """
    if info.manifest is None:
        raise CheckpointError(f"{info.path} is not committed")
    there = dst.info(info.step)
    if there.manifest is not None or there.status != "incomplete":
        if same_checkpoint(info, there):
            return 0
        raise Conflict(f"{there.path} already exists ({there.status}) and differs from {info.path}; not overwritten")
    folder = step_dir(info.step)
    token = new_token()
    written: list[str] = []
    records: dict[str, Any] = {}
    total = 0
    try:
        dst.root.makedirs(folder)
        for name, record in info.manifest["files"].items():
            data = _read_source(src, info, name, record)
            problem = check_file(name, data, record)
            if problem:
                raise CheckpointError(f"source {info.path} is corrupt: {problem}")
            target = physical(name, token)
            written.append(target)
            dst.root.write_bytes(data, folder, target)
            problem = verify_remote_file(dst.root, folder, target, record)
            if problem:
                raise CheckpointError(f"copy to {dst.root.display(folder)} did not verify: {problem}")
            records[name] = {**{k: v for k, v in record.items() if k != "path"}, "path": target}
            total += len(data)
            on_bytes(len(data))
        shared = _copy_shared(src, dst, info, on_bytes)
        total += sum(shared.values())
        records.update({logical(name): info.manifest["shared"][name] for name in shared})
        meta = {k: v for k, v in info.manifest.items() if k not in ("files", "shared", "step", "format", "format_version")}
        try:
            committed = dst.commit(info.step, records, meta)
        except FileExistsError:
            raise Conflict(f"{dst.root.display(folder)} was committed by another writer during the copy; not overwritten") from None
        if committed.status != COMMITTED:
            raise CheckpointError(f"copy to {committed.path} does not check out: {committed.reason}")
    except BaseException:
        _remove_quietly(dst, folder, written)
        raise
    return total


def _copy_shared(src: CheckpointManager, dst: CheckpointManager, info: CheckpointInfo,
                 on_bytes: Callable[[int], None]) -> dict[str, int]:
    """The shared files `info` references, at DST: each copied once per run (a file DST holds
    intact is not copied again); {name: bytes copied}. They are never removed on failure: another
    checkpoint may reference them, and garbage collection takes the unreferenced ones."""
    needed = (info.manifest or {}).get("shared", {})
    listing = dst.shared.listing() if needed else {}
    copied: dict[str, int] = {}
    for name, record in needed.items():
        if dst.shared.mismatch(name, record, listing.get(name, {})) is None:
            copied[name] = 0
            continue
        local = src.root.local_path(SHARED_DIR, name)
        if local is not None and os.path.islink(local):
            raise CheckpointError(f"source shared file {name} is a symlink; only regular files are copied")
        try:
            data = src.shared.read(name, record)
        except CheckpointError as exc:
            missing = not src.root.exists(SHARED_DIR, name)
            raise (SourceVanished(str(exc)) if missing else CheckpointError(f"source {info.path}: {exc}")) from None
        placed = dst.shared.place(name, [bytes(data)], record, listing)
        if placed is None:
            raise CheckpointError(f"{dst.root.display(SHARED_DIR, name)} exists but is damaged; remove it and sync again")
        if placed.written:
            problem = verify_remote_file(dst.root, SHARED_DIR, name, record)
            if problem:
                raise CheckpointError(f"copy to {dst.root.display(SHARED_DIR)} did not verify: {problem}")
        copied[name] = placed.written
        on_bytes(placed.written)
    return copied


def _read_source(src: CheckpointManager, info: CheckpointInfo, name: str, record: dict) -> bytes:
    folder = step_dir(info.step)
    where = stored_name(name, record)
    local = src.root.local_path(folder, where)  # only OS paths can be symlinks we must refuse
    if local is not None and os.path.islink(local):
        raise CheckpointError(f"source {info.path}: {where} is a symlink; only regular files are copied")
    try:
        return bytes(src.root.read_buffer(folder, where))
    except FileNotFoundError:
        raise SourceVanished(f"{info.path} disappeared at the source during the copy (pruned by a live run?)") from None


def _remove_quietly(dst: CheckpointManager, folder: str, names: list[str]) -> None:
    """Remove this copy's own files after a failure (they carry its token: no one else's)."""
    for name in names:
        try:
            dst.root.remove(folder, name)
        except Exception as exc:  # noqa: BLE001 - debris, collected later by the run's owner
            log.debug("could not remove %s/%s: %s", folder, name, exc)
    try:
        if not dst.root.list_dir(folder):
            dst.root.remove(folder, recursive=True)
    except Exception:  # noqa: BLE001
        pass


# -- run files -----------------------------------------------------------------------------------
def run_id(storage: Storage) -> Optional[str]:
    """The run id a run folder records in `run.json`, or None (older runs have none)."""
    try:
        if not storage.exists(RUN_ID_FILE):
            return None
        value = json.loads(storage.read_text(RUN_ID_FILE)).get("run_id")
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


def newest_committed(manager: CheckpointManager, infos: Optional[list[CheckpointInfo]] = None) -> Optional[int]:
    steps = [i.step for i in (manager.list() if infos is None else infos) if i.status == COMMITTED]
    return max(steps) if steps else None


def check_same_run(src: Storage, dst: Storage) -> None:
    """Refuse to merge two different runs (UsageError naming both ids)."""
    a, b = run_id(src), run_id(dst)
    if a is not None and b is not None and a != b:
        raise UsageError(
            f"{src.url} and {dst.url} are different runs (run ids {a} and {b}); sync into an empty folder or the run's own copy"
        )


@dataclass
class RunFileCopier:
    """Copies run files, skipping those unchanged since its last copy (the mirror keeps one)."""

    src: Storage
    dst: Storage
    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def copy(self) -> int:
        """The task snapshot (task.json last), run.json, sessions.json, logs, then run.yaml; files copied.

        The order of a new run's birth (run/folder.py): `run.yaml` is a run's commit marker, so a
        copy cut short at any moment is not mistaken for a whole run (resume says to sync again).
        """
        top = {e["basename"]: e for e in self.src.list_dir()}
        count = self._tree("task")
        for name in RUN_FILES:
            entry = top.get(name)
            if name != RUN_YAML and entry is not None and entry.get("type") == "file":
                count += self._copy(name, entry)
        count += sum(self._tree(folder) for folder in RUN_FOLDERS if folder != "task")
        entry = top.get(RUN_YAML)
        if entry is not None and entry.get("type") == "file":
            count += self._copy(RUN_YAML, entry)
        return count

    def _tree(self, folder: str) -> int:
        count = 0
        entries = sorted(self.src.list_dir(*folder.split("/")),
                         key=lambda e: f"{folder}/{e['basename']}" == TASK_JSON)  # task.json after the files it names
        for entry in entries:
            rel = f"{folder}/{entry['basename']}"
            if entry.get("islink"):
                log.warning("not copying %s: it is a symlink (only regular files are copied)", self.src.display(rel))
                continue
            if entry.get("type") == "directory":
                count += self._tree(rel)
            elif entry.get("type") == "file":
                count += self._copy(rel, entry)
        return count

    def _copy(self, rel: str, entry: dict) -> int:
        if entry.get("islink"):
            log.warning("not copying %s: it is a symlink (only regular files are copied)", self.src.display(rel))
            return 0
        key = (entry.get("size"), entry.get("mtime"), entry.get("crc32c"), entry.get("generation"), entry.get("updated"))
        if self.seen.get(rel) == key:
            return 0
        parts = rel.split("/")
        if rel in HISTORY_FILES:  # merged, never replaced: DST may hold steps and sessions SRC lacks
            copy_history(self.src, self.dst, rel)
        else:
            self.dst.write_bytes(self.src.read_bytes(*parts), *parts)
        self.seen[rel] = key
        return 1


def copy_run_files(src: Storage, dst: Storage) -> int:
    """run.yaml, sessions.json, the task snapshot and logs; returns the number of files copied."""
    return RunFileCopier(src, dst).copy()


@dataclass
class SyncReport:
    """What `sync` did, for its summary line."""

    copied: list[int] = field(default_factory=list)
    bytes: int = 0
    present: int = 0  # identical at DST already
    not_committed: list[tuple[int, str]] = field(default_factory=list)
    older: list[int] = field(default_factory=list)  # below DST's newest: DST's retention decides
    vanished: list[int] = field(default_factory=list)
    conflicts: list[tuple[int, str]] = field(default_factory=list)
    corrupt: list[tuple[int, str]] = field(default_factory=list)
    run_files: int = 0


def sync_run(src: Storage, dst: Storage, force: bool = False,
             on_total: Callable[[int], Callable[[int], None]] = lambda total: (lambda n: None)) -> SyncReport:
    """Copy run SRC to DST; see the module docstring for what is and is not written.

    Refuses (UsageError) to merge different runs, and to replace DST's run files when DST has
    moved past SRC, unless `force` (then SRC's run files replace DST's; committed checkpoints at
    DST are still never written). `on_total(total_bytes)` returns the per-chunk progress callback.
    """
    check_same_run(src, dst)
    source, target = CheckpointManager(src), CheckpointManager(dst)
    src_infos, dst_infos = source.list(), target.list()
    src_newest, dst_newest = newest_committed(source, src_infos), newest_committed(target, dst_infos)
    report = SyncReport()
    ahead = dst_newest is not None and (src_newest is None or dst_newest > src_newest)
    if ahead and not force:
        raise UsageError(
            f"{dst.url} has moved past {src.url} (its newest checkpoint is step {dst_newest}, the source's "
            f"{src_newest if src_newest is not None else 'none'}); nothing copied. Resume from {dst.url}, "
            "or pass --force to replace its config, sessions and logs with the source's"
        )
    present = {i.step: i for i in dst_infos}
    todo = []
    for info in src_infos:
        if info.status != COMMITTED:
            report.not_committed.append((info.step, f"{info.status}, not copied ({info.reason})"))
        elif info.step in present and same_checkpoint(info, present[info.step]):
            report.present += 1
        elif info.step in present and present[info.step].status != "incomplete":
            report.conflicts.append((info.step, f"DST holds a different checkpoint ({present[info.step].status}); not overwritten"))
        elif dst_newest is not None and info.step < dst_newest and not force:
            report.older.append(info.step)
        else:
            todo.append(info)
    total = sum(int(r.get("bytes", 0)) for i in todo for r in (i.manifest or {}).get("files", {}).values())
    on_bytes = on_total(total)
    for info in todo:  # oldest first: an interrupted sync leaves a usable prefix
        try:
            report.bytes += copy_checkpoint(source, target, info, on_bytes=on_bytes)
            report.copied.append(info.step)
        except SourceVanished:
            report.vanished.append(info.step)
        except Conflict as exc:
            report.conflicts.append((info.step, str(exc)))
        except CheckpointError as exc:
            report.corrupt.append((info.step, str(exc)))
    if report.conflicts and not force:  # DST holds checkpoints of another history: keep its run files
        return report
    report.run_files = copy_run_files(src, dst)
    return report


__all__ = [
    "SyncReport", "sync_run",
    "Conflict", "RunFileCopier", "SourceVanished", "check_same_run", "copy_checkpoint", "copy_run_files",
    "newest_committed", "run_id", "same_checkpoint", "verify_remote_file",
]
