"""Listing, writing, committing, loading, pruning and collecting the checkpoints of one run folder.

The protocol (design guide, section 4), built on one rule: **a committed checkpoint is never
written again, by anyone.**

- Every save attempt writes its data files under names no other attempt uses: the logical name
  with the attempt's token before the extension (`model.3f9a1c2b7d.safetensors`). A stale writer
  whose writes land late therefore lands on its own names and harms nothing.
- The commit is `manifest.json`, created only if it does not exist (`Storage.create_exclusive`),
  mapping each logical file to its physical name, size and checksum. Whoever creates it first
  owns the step; a second writer's commit fails with FileExistsError and its files are debris.
- Readers go through the manifest; a checkpoint is committed when the manifest parses and every
  file it lists has the listed size, valid when the checksums match too.
- Retention and garbage collection run only after a commit, order by step, never delete the
  newest valid checkpoint, and never touch a name they did not write.

This module imports no torch: `ls`, `verify` and `sync` use it without paying for torch.
"""

from __future__ import annotations

import builtins
import errno
import logging
import re
import uuid
from typing import Any, Callable, Optional

from resilient_train.checkpoint.info import COMMITTED, CORRUPT, INCOMPLETE, CheckpointInfo, LoadedCheckpoint
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
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.checkpoint.selection import load_newest_valid
from resilient_train.checkpoint.shared import SHARED_DIR, Placed, SharedFiles, logical, shared_name
from resilient_train.errors import CheckpointError
from resilient_train.storage import Storage

log = logging.getLogger(__name__)

# Names this library writes inside a step folder, and so may collect: token-suffixed data files
# (`name.<10 hex>.ext`) and temporary files of the local atomic writes (`.name.<8 hex>.tmp`).
_OURS = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*\.[0-9a-f]{10}\.[A-Za-z0-9]+|\..+\.[0-9a-f]{8}\.tmp)$")


def new_token() -> str:
    """A fresh save-attempt token: 10 hex digits, unique in practice across writers."""
    return uuid.uuid4().hex[:10]


def physical(name: str, token: str) -> str:
    """The name a save attempt with `token` writes logical file `name` under."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{token}.{ext}" if dot else f"{name}.{token}.bin"


def stored_name(name: str, record: dict[str, Any]) -> str:
    """Where a manifest record's bytes live (format 1 checkpoints use the logical name)."""
    path = record.get("path", name)
    return path if isinstance(path, str) else name


def is_no_space(exc: BaseException) -> bool:
    """A full disk or exhausted quota, anywhere in the exception's chain."""
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


