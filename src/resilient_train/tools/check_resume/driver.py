"""Starting, pausing and signalling the check's child processes, anchored on the checkpoint folder.

Each signal is anchored on what the run's checkpoint listing shows (a save beginning, a checkpoint
committing), never on a sleep. To land a kill at a commit however fast a step is, the run is
paused (SIGSTOP to its process group) between slices of a few milliseconds while that save is in
flight and killed in a pause where the checkpoint is committed; pausing changes no number the run
computes. The checkpoints are read through `CheckpointManager`, so any fsspec URL works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
from resilient_train.storage import Storage
from resilient_train.tools.check_resume.plan import CheckFailed

SLICE_SECONDS = 0.002  # how long the paused run may run between two looks for the manifest
POLL_SECONDS = 0.002


class Child:
    """One `python -m resilient_train ...` in its own process group, output into a log file."""

    def __init__(self, args: Sequence[str], log_path: str) -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resilient_train", *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group_signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def interrupt(self, sig: int) -> None:
        """SIGKILL to the whole (paused) group; a stop signal to the main process only, which stops
        its workers itself, then the group continued so it can stop and save."""
        if sig == signal.SIGKILL:
            self.group_signal(signal.SIGKILL)
        else:
            os.kill(self.proc.pid, sig)
            self.group_signal(signal.SIGCONT)

    def wait(self) -> int:
        return self.proc.wait()

    def text(self) -> str:
        """The child's output, shown to the user when it fails (never read for facts)."""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def error_line(self) -> str:
        lines = self.text().splitlines()
        errors = [line[len("error:"):].strip() for line in lines if line.startswith("error:")]
        if errors:
            return errors[-1]
        return next((line.strip() for line in reversed(lines) if line.strip()), "no output")

    def stop(self) -> None:
        """Kill the whole group (on the way out of an error or Ctrl-C)."""
        if self.alive():
            self.group_signal(signal.SIGKILL)
            self.proc.wait()


def stop_signal(run_dir: str) -> int:
    """The signal that asks this run to stop: the first of its `checkpoint.stop_signals`, read
    from the run's own run.yaml (SIGTERM under the defaults, SIGUSR1 where a SLURM setup chose it;
    a SIGTERM the run does not take as a stop would kill it instead)."""
    from resilient_train.run.folder import RunFolder

    names = RunFolder.at(run_dir).read_config().checkpoint.stop_signals
    return int(signal.Signals[names[0]])


class Checkpoints:
    """The checkpoints of one run folder, as the library's own listing sees them."""

    def __init__(self, run_dir: str) -> None:
        self.manager = CheckpointManager(Storage(run_dir))

    def committed(self, step: int) -> bool:
        return self.manager.info(step).status == COMMITTED

    def newest_committed(self) -> int:
        """The newest committed step; 0 when there is none."""
        return max((info.step for info in self.manager.list() if info.status == COMMITTED), default=0)

    def names(self, step: int) -> frozenset[str]:
        """The file names in the folder of `step` now (empty when there is no folder)."""
        return self.manager.info(step).names


class SaveWatch:
    """Tells when a save of `step` begins: a file appears in its folder that was not there before.

    A save killed earlier leaves its folder behind (debris, removed by a later session), so the
    folder's existence alone says nothing; every save attempt writes files under names of its own.
    """

    def __init__(self, checkpoints: Checkpoints, step: int) -> None:
        self.checkpoints, self.step = checkpoints, step
        self.before = checkpoints.names(step)

    def begun(self) -> bool:
        return bool(self.checkpoints.names(self.step) - self.before)


def pause_when(child: Child, ready: Callable[[], bool], what: str, timeout: float) -> bool:
    """Poll `ready` and pause `child` (SIGSTOP to its group) the moment it holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not child.alive():
            return False
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what} did not happen within {timeout:.0f}s; see {child.log_path} (kept with --keep)")
        time.sleep(POLL_SECONDS)
    child.group_signal(signal.SIGSTOP)
    return True


def pause_at_commit(child: Child, watch: SaveWatch, timeout: float) -> bool:
    """Return with `child` paused just after the checkpoint `watch` looks at committed; False if it exited.

    While that save is in flight the child runs in slices of a few milliseconds and is paused
    while we look for the commit, so it cannot get more than a slice past it, however fast its
    steps are.
    """
    step = watch.step
    if not pause_when(child, watch.begun, f"the save of step {step}", timeout):
        return False
    deadline = time.monotonic() + timeout
    while not watch.checkpoints.committed(step):
        if not child.alive():
            return False
        if time.monotonic() > deadline:
            child.group_signal(signal.SIGCONT)
            raise CheckFailed(f"the checkpoint of step {step} did not commit within {timeout:.0f}s; see {child.log_path}")
        child.group_signal(signal.SIGCONT)
        time.sleep(SLICE_SECONDS)
        child.group_signal(signal.SIGSTOP)
    return True
