"""The few collectives a save needs, on a dedicated gloo group (identity on one process).

A background save talks to the other ranks from its writer thread; giving it a group of its own
keeps its messages from ever interleaving with the collectives training issues on the default
group at the same time.
"""

from __future__ import annotations

from typing import Any, Optional


class Collective:
    """broadcast from rank 0 and all-gather of small picklable objects among the ranks of a run."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size, self.rank = world_size, rank
        self.group: Optional[Any] = None
        if world_size > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.group is None:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