class CheckpointManager:
    """The `checkpoints/` folder of a run."""

    def __init__(self, run: Storage) -> None:
        self.run = run
        self.root = run.child("checkpoints")
        self.shared = SharedFiles(self.root)
        # steps whose checkpoint verified but could not be decoded (foreign or hostile files):
        # a save at such a step replaces it instead of keeping it as "already committed"
        self.distrusted: set[int] = set()
        # committed manifests never change, so a parsed one is reused while its listing entry is
        # the same (size and store checksum or time): one read per checkpoint, not one per save
        self._manifests: dict[tuple[Any, ...], dict[str, Any]] = {}
        # shared files this process read back intact: written once, so a save's prune need not
        # read a frozen base again at every save (verify(info) with no `seen` uses it)
        self._shared_verified: dict[str, Optional[str]] = {}

    # -- listing -------------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every `step-N` folder, oldest first, from one recursive listing of `checkpoints/`."""
        folders: dict[int, dict[str, dict]] = {}
        shared: dict[str, dict] = {}
        for rel, entry in self.root.walk().items():
            top, _, rest = rel.partition("/")
            if top == SHARED_DIR and rest and "/" not in rest and entry.get("type") != "directory":
                shared[rest] = entry
            step = parse_step_dir(top)
            if step is None:
                continue
            files = folders.setdefault(step, {})
            if rest and "/" not in rest and entry.get("type") != "directory":
                files[rest] = entry
        return [self._describe(step, files, shared) for step, files in sorted(folders.items())]

    def info(self, step: int) -> CheckpointInfo:
        name = step_dir(step)
        files = {e["basename"]: e for e in self.root.list_dir(name) if e.get("type") != "directory"}
        return self._describe(step, files)

    def _describe(self, step: int, listing: dict[str, dict], shared: Optional[dict[str, dict]] = None) -> CheckpointInfo:
        name = step_dir(step)
        info = CheckpointInfo(step=step, path=self.root.display(name), status=INCOMPLETE, entries=listing)
        info.bytes = sum(_size(e) for e in listing.values())
        if MANIFEST not in listing:
            info.reason = "no manifest (save in flight or interrupted)"
            return info
        try:
            manifest = self._manifest(step, listing[MANIFEST])
        except CheckpointError as exc:
            info.status, info.reason = CORRUPT, str(exc)
            info.too_new = isinstance(exc, FormatTooNewError)
            return info
        except Exception as exc:  # a hostile manifest must not break the listing of the others
            info.status, info.reason = CORRUPT, f"manifest.json cannot be read ({type(exc).__name__}: {exc})"
            return info
        info.manifest = manifest
        info.created_at = manifest.get("created_at") if isinstance(manifest.get("created_at"), str) else None
        metrics = manifest.get("metrics")
        info.metrics = metrics if isinstance(metrics, dict) else {}
        if manifest["step"] != step:
            info.status, info.reason = CORRUPT, f"manifest says step {manifest['step']}"
            return info
        info.bytes = _size(listing[MANIFEST])
        for fname, record in manifest["files"].items():
            entry = listing.get(stored_name(fname, record))
            if entry is None:
                info.status, info.reason = CORRUPT, f"{fname} is missing"
                return info
            if _size(entry) != record.get("bytes"):
                info.status = CORRUPT
                info.reason = f"{fname}: {_size(entry)} bytes, manifest says {record.get('bytes')}"
                return info
            info.bytes += _size(entry)
        needed = manifest.get("shared", {})
        shared = self.shared.listing() if needed and shared is None else (shared or {})
        for name, record in needed.items():
            entry = shared.get(name)
            if entry is None or _size(entry) != record.get("bytes"):
                # still committed: a resume takes these tensors from the model build() makes when
                # they match (state.resolve_shared), so a damaged shared file is no single point of failure
                found = "is missing" if entry is None else f"has {_size(entry)} bytes, manifest says {record.get('bytes')}"
                info.shared_problem = info.shared_problem or f"shared file {name} {found}"
                continue
            info.shared_bytes += _size(entry)
            info.entries[f"{SHARED_DIR}/{name}"] = entry  # where store_mismatch finds its store checksum
        info.status = COMMITTED
        return info

    def _manifest(self, step: int, entry: dict) -> dict[str, Any]:
        key = (step, _size(entry), entry.get("crc32c"), entry.get("generation"), entry.get("mtime"), entry.get("created"))
        cached = self._manifests.get(key)
        if cached is None:
            cached = decode_manifest(self.root.read_bytes(step_dir(step), MANIFEST))
            if len(self._manifests) > 10_000:
                self._manifests.clear()
            self._manifests[key] = cached
        return cached

    # -- saving --------------------------------------------------------------------------------
    def prepare(self, step: int, before_delete: Optional[Callable[[], None]] = None) -> bool:
        """Whether a save at `step` should go ahead: False if `step` is committed and valid.

        A manifest at `step` that does not check out (files missing, bad checksums, or contents
        that verify but cannot be decoded) is no checkpoint: it is removed so the save can commit
        in its place. Nothing else is touched; an interrupted attempt's files stay until garbage
        collection, since this attempt writes under names of its own.
        """
        info = self.info(step)
        if info.manifest is None and info.status == INCOMPLETE:
            return True
        if info.status == COMMITTED and step not in self.distrusted and not self.verify(info):
            return False
        if info.too_new:
            raise CheckpointError(f"{info.path} was written by a newer resilient_train ({info.reason})")
        if before_delete is not None:
            before_delete()
        log.warning("replacing checkpoint %s: it does not verify or decode (%s)", info.path, info.reason or "checksums differ")
        self.root.remove(step_dir(step), MANIFEST)
        self.distrusted.discard(step)
        return True

    def write_files(self, step: int, files: dict[str, Any], token: Optional[str] = None) -> dict[str, dict[str, Any]]:
        """Write one rank's files of a checkpoint under this attempt's own names; their records.

        `files` maps logical names to bytes or chunk lists; each record carries its `path`.
        """
        token = token or new_token()
        name = step_dir(step)
        self.root.makedirs(name)
        records = {}
        for fname, data in files.items():
            if isinstance(data, Placed):  # a shared file, already placed in shared/ by the serialiser
                records[logical(data.name)] = dict(data.record)
                continue
            chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
            target = physical(fname, token)
            self.root.write_bytes(chunks, name, target)
            records[fname] = {**file_record(chunks), "path": target}
        return records

    def commit(self, step: int, records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> CheckpointInfo:
        """Create the manifest if no one has: from here on the checkpoint exists.

        Raises FileExistsError when another writer committed `step` first. The returned info
        comes from a fresh listing of the folder: sizes (and, on GCS, the store's own crc32c)
        are checked against the records without reading the data back.
        """
        own = {name: record for name, record in records.items() if shared_name(name) is None}
        shared = {str(shared_name(name)): record for name, record in records.items() if shared_name(name) is not None}
        manifest = {**meta, "step": step, "files": own, **({"shared": shared} if shared else {})}
        self.root.create_exclusive(encode_manifest(manifest), step_dir(step), MANIFEST)
        info = self.info(step)
        if info.status == COMMITTED:
            problem = info.shared_problem or self.store_mismatch(info)  # a new checkpoint starts with every file intact
            if problem:
                info.status, info.reason = CORRUPT, problem
        return info

    def store_mismatch(self, info: CheckpointInfo) -> Optional[str]:
        """A file whose store-kept crc32c (GCS lists one per object) differs from the manifest.

        Free: it uses the listing, reads nothing. None where the store keeps no checksum.
        """
        manifest = info.manifest or {}
        listed = [(fname, stored_name(fname, record), record) for fname, record in manifest.get("files", {}).items()]
        listed += [(f"shared/{name}", f"{SHARED_DIR}/{name}", record) for name, record in manifest.get("shared", {}).items()]
        for fname, where, record in listed:
            entry = info.entries.get(where, {})
            stored = self.root.stored_checksum(entry)
            if stored is not None and "crc32c" in record and stored != record["crc32c"]:
                return f"{fname}: store crc32c {stored}, manifest says {record['crc32c']}"
        return None

    # -- loading -------------------------------------------------------------------------------
    def load(self, info: CheckpointInfo, wanted: Optional[set[str]] = None, shared: bool = True) -> LoadedCheckpoint:
        """Read and verify the files of a committed checkpoint (all of them, or `wanted`).

        The shared files the model needs come along (as `shared/<name>`) when the model file is
        wanted, unless `shared` is False: a resume first checks whether the model built by the
        task already holds those tensors and reads only the ones it does not (loop/resume.py).
        """
        if info.status != COMMITTED or info.manifest is None:
            raise CheckpointError(f"{info.path} is {info.status}: {info.reason}")
        name = step_dir(info.step)
        files: dict[str, bytearray] = {}
        for fname, record in info.manifest["files"].items():
            if wanted is not None and fname not in wanted:
                continue
            try:
                data = self.root.read_buffer(name, stored_name(fname, record))
            except FileNotFoundError:
                raise CheckpointError(f"{info.path} is incomplete: {fname} disappeared") from None
            problem = check_file(fname, data, record)
            if problem:
                raise CheckpointError(f"{info.path} is corrupt: {problem}")
            files[fname] = data
        if shared and (wanted is None or "model.safetensors" in wanted):  # format.MODEL_FILE (this module is torch-free)
            for name, record in info.manifest.get("shared", {}).items():
                try:
                    files[logical(name)] = self.shared.read(name, record)
                except CheckpointError as exc:
                    raise CheckpointError(f"{info.path}: {exc}") from None
        records = info.manifest.get("shared", {})

        def read_shared(name: str) -> bytearray:
            if name not in records:
                raise CheckpointError(f"{info.path} does not reference shared file {name}")
            return self.shared.read(name, records[name])

        return LoadedCheckpoint(info=info, manifest=info.manifest, files=files, read_shared=read_shared)

    def verify(self, info: CheckpointInfo, seen: Optional[dict[str, Optional[str]]] = None) -> builtins.list[str]:
        """Re-read every byte of a checkpoint; one line per file that does not match its manifest.

        On stores that keep a checksum per object (GCS) that checksum is compared as well, which
        catches an object replaced behind our back even when its size is unchanged. Shared files
        are read once per `seen` (name -> problem), however many checkpoints reference them.
        """
        if info.status != COMMITTED or info.manifest is None:
            return [f"{step_dir(info.step)}: {info.status} ({info.reason})"]
        name = step_dir(info.step)
        problems = []
        for fname, record in info.manifest["files"].items():
            where = stored_name(fname, record)
            try:
                data = self.root.read_buffer(name, where)
            except FileNotFoundError:
                problems.append(f"{name}/{fname}: missing")
                continue
            problem = check_file(fname, data, record)
            if problem is None and "crc32c" in record:
                stored = self.root.checksum_from_store(name, where)
                if stored is not None and stored != record["crc32c"]:
                    problem = f"{fname}: store crc32c {stored}, manifest says {record['crc32c']}"
            if problem:
                problems.append(f"{name}/{problem}")
        seen = self._shared_verified if seen is None else seen
        for shared, record in info.manifest.get("shared", {}).items():
            if shared not in seen:
                try:
                    self.shared.read(shared, record)
                    seen[shared] = None
                except CheckpointError as exc:
                    seen[shared] = str(exc)
            if seen[shared] is not None:
                problems.append(f"{SHARED_DIR}/{shared}: {seen[shared]}")
                if seen is self._shared_verified:
                    del seen[shared]  # only what verified is remembered: a damaged file is read again next time
        return problems

    def load_latest(self, wanted: Optional[set[str]] = None) -> Optional[LoadedCheckpoint]:
        """The newest checkpoint that verifies; each one skipped is reported in one line."""
        found = load_newest_valid([self], wanted)
        return found[1] if found else None

    # -- retention and garbage collection -----------------------------------------------------
    def prune(self, policy: RetentionPolicy, newest_step: int, infos: Optional[builtins.list[CheckpointInfo]] = None,
              verified: bool = False) -> builtins.list[int]:
        """Apply `policy` right after `newest_step` was committed; returns the steps removed.

        Nothing is deleted unless `newest_step` is committed and verifies: `verified` says the
        caller checked it already (a save that just wrote those bytes and listed them back, with
        the store's crc32c on GCS); otherwise the store's checksums are compared where the
        listing has them, and elsewhere the files are read back. Only lower steps are
        candidates, so the newest valid checkpoint survives. `infos` is a listing the caller
        already has (a save lists once).
        """
        infos = [i for i in (self.list() if infos is None else infos) if i.step <= newest_step]
        if not infos or infos[-1].step != newest_step or infos[-1].status != COMMITTED:
            return []
        doomed = policy.doomed(infos)
        if doomed and not verified and not self._verifies(infos[-1]):
            log.warning("not pruning: the newest checkpoint %s does not verify", infos[-1].path)
            return []
        for info in doomed:
            self.delete(info.step)
        return [info.step for info in doomed]

    def _verifies(self, info: CheckpointInfo) -> bool:
        records = (info.manifest or {}).get("files", {}).items()
        if records and all(self.root.stored_checksum(info.entries.get(stored_name(f, r), {})) for f, r in records):
            return self.store_mismatch(info) is None  # the store's own checksums: nothing to read
        return not self.verify(info)  # reads it back (shared files once per process)

    def make_room(self, policy: RetentionPolicy, infos: Optional[builtins.list[CheckpointInfo]] = None) -> builtins.list[int]:
        """A save failed for lack of space: delete what the policy would prune once it commits.

        The policy is applied as if one more checkpoint were committed; the newest valid
        checkpoint (every byte verified) and everything newer are kept whatever the policy says
        (the save may fail again).
        """
        infos = self.list() if infos is None else infos
        committed = [i for i in infos if i.status == COMMITTED]
        # the newest checkpoint whose every byte verifies is kept whatever the policy says
        keep = next((i.step for i in reversed(committed) if not self.verify(i)), None)
        if keep is None:
            return []
        ghost = CheckpointInfo(step=committed[-1].step + 1, path="", status=COMMITTED)
        doomed = [i for i in policy.doomed([*committed, ghost]) if i.step < keep]
        for info in doomed:
            self.delete(info.step)
        return [info.step for info in doomed]

    def debris(self, infos: Optional[builtins.list[CheckpointInfo]] = None,
               below: Optional[int] = None) -> builtins.list[tuple[int, Optional[str]]]:
        """What garbage collection would remove: (step, file name), or (step, None) for a folder.

        Debris is: folders without a manifest and folders whose manifest does not check out,
        when their step is below `below` (default: the newest committed step); inside committed
        folders, names this library writes that the manifest does not list (a losing writer's
        files). A committed checkpoint is never debris.
        """
        infos = self.list() if infos is None else infos
        committed = {i.step for i in infos if i.status == COMMITTED}
        bound = below if below is not None else (max(committed) if committed else None)
        found: list[tuple[int, Optional[str]]] = []
        for info in infos:
            if info.status == COMMITTED and info.manifest is not None:
                listed = {stored_name(f, r) for f, r in info.manifest["files"].items()} | {MANIFEST}
                found += [(info.step, extra) for extra in sorted(info.names - listed) if _OURS.match(extra)]
            elif bound is not None and info.step < bound and info.step not in committed:
                found.append((info.step, None))
        return found

    def collect_garbage(self, infos: Optional[builtins.list[CheckpointInfo]] = None, below: Optional[int] = None) -> builtins.list[str]:
        """Remove the `debris` of dead or losing writers; returns what was removed, for the log."""
        removed = []
        for step, name in self.debris(infos, below):
            if name is None:
                self.delete(step)
                removed.append(step_dir(step))
            else:
                self.root.remove(step_dir(step), name)
                removed.append(f"{step_dir(step)}/{name}")
        infos = self.list() if infos is None else infos
        for name in self.shared.garbage([i.manifest for i in infos], self.shared.listing()):
            self.shared.remove(name)  # referenced by no manifest left in the run
            removed.append(f"{SHARED_DIR}/{name}")
        return removed

    def delete(self, step: int) -> None:
        """Remove one checkpoint, manifest first: a half-deleted folder reads as incomplete, never valid."""
        self.root.remove(step_dir(step), MANIFEST)
        self.root.remove(step_dir(step), recursive=True)


def _size(entry: dict) -> int:
    try:
        return int(entry.get("size") or 0)
    except (TypeError, ValueError):
        return -1


__all__ = [
    "COMMITTED", "CORRUPT", "INCOMPLETE", "CheckpointInfo", "CheckpointManager", "LoadedCheckpoint",
    "is_no_space", "new_token", "physical", "stored_name",
]
