"""The commit protocol of one save, phase by phase, on every rank; it never raises.

    BEGIN    rank 0: is the step committed and valid already (skip)? pick the attempt's token
    WRITE    every rank: its files under token-suffixed names; on a full disk, rank 0 frees what
             retention would free anyway (never the newest valid checkpoint) and all ranks retry
    COMMIT   rank 0: re-check the lease, create manifest.json only if absent
    CLEANUP  rank 0: one listing; if retention or garbage collection has anything to delete,
             re-check the lease, then prune and collect. A failure here only warns.

The lease is read at most twice per save (before COMMIT, before deleting) and the checkpoint is
listed once after the commit; nothing just written is downloaded again. Each phase returns a
typed result; the first failure ends the save with its phase, message and traceback (shown with
--debug), identical on every rank because rank 0 broadcasts it.
"""

from __future__ import annotations

import enum
import logging
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from resilient_train.checkpoint.collective import Collective
from resilient_train.checkpoint.lease import FencedError, Lease
from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager, is_no_space, new_token
from resilient_train.checkpoint.manifest import step_dir
from resilient_train.checkpoint.retention import RetentionPolicy

log = logging.getLogger("resilient_train")


class Phase(str, enum.Enum):
    BEGIN = "begin"
    WRITE = "write"
    COMMIT = "commit"
    CLEANUP = "cleanup"


class Result(str, enum.Enum):
    COMMITTED = "committed"  # this save's manifest is the commit
    SKIPPED = "skipped"  # the step was committed and valid already (by this or another writer)
    FAILED = "failed"  # nothing committed; training may go on and retry
    FENCED = "fenced"  # a newer session holds the run: this process must stop


@dataclass
class SaveOutcome:
    step: int
    result: Result
    phase: Optional[Phase] = None
    path: Optional[str] = None
    error: Optional[str] = None
    traceback: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.result in (Result.COMMITTED, Result.SKIPPED)

    @property
    def fenced(self) -> bool:
        return self.result is Result.FENCED


