"""The few collectives the loop needs, typed, and a no-op on a single process."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from lightning_fabric import Fabric

log = logging.getLogger("resilient_train")


def all_reduce(fabric: Fabric, tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Fabric's all-reduce of one tensor (typed for what it returns for a tensor); on one process
    the tensor itself, without Fabric's conversion of the collection (~60 us a logged step)."""
    if fabric.world_size == 1:
        return tensor
    return cast(torch.Tensor, fabric.all_reduce(tensor, reduce_op=op))


def gather_objects(fabric: Fabric, value: Any) -> list[Any]:
    """Every rank's `value` (a short list of metric names) on every rank."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def agree(fabric: Fabric, flag: bool) -> bool:
    """True on every rank when it is true on any (signals may reach only some processes)."""
    if fabric.world_size == 1:
        return flag
    value = all_reduce(fabric, torch.tensor(float(flag), device=fabric.device), "sum")
    return bool(value.item() > 0)


def info(fabric: Fabric, message: str) -> None:
    """One line for the user, from global rank 0 only."""
    if fabric.global_rank == 0:
        log.info(message)
