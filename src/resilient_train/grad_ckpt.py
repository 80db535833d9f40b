"""Gradient checkpointing: recompute the activations of repeated blocks in the backward pass.

Blocks are the children of every `nn.ModuleList` plus modules whose class name the user lists.
Each block's `forward` is replaced on the instance by one that runs the class's forward under
non-reentrant `torch.utils.checkpoint`, so parameter names (and thus checkpoints) do not change,
and RNG state is replayed on recomputation so dropout masks match the unwrapped model's.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from resilient_train.errors import UsageError


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    if not torch.is_grad_enabled():  # evaluation: nothing to save memory on
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def blocks_to_checkpoint(model: nn.Module, class_names: Iterable[str] = ()) -> list[nn.Module]:
    """The modules that get wrapped: ModuleList children and the named classes (outermost only)."""
    names = set(class_names)
    chosen: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            chosen.extend(module.children())
        elif type(module).__name__ in names:
            chosen.append(module)
    unique = list({id(m): m for m in chosen}.values())
    inner = {id(sub) for m in unique for sub in m.modules() if sub is not m}
    return [m for m in unique if id(m) not in inner]


def enable_gradient_checkpointing(model: nn.Module, class_names: Iterable[str] = ()) -> str:
    """Turn checkpointing on; returns a short description of what was done."""
    hf_enable = getattr(model, "gradient_checkpointing_enable", None)
    if callable(hf_enable):
        if "gradient_checkpointing_kwargs" in inspect.signature(hf_enable).parameters:
            hf_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:  # older transformers
            hf_enable()
        return "model's own gradient_checkpointing_enable()"
    blocks = blocks_to_checkpoint(model, class_names)
    if not blocks:
        raise UsageError(
            "trainer.gradient_checkpointing=true but the model has no nn.ModuleList of blocks; "
            "name the block classes in trainer.checkpoint_modules=[MyBlock]"
        )
    for block in blocks:
        if "forward" not in vars(block):
            block.forward = types.MethodType(_checkpointed_forward, block)
    return f"{len(blocks)} block(s) of type {sorted({type(b).__name__ for b in blocks})}"
