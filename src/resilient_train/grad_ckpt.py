"""Gradient checkpointing: recompute the activations of repeated blocks in the backward pass.

Blocks are the children of every `nn.ModuleList` plus modules whose class name the user lists.
Each block's `forward` is replaced on the instance by one that runs the class's forward under
non-reentrant `torch.utils.checkpoint`, so parameter names (and thus checkpoints) do not change,
and RNG state is replayed on recomputation so dropout masks match the unwrapped model's.
"""

from __future__ import annotations

import inspect
import types
import warnings
from typing import Any, Iterable, Optional

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
    """Turn checkpointing on; returns a short description of what was done.

    A model with its own switch (Hugging Face) uses it, because only the model knows which of its
    layers to wrap and what else must change (input gradients for PEFT, the KV cache off).
    transformers 5.x names it `activation_checkpointing_enable` and deprecates
    `gradient_checkpointing_enable` (removed in v6): the new name first, the old one for older
    versions, non-reentrant either way.
    """
    own = _own_switch(model)
    if own is not None:
        return own
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


def _own_switch(model: nn.Module) -> Optional[str]:
    """Call the model's own checkpointing switch when it has one; None when it has none."""
    for name, kwargs_name in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                              ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        enable = getattr(model, name, None)
        if not callable(enable):
            continue
        with warnings.catch_warnings():
            # a model class that still overrides the deprecated method is reached through it by
            # transformers itself; that is the model's business, not a warning for the user
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
            if kwargs_name in inspect.signature(enable).parameters:
                enable(**{kwargs_name: {"use_reentrant": False}})
            else:  # older transformers, or a model's own switch without options
                enable()
        return f"model's own {name}()"
    return None
