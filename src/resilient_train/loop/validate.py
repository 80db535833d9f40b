"""Validation that cannot change what training draws next."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from lightning_fabric import Fabric

from resilient_train import state as state_lib
from resilient_train.loop.comm import all_reduce, gather_objects
from resilient_train.loop.parts import StepFn
from resilient_train.step_metrics import MetricWindow, Ranks, split_output

log = logging.getLogger("resilient_train")


def validate(fabric: Fabric, model: Any, loader: Any, step_fn: StepFn, max_batches: Optional[int]) -> dict[str, float]:
    """`val_loss` and `val_<name>` for every metric `training_step` returns beside its loss, each the
    mean over (up to `max_batches` of) the validation data and across ranks.

    Every submodule gets its own mode back (a part the user froze in eval mode stays so), and the
    RNG streams are put back where training left them, so validation (and its cadence) cannot
    change what training draws.
    """
    modes = [(module, module.training) for module in model.modules()]
    rng = state_lib.capture_rng()
    model.eval()
    total = torch.zeros(2, device=fabric.device)
    extras = MetricWindow()
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                loss, metrics = split_output(step_fn(model, fabric.to_device(batch)))
                total[0] += loss.float()
                total[1] += 1
                extras.add(metrics)
    finally:
        for module, training in modes:
            module.training = training
        for problem in state_lib.restore_rng(rng):
            log.warning("after validation: %s", problem)
    total = all_reduce(fabric, total, "sum")
    ranks = None if fabric.world_size == 1 else Ranks(lambda names: gather_objects(fabric, names),
                                                      lambda t: all_reduce(fabric, t, "sum"))
    means = {f"val_{name}": value for name, value in extras.read(ranks, fabric.device).items()}
    return {"val_loss": (total[0] / total[1].clamp(min=1)).item(), **means}
