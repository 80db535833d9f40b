"""Saving during training: when (policy), how (sync or in the background), and what if it fails.

One save, on every rank:
  1. main thread, at a step boundary: snapshot the state (references to the live tensors, plus
     everything that is not a tensor);
  2. (background thread when async) copy the tensors into reused host buffers, while the next
     step's forward and backward run (the loop waits for this copy before the optimizer step, the
     only stall an async save causes); then rank 0 checks the lease and clears debris of an interrupted
     save at this step; every rank serialises and writes its files; ranks exchange file records;
     rank 0 checks the lease again, writes the manifest last, verifies, prunes, and hands the
     checkpoint to the mirror.
Under DDP the ranks coordinate over a dedicated gloo group, so a background save never issues
collectives on the group training uses.

A failed save does not stop training: it is reported, retried at the next step boundary, and only
`checkpoint.max_consecutive_failures` failures in a row stop the run (exit 1), the last valid
checkpoint untouched. A fenced writer (stale lease) stops at once. The save before exit (end of
training, SIGTERM) must succeed: its failure stops the run with exit 1, never 75.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.lease import FencedError, Lease
from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
from resilient_train.checkpoint.mirror import Mirror
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.config import CheckpointConfig
from resilient_train.errors import CheckpointError

log = logging.getLogger("resilient_train")


class Collective:
    """The few collectives a save needs, on a dedicated gloo group (identity on one process)."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank
        self.group = None
        if world_size > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


@dataclass
class SaveOutcome:
    step: int
    ok: bool
    path: Optional[str] = None
    error: Optional[str] = None
    fenced: bool = False
    skipped: bool = False  # the step was committed already


