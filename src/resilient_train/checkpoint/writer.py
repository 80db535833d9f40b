"""The background writer: one save at a time in a thread, overlapping training.

The thread first copies the state's tensors into reused host buffers (while the next step's
forward and backward run: they only read the weights), signals `staged`, then runs the commit
protocol. The loop waits for `staged` before the optimizer changes any state, and for the whole
save before the next one or before the process ends: a daemon thread killed at interpreter exit
in the middle of a copy aborts the process ("terminate called without an active exception").

Whatever the save raises (a collective whose peer died under DDP: "Connection closed by peer")
becomes its FAILED outcome, reported by the saver in one line like any failed save, with the
traceback at debug level; it is never re-raised in the thread, which would print the thread's
own traceback. Only a BaseException (the process itself dying) still propagates.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Callable, Optional

from resilient_train.checkpoint.protocol import Result, SaveOutcome


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


class BackgroundWriter:
    """Runs `stage` then `save` in a thread; hands the outcome back to the main thread."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._outcome: Optional[SaveOutcome] = None
        self._step = -1
        self.staged: Optional[threading.Event] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> bool:
        """A save was started and its outcome not collected yet."""
        return self._thread is not None

    def start(self, step: int, stage: Callable[[], None], save: Callable[[], SaveOutcome]) -> None:
        if self._thread is not None:
            raise RuntimeError("a background save is still pending")  # the saver collects first
        staged = self.staged = threading.Event()
        self._outcome, self._step = None, step

        def work() -> None:
            try:
                try:
                    stage()
                except Exception as exc:  # noqa: BLE001 - reported as this save's outcome
                    self._outcome = SaveOutcome(step, Result.FAILED,
                                                error=f"copying the state to host memory failed: {type(exc).__name__}: {exc}")
                    return
                finally:
                    staged.set()
                self._outcome = save()
            except Exception as exc:  # noqa: BLE001 - e.g. a collective whose peer died: this save's outcome, one line
                self._outcome = SaveOutcome(step, Result.FAILED, error=f"the save failed: {type(exc).__name__}: {_first_line(exc)}",
                                            traceback=traceback.format_exc())
            except BaseException as exc:  # noqa: BLE001 - even a simulated process death leaves an outcome
                self._outcome = SaveOutcome(step, Result.FAILED, error=f"the background writer died: {type(exc).__name__}: {exc}")
                raise

        self._thread = threading.Thread(target=work, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()

    def wait_staged(self) -> float:
        """Block until the state is copied; returns the seconds waited."""
        staged, self.staged = self.staged, None
        if staged is None or staged.is_set():
            return 0.0
        started = time.monotonic()
        staged.wait()
        return time.monotonic() - started

    def collect(self, timeout: Optional[float] = None) -> Optional[SaveOutcome]:
        """Wait (up to `timeout` seconds) for the save; its outcome, or None if none is pending.

        A save still running after `timeout` gives a FAILED outcome saying so; the thread is left
        to finish on its own (its files carry its own names; an unfinished save never commits).
        """
        thread = self._thread
        if thread is None:
            return None
        thread.join(timeout)
        if thread.is_alive():
            return SaveOutcome(self._step, Result.FAILED, error=f"the save of step {self._step} did not finish within {timeout:.0f}s")
        self._thread = None
        outcome, self._outcome = self._outcome, None
        if outcome is None:
            outcome = SaveOutcome(self._step, Result.FAILED, error=f"the background writer {thread.name} died without an outcome")
        return outcome
