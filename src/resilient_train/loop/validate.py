"""Validation that cannot change what training draws next."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from lightning_fabric import Fabric

from resilient_train import state as state_lib
from resilient_train.loop.comm import all_reduce
from resilient_train.loop.parts import StepFn
from resilient_train.step_metrics import split_output

log = logging.getLogger("resilient_train")


def validate(fabric: Fabric, model: Any, loader: Any, step_fn: StepFn, max_batches: Optional[int]) -> float:
    """Mean loss over (up to `max_batches` of) the validation data, averaged across ranks.

    Every submodule gets its own mode back (a part the user froze in eval mode stays so), and the
    RNG streams are put back where training left them, so validation (and its cadence) cannot
    change what training draws.
    """
    modes = [(module, module.training) for module in model.modules()]
    rng = state_lib.capture_rng()
    model.eval()
    total = torch.zeros(2, device=fabric.device)
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                total[0] += split_output(step_fn(model, fabric.to_device(batch)))[0].float()
                total[1] += 1
    finally:
        for module, training in modes:
            module.training = training
        for problem in state_lib.restore_rng(rng):
            log.warning("after validation: %s", problem)
    total = all_reduce(fabric, total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()
