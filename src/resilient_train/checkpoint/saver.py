"""Saving during training: the loop's one entry point for checkpoints.

`CheckpointSaver` ties the parts together and keeps the failure count:
- when to save: `policy.SavePolicy` (every N steps, every M minutes, retry after a failure);
- sync or in the background: `policy.AutoAsync` / `AsyncMode`, `writer.BackgroundWriter`;
- the commit itself: `protocol.CommitProtocol` (write-once names, manifest created if absent,
  retention and garbage collection after the commit, lease checks that fence stale writers).

Under DDP whatever ranks must agree on (skip a save that falls due while one is in flight, sync or
async) is decided on rank 0 and broadcast from the main thread; the save's own collectives run
on a dedicated group (collective.py), from the writer thread when async.

A failed save does not stop training: it is reported, retried at the next step boundary, and only
`checkpoint.max_consecutive_failures` failures in a row stop the run (exit 1), the last valid
checkpoint untouched. A fenced writer (stale lease) stops at once. The save before exit (end of
training, SIGTERM) must succeed: its failure stops the run with exit 1, never 75. Every way out of
the loop, an exception included, waits (bounded) for the save in flight and reports its outcome.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Optional

from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.collective import Collective
from resilient_train.checkpoint.frozen import FrozenPlanner
from resilient_train.checkpoint.lease import FencedError, Lease
from resilient_train.checkpoint.manager import CheckpointManager
from resilient_train.checkpoint.mirror import Mirror
from resilient_train.checkpoint.policy import AsyncMode, AutoAsync, SavePolicy, WhenBusy
from resilient_train.checkpoint.protocol import CommitProtocol, Result, SaveOutcome
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.checkpoint.writer import BackgroundWriter
from resilient_train.config import CheckpointConfig
from resilient_train.errors import CheckpointError

log = logging.getLogger("resilient_train")

__all__ = ["CheckpointSaver", "Collective", "SaveOutcome"]


class CheckpointSaver:
    """Decides when to save and runs saves, one at a time, synchronously or in the background."""

    def __init__(
        self,
        manager: CheckpointManager,
        ck: CheckpointConfig,
        collective: Collective,
        meta: dict[str, Any],
        lease: Optional[Lease] = None,
        mirror: Optional[Mirror] = None,
        decide: Callable[[Any], Any] = lambda value: value,
        last_path: Optional[str] = None,
    ) -> None:
        self.manager = manager
        self.ck = ck
        self.rank = collective.rank
        self.meta = meta
        self.lease = lease
        self.mirror = mirror
        self.decide = decide  # rank 0's value on every rank (a broadcast on the training group)
        self.async_mode = AsyncMode(str(ck.async_save))
        self.when_busy = WhenBusy(ck.when_busy)
        self.policy = SavePolicy(ck.every_n_steps, ck.every_minutes)
        self.retention = RetentionPolicy.from_config(ck)
        self.protocol = CommitProtocol(manager, collective, self.retention, lease,
                                       on_commit=mirror.submit if mirror is not None and self.rank == 0 else None)
        self.auto = AutoAsync(verbose=self.rank == 0) if self.async_mode is AsyncMode.AUTO else None
        self.writer = BackgroundWriter()
        self.buffers = fmt.HostBuffers()
        # what did not change since the last save goes to shared files once (None: every tensor every time)
        self.frozen = FrozenPlanner() if ck.share_unchanged else None
        self.last_path: Optional[str] = last_path  # the newest committed checkpoint (the resumed one at first)
        self.last_outcome: Optional[SaveOutcome] = None
        self.failures = 0
        self.slowest_save: Optional[float] = None  # seconds, what a session deadline must leave room for
        self._async_run = False
        self._last_step_end = time.monotonic()

    def set_device_micro_batch(self, size: int) -> None:
        """The device micro-batch changed (auto, after an out-of-memory error): later manifests say so."""
        self.meta["device_micro_batch"] = size

    # -- policy --------------------------------------------------------------------------------
    def due(self, step: int, time_due: bool = False) -> bool:
        """Whether to save after `step` (every_n_steps, every_minutes as agreed, or a retry)."""
        return self.policy.due(step, time_due)

    @property
    def busy(self) -> bool:
        return self.writer.busy

    def on_step_end(self) -> None:
        """Called after each optimizer step: surfaces background results, feeds `auto` timing."""
        now = time.monotonic()
        if self.auto is not None:
            self.auto.on_step(now - self._last_step_end, self.busy)
        self._last_step_end = now
        if self.writer.pending and not self.writer.busy:
            self._collect(self.writer.collect())

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, capture: Callable[[], fmt.Snapshot], metrics: dict[str, Any], final: bool = False) -> None:
        """Save the state after `step`. `final` saves (end, stop) run sync and must succeed."""
        choice = self.decide(self._choose(final) if self.rank == 0 else None)
        if choice == "skip":
            log.info("checkpoint at step %d skipped: the previous save is still being written (checkpoint.when_busy=skip)", step)
            return
        if self.writer.pending:
            self._collect(self.writer.collect())
        self.policy.retry = False  # this save is the retry; a failure sets it again when collected
        started = time.monotonic()
        snapshot = capture()
        progress = snapshot.train["progress"]
        files = fmt.encode_files(snapshot, self.rank, shared=self.rank == 0, planner=self.frozen)
        meta = {
            **self.meta,
            "epoch": progress["epoch"],
            "cursor": progress["cursor"],
            "samples_seen": progress["samples_seen"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        }

        def run() -> SaveOutcome:
            began = time.monotonic()
            outcome = self.protocol.run(step, lambda: files.serialize(self.manager.shared), meta)
            self.slowest_save = max(self.slowest_save or 0.0, time.monotonic() - began)
            return outcome

        if choice == "async":
            if self.auto is not None and self.auto.decided is None:
                self.auto.started_async(time.monotonic() - started)
            self._async_run = True
            self.writer.start(step, lambda: files.stage(self.buffers), run)
        else:
            self._async_run = False
            self._collect(run(), final=final)
            if self.auto is not None and self.auto.sync_stall is None and not final:
                self.auto.sync_stall = time.monotonic() - started
        self.policy.saved()

    def _choose(self, final: bool) -> str:
        """Rank 0's decision for the save that falls due: "skip", "sync" or "async"."""
        if self.writer.busy and self.when_busy is WhenBusy.SKIP and not final:
            return "skip"
        if final or self.async_mode is AsyncMode.FALSE:
            return "sync"
        if self.async_mode is AsyncMode.TRUE or (self.auto is not None and self.auto.next_is_async()):
            return "async"
        return "sync"

    def before_update(self) -> None:
        """Called before the optimizer changes any state: a background save must have copied it.

        The copy into host buffers runs in the writer thread and overlaps the next step's forward
        and backward pass, which only read the weights; only what is left of it stalls training.
        """
        waited = self.writer.wait_staged()
        if waited and self.auto is not None and self.auto.decided is None:
            self.auto.add_stall(waited)

    def finish(self) -> None:
        """Wait for a save in flight and the mirror; raise if the save failed."""
        if self.writer.pending:
            self._collect(self.writer.collect(), final=True)
        if self.mirror is not None and self.rank == 0:
            self.mirror.close()

    def abort(self, timeout: float) -> Optional[SaveOutcome]:
        """The loop is leaving on an exception: wait up to `timeout` s for the save in flight.

        Reports its outcome in one line and never raises (the original exception is what the
        user must see); returns the outcome, or None when no save was in flight.
        """
        if not self.writer.pending:
            return None
        outcome = self.writer.collect(timeout)
        if outcome is None:
            return None
        if outcome.ok:
            self.last_path = outcome.path or self.last_path
            if self.rank == 0:
                log.info("the save in flight at step %d committed before the run stopped: %s", outcome.step, outcome.path)
        elif self.rank == 0:
            log.warning("the save in flight at step %d did not commit (%s); the last valid checkpoint is %s",
                        outcome.step, outcome.error, self.last_path or "none yet")
        return outcome

    def _collect(self, outcome: Optional[SaveOutcome], final: bool = False) -> None:
        """Act on the outcome of the last save: reset, warn and retry later, or stop."""
        if outcome is None:
            return
        self.last_outcome = outcome
        if self._async_run and self.auto is not None and self.auto.decided is None:
            self.auto.finished_async()
        if outcome.result is Result.FENCED:
            raise FencedError(outcome.error or "stale lease")
        if outcome.ok:
            self.failures, self.policy.retry = 0, False
            if outcome.path:
                self.last_path = outcome.path
                if self.rank == 0 and outcome.result is Result.COMMITTED:
                    log.info("checkpoint step %d committed: %s", outcome.step, outcome.path)
            return
        self.failures += 1
        last = self.last_path or "none yet"
        if outcome.traceback:
            log.debug("checkpoint at step %d failed in phase %s:\n%s",
                      outcome.step, outcome.phase and outcome.phase.value, outcome.traceback)
        if final or self.failures >= self.ck.max_consecutive_failures:
            raise CheckpointError(
                f"checkpoint at step {outcome.step} failed ({outcome.error}); "
                f"{self.failures} failure(s) in a row; the last valid checkpoint is {last}"
            )
        self.policy.retry = True
        log.warning(
            "checkpoint at step %d failed (%s); training goes on and retries at the next step (%d/%d failures); last valid: %s",
            outcome.step, outcome.error, self.failures, self.ck.max_consecutive_failures, last,
        )
