"""Turning what the user handed to `fit` into the parts the loop runs: step function, optimizer,
scheduler, accumulation and the device micro-batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from lightning_fabric import Fabric

from resilient_train.config import TrainerConfig
from resilient_train.errors import UsageError
from resilient_train.loop.comm import info
from resilient_train.microbatch import AUTO, MicroBatchFit, device_name
from resilient_train.storage import Storage

# (model, batch) -> loss, or a mapping {"loss": loss, "accuracy": ..., ...} of scalars to log too
StepFn = Callable[[torch.nn.Module, Any], Any]


def default_training_step(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Without a `training_step`, the model's forward output is the loss.

    Mapping batches (dicts, and UserDicts such as Hugging Face's BatchEncoding) become keyword
    arguments and tuples positional ones; the output may be a scalar tensor, an object with
    `.loss` (Hugging Face) or a mapping with a "loss" entry.
    """
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if hasattr(out, "loss") and isinstance(out.loss, torch.Tensor):
        return out.loss
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return out
    if hasattr(out, "loss") and getattr(out, "loss", None) is None:
        raise UsageError(_no_loss_message(batch))
    raise UsageError(
        "the model's output is not a scalar loss (nor has .loss); pass training_step=(model, batch) -> loss"
    )


def _no_loss_message(batch: Any) -> str:
    """Why a model with a `.loss` output computed none: a Hugging Face model computes its loss only
    when the batch holds `labels` (a dataset's `label` column is renamed by its data collators, not
    by a plain DataLoader)."""
    keys = sorted(str(k) for k in batch) if isinstance(batch, Mapping) else []
    hint = "; the batch has 'label': rename it to 'labels'" if "label" in keys and "labels" not in keys else ""
    seen = f" (batch keys: {', '.join(keys)})" if keys else ""
    return ("the model computed no loss (its output's .loss is None): the batch probably lacks 'labels'"
            f"{seen}{hint}, or pass training_step=(model, batch) -> loss")


def make_optimizer(optimizer: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer itself, or built by the user's factory from the parameters (already on device)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        built = optimizer(model.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise UsageError(f"the optimizer factory returned {type(built).__name__}, not a torch.optim.Optimizer")
        return built
    raise UsageError(f"optimizer must be a torch.optim.Optimizer or a callable params -> optimizer, got {type(optimizer).__name__}")


def make_scheduler(scheduler: Any, optimizer: Any) -> Any:
    """The scheduler itself, or built by the user's factory from the (unwrapped) optimizer."""
    if scheduler is None or (hasattr(scheduler, "step") and hasattr(scheduler, "state_dict")):
        return scheduler
    if callable(scheduler):
        return scheduler(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
    raise UsageError(f"scheduler must be an LR scheduler or a callable optimizer -> scheduler, got {type(scheduler).__name__}")


def check_scheduler_horizon(scheduler: Any, step: int, max_steps: int) -> None:
    """Refuse (exit 2) before training a schedule that cannot reach `max_steps`.

    OneCycleLR keeps `total_steps` in its state (a resume restores it over the rebuilt one) and
    raises "Tried to step N times" past it: `resume RUN trainer.max_steps=MORE` on a finished
    one-cycle run would print its resume line, then crash, on every later resume too.
    """
    total = getattr(scheduler, "total_steps", None)
    taken = getattr(scheduler, "last_epoch", None)
    if not isinstance(total, int) or not isinstance(taken, int) or isinstance(total, bool):
        return
    if taken + (max_steps - step) <= total:
        return
    name = type(scheduler).__name__
    most = step + total - taken
    raise UsageError(
        f"the scheduler {name} was built for total_steps={total} and has stepped {taken} times, so it cannot "
        f"train to trainer.max_steps={max_steps} (it stops at step {most}); set trainer.max_steps={most} or less, "
        f"or start a new run with a schedule that can extend (docs/configuration.md, Extending a run)")


def accumulation(fabric: Fabric, cfg: TrainerConfig, per_micro_step: int) -> int:
    """Micro-batches per optimizer step: configured, or derived from `trainer.global_batch_size`
    so that another world size keeps the same samples per optimizer step."""
    if cfg.global_batch_size is None:
        return cfg.accumulate_grad_batches
    if cfg.global_batch_size % per_micro_step:
        raise UsageError(
            f"trainer.global_batch_size={cfg.global_batch_size} is not a multiple of batch_size x world size "
            f"= {per_micro_step}; choose a global batch that divides evenly"
        )
    micro_batches = cfg.global_batch_size // per_micro_step
    info(fabric, f"global batch {cfg.global_batch_size} = {per_micro_step} per micro-step x {micro_batches} accumulated micro-batches")
    return micro_batches


def micro_batch_fit(fabric: Fabric, cfg: TrainerConfig, loaded: int, run: Storage) -> Optional[MicroBatchFit]:
    """The device micro-batch setting for this session (None: each loaded batch goes in whole)."""
    setting = cfg.micro_batch_size
    if setting is None:
        return None
    if setting == AUTO and fabric.world_size > 1:
        if fabric.global_rank != 0:  # rank 0 says it in one line
            raise SystemExit(UsageError.exit_code)
        raise UsageError(
            "trainer.micro_batch_size=auto needs a single process: under DDP an out-of-memory error on one rank "
            "would leave the others waiting in the gradient all-reduce; set trainer.micro_batch_size=N instead"
        )
    chunking = MicroBatchFit(setting, loaded, device_name(fabric.device), run if fabric.global_rank == 0 else None)
    if chunking.recalled is not None:
        info(fabric, f"device micro-batch {chunking.size} (found on {chunking.device} by an earlier session)")
    elif chunking.splits:
        info(fabric, f"device micro-batch {chunking.size}: each batch of {loaded} goes through in {chunking.chunks()} chunks")
    return chunking
