"""`checkpoint.mirror`: every committed checkpoint is copied to a second storage in the background.

Typical use: `run_dir` on fast local disk, the mirror on Drive or GCS. The copy is verified at the
mirror under names of its own and committed there by creating the manifest only if absent, so
a committed checkpoint at the mirror is never written again; retention applies there too. Run files
are copied only when they changed. While one copy is
running, newer checkpoints replace the pending one (the mirror wants the newest, not every one).
A failing mirror warns and never stops training: the primary copy is intact.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from resilient_train.checkpoint.manager import CheckpointManager
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.checkpoint.transfer import Conflict, RunFileCopier, SourceVanished, check_same_run, copy_checkpoint
from resilient_train.errors import UsageError
from resilient_train.storage import Storage

log = logging.getLogger("resilient_train")


class Mirror:
    """Copies checkpoints from the run folder to a mirror run folder, one at a time."""

    def __init__(self, primary: Storage, mirror: Storage, policy: RetentionPolicy) -> None:
        self.primary = primary
        self.mirror = mirror
        self.source = CheckpointManager(primary)
        self.target = CheckpointManager(mirror)
        self.policy = policy
        self.run_files = RunFileCopier(primary, mirror)  # copies only what changed since last time
        self._lock = threading.Lock()
        self._pending: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self.copied: list[int] = []
        self._checked_run = False  # the mirror must hold this run (or nothing) before a first copy
        self._disabled = False
        self.errors: list[str] = []

    def submit(self, step: int) -> None:
        """Copy checkpoint `step` soon (replacing any copy that is still only pending)."""
        with self._lock:
            self._pending = step
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        try:
            self._copy_pending()
        finally:  # even a thread dying of something unforeseen must not leave close() waiting
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _copy_pending(self) -> None:
        if not self._checked_run:
            try:
                check_same_run(self.primary, self.mirror)
            except UsageError as exc:  # another run lives there: never touch it
                self.errors.append(str(exc))
                log.warning("checkpoint.mirror disabled: %s", exc)
                self._disabled = True
            self._checked_run = True
        while True:
            with self._lock:
                step, self._pending = self._pending, None
                if self._disabled:
                    step = None
                if step is None:
                    self._thread = None  # under the lock: a later submit starts a new thread
                    return
            try:
                self.run_files.copy()
                info = self.source.info(step)
                copy_checkpoint(self.source, self.target, info)
                self.target.prune(self.policy, step)
                self.target.collect_garbage()  # what a copy cut short by a crash left behind
                self.copied.append(step)
            except SourceVanished:  # the primary pruned it meanwhile: a newer one is coming
                log.debug("mirror: step %d was pruned at the primary before it was copied", step)
            except Conflict as exc:
                message = f"mirror copy of step {step} to {self.mirror.url} skipped: {exc}"
                self.errors.append(message)
                log.warning("%s", message)
            except Exception as exc:  # the primary is fine; say so and carry on
                message = f"mirror copy of step {step} to {self.mirror.url} failed: {type(exc).__name__}: {exc}"
                self.errors.append(message)
                log.warning("%s; training goes on, the next checkpoint will be mirrored", message)

    def close(self) -> None:
        """Wait for the copy in flight (the final checkpoint must reach the mirror)."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None or not thread.is_alive():
                return
            thread.join()
