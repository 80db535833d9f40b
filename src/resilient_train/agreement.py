"""Agreeing across ranks on "stop now" and "save now" without blocking the host on every step.

Signals reach only some processes and wall clocks differ per rank, so these decisions need a
collective. A blocking all-reduce read with `.item()` on every step stalls the host until the
device has caught up, which stops the CPU from queueing work ahead. Instead each step starts an
asynchronous all-reduce of the flags on a small CPU (gloo) group of its own and reads the one
started a step earlier, which has long finished by then: nothing waits for the GPU, and every
rank acts on the same values at the same step. The price is stated in the docs: a stop or a
time-based save takes effect one optimizer step after it was requested.

On one process there is nothing to agree on: the flags apply at once.
"""

from __future__ import annotations

from typing import Any, Optional


class StepAgreement:
    """Exchange per-step flags (stop requested, time-based save due) among the ranks of a run."""

    FIELDS = 2  # [stop requested on any rank, time-based save due on rank 0]

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank
        self._group: Optional[Any] = None
        self._pending: Optional[tuple[Any, Any]] = None  # (work, tensor) of the last step
        if world_size > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")

    def exchange(self, stop: bool, save_due: bool) -> tuple[bool, bool]:
        """Offer this step's flags; returns the flags every rank agreed on (a step late under DDP).

        `save_due` counts only on rank 0 (one clock decides, so ranks never disagree).
        """
        if self._group is None:
            return stop, save_due
        import torch
        import torch.distributed as dist

        agreed = (False, False)
        if self._pending is not None:
            work, flags = self._pending
            work.wait()  # started a whole step ago: done; a CPU tensor, no device sync
            agreed = (bool(flags[0] > 0), bool(flags[1] > 0))
        flags = torch.tensor([float(stop), float(save_due and self.rank == 0)])
        self._pending = (dist.all_reduce(flags, group=self._group, async_op=True), flags)
        return agreed

    def close(self) -> None:
        """Finish the exchange in flight (every rank started the same number of them)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
