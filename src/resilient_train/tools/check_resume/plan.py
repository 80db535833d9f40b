"""What one check does: N steps, a checkpoint every E steps, and the two ways it fails.

E = max(2, N // 5) leaves steps between saves, so the interruptions can land between them.
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient_train.errors import ResilientTrainError, UsageError

DEFAULT_STEPS = 20
MIN_STEPS = 10


class NotResumeExact(ResilientTrainError):
    """The interrupted run ended in another state than the straight one (exit 1)."""


class CheckFailed(ResilientTrainError):
    """A run of the check failed, or an interruption could not be made (exit 1)."""


@dataclass(frozen=True)
class Plan:
    """N steps and the checkpoint cadence E that leaves room for kills between saves."""

    steps: int
    every: int

    def overrides(self) -> list[str]:
        """What the check sets on top of the user's overrides (later wins)."""
        return [
            f"trainer.max_steps={self.steps}",
            f"checkpoint.every_n_steps={self.every}",
            "checkpoint.every_minutes=null",  # saves on steps only: "between saves" means something
            "checkpoint.when_busy=wait",  # every cadence save happens: the kills wait for them
            "checkpoint.mirror=null",  # never write into the user's mirror
            "trainer.log_every_n_steps=1",  # a loss per step: where the runs part shows
            "trainer.progress_bar=false",
        ]


def make_plan(steps: int) -> Plan:
    """The plan for `steps` steps; fewer than MIN_STEPS leave no room for three interruptions."""
    if steps < MIN_STEPS:
        raise UsageError(f"--steps must be at least {MIN_STEPS} (three interruptions need room between saves), got {steps}")
    return Plan(steps=steps, every=max(2, steps // 5))