class AutoAsync:
    """`async_save=auto`: measure one sync save and one async save, keep the cheaper.

    The sync cost is the stall of a whole save. The async cost is the host copy at the step
    boundary plus the extra time steps took while the writer ran (on a small CPU machine the writer
    competes with training for cores, so this can exceed the sync stall).
    """

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = verbose
        self.sync_stall: Optional[float] = None
        self.copy_stall: Optional[float] = None
        self.decided: Optional[bool] = None
        self._steps: deque[float] = deque(maxlen=50)
        self._baseline: Optional[float] = None
        self._extra = 0.0

    def next_is_async(self) -> bool:
        if self.decided is not None:
            return self.decided
        return self.sync_stall is not None  # the first save is measured sync, the second async

    def on_step(self, seconds: float, writer_busy: bool) -> None:
        if self.decided is not None:
            return
        if writer_busy and self._baseline is not None:
            self._extra += max(0.0, seconds - self._baseline)
        elif not writer_busy:
            self._steps.append(seconds)

    def started_async(self, stall: float) -> None:
        self.copy_stall = stall
        self._baseline = statistics.median(self._steps) if self._steps else 0.0

    def add_stall(self, seconds: float) -> None:
        self.copy_stall = (self.copy_stall or 0.0) + seconds

    def finished_async(self) -> bool:
        cost = (self.copy_stall or 0.0) + self._extra
        self.decided = cost < (self.sync_stall or 0.0)
        (log.info if self.verbose else log.debug)(
            "async_save=auto: a sync save stalled training %.3fs, an async one %.3fs (copy %.3fs + slower steps %.3fs); using %s saves",
            self.sync_stall or 0.0, cost, self.copy_stall or 0.0, self._extra, "async" if self.decided else "sync",
        )
        return self.decided


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
    ) -> None:
        self.manager = manager
        self.ck = ck
        self.collective = collective
        self.rank = collective.rank
        self.meta = meta
        self.lease = lease
        self.mirror = mirror
        self.policy = RetentionPolicy.from_config(ck)
        self.auto = AutoAsync(verbose=self.rank == 0) if ck.async_save == "auto" else None
        self.buffers = fmt.HostBuffers()
        self.last_path: Optional[str] = None
        self.failures = 0
        self._retry = False
        self._last_save = time.monotonic()
        self._thread: Optional[threading.Thread] = None
        self._outcome: Optional[SaveOutcome] = None
        self._async_run = False
        self._staged: Optional[threading.Event] = None
        self.slowest_save: Optional[float] = None  # seconds, what a session deadline must leave room for
        self._last_step_end = time.monotonic()

    # -- policy --------------------------------------------------------------------------------
    def due(self, step: int, agree: Callable[[bool], bool]) -> bool:
        """Whether to save after `step` (every_n_steps, every_minutes, or retry after a failure)."""
        if self._retry or (self.ck.every_n_steps and step % self.ck.every_n_steps == 0):
            return True
        if self.ck.every_minutes:
            return agree(time.monotonic() - self._last_save >= self.ck.every_minutes * 60)
        return False

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_step_end(self) -> None:
        """Called after each optimizer step: surfaces background results, feeds `auto` timing."""
        now = time.monotonic()
        if self.auto is not None:
            self.auto.on_step(now - self._last_step_end, self.busy)
        self._last_step_end = now
        if self._thread is not None and not self._thread.is_alive():
            self._collect()

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, capture: Callable[[], fmt.Snapshot], metrics: dict[str, Any], final: bool = False) -> None:
        """Save the state after `step`. `final` saves (end, stop) run sync and must succeed."""
        if self.busy:
            if self.ck.when_busy == "skip" and not final:
                log.info("checkpoint at step %d skipped: the previous save is still being written (checkpoint.when_busy=skip)", step)
                return
            self._wait()
        elif self._thread is not None:
            self._collect()
        self._retry = False  # this save is the retry; a failure sets it again when collected
        run_async = not final and (self.ck.async_save == "true" or (self.auto is not None and self.auto.next_is_async()))
        started = time.monotonic()
        snapshot = capture()
        progress = snapshot.train["progress"]
        files = fmt.encode_files(snapshot, self.rank, shared=self.rank == 0)
        meta = {
            **self.meta,
            "epoch": progress["epoch"],
            "cursor": progress["cursor"],
            "samples_seen": progress["samples_seen"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        }
        if run_async:
            if self.auto is not None and self.auto.decided is None:
                self.auto.started_async(time.monotonic() - started)
            self._async_run = True
            self._staged = threading.Event()
            self._thread = threading.Thread(target=self._run_async, args=(step, files, meta, self._staged), name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            self._async_run = False
            self._run(step, files, meta)
            self._collect(final=final)
            if self.auto is not None and self.auto.sync_stall is None and not final:
                self.auto.sync_stall = time.monotonic() - started
        self._last_save = time.monotonic()

    def before_update(self) -> None:
        """Called before the optimizer changes any state: a background save must have copied it.

        The copy into host buffers runs in the writer thread and overlaps the next step's forward
        and backward pass, which only read the weights; only what is left of it stalls training.
        """
        staged, self._staged = self._staged, None
        if staged is not None and not staged.is_set():
            started = time.monotonic()
            staged.wait()
            if self.auto is not None and self.auto.decided is None:
                self.auto.add_stall(time.monotonic() - started)

    def finish(self) -> None:
        """Wait for a save in flight and the mirror; raise if the save failed."""
        if self._thread is not None:
            self._wait(final=True)
        if self.mirror is not None and self.rank == 0:
            self.mirror.close()

    def _wait(self, final: bool = False) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
        self._collect(final=final)

    def _collect(self, final: bool = False) -> None:
        """Act on the outcome of the last save: reset, warn and retry later, or stop."""
        outcome, self._outcome = self._outcome, None
        was_async, thread, self._thread = self._async_run, self._thread, None
        if outcome is None and thread is not None:  # the writer thread died without a word
            outcome = SaveOutcome(step=-1, ok=False, error=f"the background writer {thread.name} died")
        if outcome is None:
            return
        if was_async and self.auto is not None and self.auto.decided is None:
            self.auto.finished_async()
        if outcome.fenced:
            raise FencedError(outcome.error or "stale lease")
        if outcome.ok:
            self.failures, self._retry = 0, False
            if outcome.path:
                self.last_path = outcome.path
            return
        self.failures += 1
        last = self.last_path or "none yet"
        if final or self.failures >= self.ck.max_consecutive_failures:
            raise CheckpointError(
                f"checkpoint at step {outcome.step} failed ({outcome.error}); "
                f"{self.failures} failure(s) in a row; the last valid checkpoint is {last}"
            )
        self._retry = True
        log.warning(
            "checkpoint at step %d failed (%s); training goes on and retries at the next step (%d/%d failures); last valid: %s",
            outcome.step, outcome.error, self.failures, self.ck.max_consecutive_failures, last,
        )

    def _run_async(self, step: int, files: fmt.EncodedFiles, meta: dict[str, Any], staged: threading.Event) -> None:
        try:
            files.stage(self.buffers)
        except Exception as exc:
            self._outcome = SaveOutcome(step, ok=False, error=f"copying the state to host memory failed: {type(exc).__name__}: {exc}")
            return
        finally:
            staged.set()
        self._run(step, files, meta)

    def _run(self, step: int, files: fmt.EncodedFiles, meta: dict[str, Any]) -> None:
        """The save protocol; never raises (the outcome is collected on the main thread)."""
        started = time.monotonic()
        try:
            self._outcome = self._protocol(step, files, meta)
        except Exception as exc:  # a bug or an unexpected error: report like any failed save
            self._outcome = SaveOutcome(step, ok=False, error=f"{type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - started
        self.slowest_save = max(self.slowest_save or 0.0, elapsed)

    def _protocol(self, step: int, files: fmt.EncodedFiles, meta: dict[str, Any]) -> SaveOutcome:
        c, rank = self.collective, self.rank
        decision: Optional[dict[str, Any]] = None
        if rank == 0:
            decision = _guard(lambda: self._begin(step))
        decision = c.broadcast(decision)
        if not decision["ok"] or decision.get("skip"):
            return SaveOutcome(step, ok=decision["ok"], error=decision.get("error"), fenced=decision.get("fenced", False),
                               skipped=bool(decision.get("skip")), path=decision.get("path"))
        written = _guard(lambda: {"records": self.manager.write_files(step, files.serialize())})
        everyone = c.gather(written)
        result: Optional[dict[str, Any]] = None
        if rank == 0:
            failed = [w["error"] for w in everyone if not w["ok"]]
            if failed:
                result = {"ok": False, "error": failed[0]}
            else:
                records = {name: rec for w in everyone for name, rec in w["records"].items()}
                result = _guard(lambda: self._commit(step, records, meta))
        result = c.broadcast(result)
        return SaveOutcome(step, ok=result["ok"], error=result.get("error"), fenced=result.get("fenced", False), path=result.get("path"))

    def _begin(self, step: int) -> dict[str, Any]:
        if self.lease is not None:
            self.lease.check(f"to save step {step}")
        if not self.manager.prepare(step):
            return {"skip": True, "path": self.manager.info(step).path}
        return {}

    def _commit(self, step: int, records: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        if self.lease is not None:
            self.lease.check(f"to commit step {step}")
            meta = {**meta, "writer": {**meta.get("writer", {}), "incarnation": self.lease.incarnation}}
        info = self.manager.commit(step, records, meta)
        if info.status != COMMITTED:  # a file landed short (a Drive upload, a full disk)
            raise CheckpointError(f"step {step} was written but does not check out: {info.reason}")
        if self.lease is not None:
            self.lease.check(f"to prune after step {step}")
        try:
            removed = self.manager.prune(self.policy, step)
        except Exception as exc:  # a store refusing deletes (full Drive trash) must not fail the save
            log.warning("checkpoint at step %d committed, but pruning older ones failed (%s: %s)", step, type(exc).__name__, exc)
        else:
            if removed:
                log.debug("pruned checkpoints at steps %s", removed)
        if self.mirror is not None:
            self.mirror.submit(step)
        return {"path": info.path}


def _guard(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one phase of the protocol, turning exceptions into a result every rank can act on."""
    try:
        return {"ok": True, **fn()}
    except FencedError as exc:
        return {"ok": False, "fenced": True, "error": str(exc)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
