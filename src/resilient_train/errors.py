"""Exceptions that carry the CLI's exit code, so every layer can fail with the right one.

The exit codes are part of the public contract: 2 bad usage/config/input, 3 nothing to resume or
target not found, 75 stopped early after a committed checkpoint (a supervisor re-runs `resume`).
"""

from __future__ import annotations

import os
from typing import Optional

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_STOPPED = 75


class ResilientTrainError(Exception):
    """Base class of errors a user can cause; the message is one line saying what to do."""

    exit_code = EXIT_FAILED


class UsageError(ResilientTrainError):
    """Bad command line, bad config key or value, bad task file."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


class NotFoundError(ResilientTrainError):
    """The run, checkpoint or file asked for does not exist (or holds no valid checkpoint)."""

    exit_code = EXIT_NOT_FOUND


class CheckpointError(ResilientTrainError):
    """A checkpoint is incomplete or corrupt, or cannot be applied to this model."""


# set, while Fabric starts the other processes of `trainer.devices=N`, to the main process's pid
# (runtime.children_know_their_parent): a process whose parent's pid is there is one of them
MAIN_PID_VAR = "RESILIENT_TRAIN_MAIN_PID"


def stop_exit_code() -> int:
    """EXIT_STOPPED, except in a process Fabric's launcher started for `trainer.devices=N` (0).

    Lightning's launcher SIGKILLs the main process as soon as one of those children exits with a
    code other than 0, and only the main process's code reaches a supervisor. A child that said 75
    would cut the main process short (its mirror upload, its trackers closing) and turn its 75
    into -9, which a `resume` loop reads as a crash. Such a child is a direct child of the process
    the variable names; any other process that inherited the variable says 75.
    """
    return 0 if os.environ.get(MAIN_PID_VAR) == str(os.getppid()) else EXIT_STOPPED


class TrainingStopped(SystemExit):
    """Raised by `Trainer.fit` after a signal or deadline, once a checkpoint is committed.

    It subclasses SystemExit with code 75 so an unmodified training script exits with the code a
    supervisor understands ("resume me"), while notebooks and callers can still catch it (0 in
    the child processes of `trainer.devices=N`, see `stop_exit_code`).
    """

    code: int  # EXIT_STOPPED, or 0 in a child process of Fabric's launcher

    def __init__(self, step: int, reason: str, rank: int = 0, code: Optional[int] = None) -> None:
        super().__init__(stop_exit_code() if code is None else code)
        self.step = step
        self.reason = reason
        self.rank = rank

    def __str__(self) -> str:
        return f"stopped at step {self.step} ({self.reason}); checkpoint committed, resume to continue"


BATCH_LOST = "a batch was lost with the stop"
PEER_LEFT = "another rank left in the middle of it"


class StoppedMidStep(TrainingStopped):
    """A stop that ended a step, or under DDP a validation, in its middle: its signal also took a
    batch still needed (its DataLoader worker killed, or the batch lost in transfer; `cause`
    BATCH_LOST), or another rank's process left a collective this one waited in, after the stop
    signal came (PEER_LEFT: most likely it stopped that way). Half-done state (RNG streams, data
    position, ranks at different collectives) is not a step boundary, so nothing new is saved;
    exit 75, and resume starts from the newest checkpoint. `lost` is what was raised, said as it
    is; `step` is the last finished step."""

    def __init__(self, step: int, reason: str, last_checkpoint: Optional[str], rank: int = 0, lost: str = "",
                 cause: str = BATCH_LOST, in_validation: bool = False, code: Optional[int] = None) -> None:
        super().__init__(step, reason, rank=rank, code=code)
        self.last_checkpoint = last_checkpoint
        self.lost = lost
        self.cause = cause
        self.in_validation = in_validation

    def __str__(self) -> str:
        how = f" ({self.lost})" if self.lost else ""
        during, outcome = ((f"the validation after step {self.step}", "the ranks cannot finish it together")
                           if self.in_validation else (f"step {self.step + 1}", "the step could not finish"))
        return (f"stopped during {during} ({self.reason}): {self.cause}{how}, so {outcome} and nothing new was saved; "
                f"resume continues from {self.last_checkpoint or 'step 0 (no checkpoint yet)'}")


class StoppedBeforeTraining(TrainingStopped):
    """A stop asked for during start-up (the task importing, `build` loading a model): the run
    stops before its first step and saves nothing new; exit 75 all the same, so a supervisor's
    `until resume` loop goes on and the next session starts where the newest checkpoint is."""

    def __init__(self, reason: str, rank: int = 0) -> None:
        super().__init__(0, reason, rank=rank)

    def __str__(self) -> str:
        return f"stopped before training started ({self.reason}); nothing new was saved, resume to continue"
