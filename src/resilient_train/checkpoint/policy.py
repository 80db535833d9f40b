"""When to save and how: the save cadence, the async mode and what to do when a save is busy.

Pure decisions, no I/O: the saver asks, the trainer acts. Under DDP every decision that ranks must
agree on is taken on rank 0 and broadcast by the saver (see saver.py), so ranks never pair
different steps in the save's collectives.
"""

from __future__ import annotations

import enum
import logging
import statistics
import time
from collections import deque
from typing import Optional

log = logging.getLogger("resilient_train")


class AsyncMode(str, enum.Enum):
    """`checkpoint.async_save`: always in the background, never, or whichever measures cheaper."""

    TRUE = "true"
    FALSE = "false"
    AUTO = "auto"


class WhenBusy(str, enum.Enum):
    """`checkpoint.when_busy`: a save falls due while the previous one is still being written."""

    WAIT = "wait"
    SKIP = "skip"


class SavePolicy:
    """Whether a save is due after a step: every N steps, every M minutes, or to retry a failure."""

    def __init__(self, every_n_steps: Optional[int], every_minutes: Optional[float]) -> None:
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self.retry = False
        self.last_save = time.monotonic()

    def due(self, step: int, time_due: bool = False) -> bool:
        """Save after `step`? `time_due` is `time_due()` as every rank agreed on it (rank 0's clock)."""
        if self.retry or (self.every_n_steps and step % self.every_n_steps == 0):
            return True
        return bool(self.every_minutes) and time_due

    def time_due(self) -> bool:
        """This process's clock says `every_minutes` have passed since the last save."""
        return bool(self.every_minutes and time.monotonic() - self.last_save >= self.every_minutes * 60)

    def saved(self) -> None:
        self.last_save = time.monotonic()


class AutoAsync:
    """`async_save=auto`: measure one sync save and one async save, keep the cheaper.

    The sync cost is the stall of a whole save. The async cost is the host copy at the step
    boundary plus the extra time steps took while the writer ran (on a small CPU machine the writer
    competes with training for cores, so this can exceed the sync stall). Only rank 0's measurement
    counts: the saver broadcasts its choice.
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
            "async_save=auto: using %s saves (training stalled %.2fs in a sync save, %.2fs in an async one)",
            "async" if self.decided else "sync", self.sync_stall or 0.0, cost,
        )
        return self.decided