class _PhaseFailed(Exception):
    def __init__(self, outcome: SaveOutcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


def _failure(step: int, phase: Phase, exc: BaseException) -> SaveOutcome:
    result = Result.FENCED if isinstance(exc, FencedError) else Result.FAILED
    return SaveOutcome(step, result, phase, error=f"{type(exc).__name__}: {exc}" if result is Result.FAILED else str(exc),
                       traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class CommitProtocol:
    """Runs the phases of a save against one run folder's checkpoints."""

    def __init__(self, manager: CheckpointManager, collective: Collective, policy: RetentionPolicy,
                 lease: Optional[Lease] = None, on_commit: Optional[Callable[[int], None]] = None) -> None:
        self.manager = manager
        self.collective = collective
        self.policy = policy
        self.lease = lease
        self.on_commit = on_commit
        self.rank = collective.rank

    def run(self, step: int, files: Callable[[], dict[str, Any]], meta: dict[str, Any]) -> SaveOutcome:
        """Save `files()` (this rank's files, by logical name) as checkpoint `step`."""
        try:
            token = self._agree(step, Phase.BEGIN, lambda: self._begin(step))
            if token is None:
                return SaveOutcome(step, Result.SKIPPED, Phase.BEGIN, path=self.manager.root.display(step_dir(step)))
            records = self._write(step, files, token)
            info_path = self._agree(step, Phase.COMMIT, lambda: self._commit(step, records, meta))
            if info_path is None:
                return SaveOutcome(step, Result.SKIPPED, Phase.COMMIT, path=self.manager.root.display(step_dir(step)))
        except _PhaseFailed as failed:
            return failed.outcome
        if self.rank == 0:
            self._cleanup(step)
        return SaveOutcome(step, Result.COMMITTED, path=info_path)

    # -- phases --------------------------------------------------------------------------------
    def _agree(self, step: int, phase: Phase, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 and broadcast its value or failure to every rank."""
        answer: Optional[tuple[bool, Any]] = None
        if self.rank == 0:
            try:
                answer = (True, fn())
            except Exception as exc:  # noqa: BLE001 - becomes this save's outcome on every rank
                answer = (False, _failure(step, phase, exc))
        ok, value = self.collective.broadcast(answer)
        if not ok:
            raise _PhaseFailed(value)
        return value

    def _begin(self, step: int) -> Optional[str]:
        """None when the step is committed and valid already; else this attempt's token."""
        lease = self.lease
        before_delete = (lambda: lease.check(f"to replace the broken checkpoint at step {step}")) if lease else None
        if not self.manager.prepare(step, before_delete=before_delete):
            return None
        return new_token()

    def _write(self, step: int, files: Callable[[], dict[str, Any]], token: str) -> dict[str, Any]:
        """Every rank writes its files; a full disk anywhere frees space once and retries."""
        for attempt in (1, 2):
            mine: tuple[bool, Any]
            try:
                mine = (True, self.manager.write_files(step, files(), token))
            except Exception as exc:  # noqa: BLE001 - gathered, so every rank sees every failure
                mine = (False, (is_no_space(exc), _failure(step, Phase.WRITE, exc)))
            everyone = self.collective.gather(mine)
            failed = [value for ok, value in everyone if not ok]
            if not failed:
                return {name: rec for _, records in everyone for name, rec in records.items()}
            no_space = all(full for full, _ in failed)
            if attempt == 2 or not no_space:
                raise _PhaseFailed(failed[0][1])
            freed = self._agree(step, Phase.WRITE, lambda: self._make_room(step))
            if not freed:
                raise _PhaseFailed(failed[0][1])
        raise AssertionError("unreachable")  # pragma: no cover

    def _make_room(self, step: int) -> list[str]:
        if self.lease is not None:
            self.lease.check(f"to free space for step {step}")
        infos = self.manager.list()
        removed = [f"step {s}" for s in self.manager.make_room(self.policy, infos)]
        removed += self.manager.collect_garbage(below=step)
        if removed:
            log.warning("checkpoint at step %d: the disk is full; removed %s to make room, retrying", step, ", ".join(removed))
        return removed

    def _commit(self, step: int, records: dict[str, Any], meta: dict[str, Any]) -> Optional[str]:
        if self.lease is not None:
            self.lease.check(f"to commit step {step}")
            meta = {**meta, "writer": {**meta.get("writer", {}), "incarnation": self.lease.incarnation}}
        try:
            info = self.manager.commit(step, records, meta)
        except FileExistsError:
            info = self.manager.info(step)
            if info.status == COMMITTED and not self.manager.verify(info):
                log.warning("step %d was committed by another writer meanwhile; keeping theirs", step)
                return None
            raise
        if info.status != COMMITTED:  # a file landed short (a Drive upload, a full disk)
            raise RuntimeError(f"step {step} was written but does not check out: {info.reason}")
        return info.path

    def _cleanup(self, step: int) -> None:
        """Retention and garbage collection after a commit; failures warn, the save stands."""
        try:
            infos = self.manager.list()
            doomed = self.policy.doomed([i for i in infos if i.step <= step])
            debris = self.manager.debris(infos, below=step)
            if doomed or debris:
                if self.lease is not None:
                    self.lease.check(f"to prune after step {step}")
                # trusted writes (local disk): the bytes were fsynced from the buffers the checksums were
                # computed on; elsewhere prune checks the store's crc32c (GCS, no read) or reads back (memory, s3)
                removed = self.manager.prune(self.policy, step, infos, verified=self.manager.root.backend.trusted_writes)
                garbage = self.manager.collect_garbage([i for i in infos if i.step not in removed], below=step)
                if removed or garbage:
                    log.debug("after step %d: pruned steps %s, collected %s", step, removed, garbage)
        except FencedError as exc:
            log.warning("checkpoint at step %d committed; not pruning: %s", step, exc)
        except Exception as exc:  # noqa: BLE001 - a store refusing deletes (full Drive trash) must not fail the save
            log.warning("checkpoint at step %d committed, but pruning older ones failed (%s: %s)", step, type(exc).__name__, exc)
        if self.on_commit is not None:
            self.on_commit(step)
