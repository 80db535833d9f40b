"""Custom metrics a `training_step` returns beside its loss, averaged over each log window.

`training_step` may return a scalar loss or a mapping `{"loss": loss, "accuracy": acc, ...}`.
The extra scalars are summed on the device as they come (tensors stay tensors: reading one with
`.item()` every step would synchronise the GPU) and turned into numbers once per log window,
averaged over the window's micro-batches and, under DDP, over the ranks in one all-reduce. The
names the trainer logs itself are refused so a user's metric never silently overwrites them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from resilient_train.errors import UsageError

RESERVED = frozenset({"session", "step", "epoch", "time", "loss", "lr", "samples_per_sec", "val_loss"})


def split_output(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """(loss, extra scalars) of what `training_step` returned: a loss, or a mapping holding "loss"."""
    if not isinstance(out, Mapping):
        return out, {}
    if "loss" not in out:
        raise UsageError(f"training_step returned a mapping without 'loss' (keys: {', '.join(map(str, out))}); "
                         "return {'loss': loss, ...}")
    extras = {}
    for name, value in out.items():
        if name == "loss":
            continue
        if not isinstance(name, str) or name in RESERVED:
            raise UsageError(f"training_step returned the metric {name!r}, a name the trainer logs itself; rename it")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise UsageError(f"training_step's metric {name!r} has shape {tuple(value.shape)}; return a scalar")
            value = value.detach()
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"training_step's metric {name!r} is a {type(value).__name__}; return a number or a scalar tensor")
        extras[name] = value
    return out["loss"], extras


class MetricWindow:
    """Sums of the extra metrics over the current log window, read (and reset) at log time."""

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._weight = 0.0

    def add(self, extras: Mapping[str, Any], weight: float = 1.0) -> None:
        """Add one micro-batch's metrics (`weight`: its share of the batch when it ran in chunks)."""
        for name, value in extras.items():
            scaled = value.float().reshape(()) * weight if isinstance(value, torch.Tensor) else float(value) * weight
            self._sums[name] = self._sums[name] + scaled if name in self._sums else scaled
        if extras:
            self._weight += weight

    def merge(self, other: MetricWindow) -> None:
        """Take over another window's sums (a retried step's successful attempt)."""
        for name, value in other._sums.items():
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._weight += other._weight

    def read(self, all_reduce_mean: Optional[Callable[[torch.Tensor], torch.Tensor]], device: torch.device) -> dict[str, float]:
        """The window's means (across ranks too, when `all_reduce_mean` is given); then reset.

        Every rank must return the same metric names: the mean is one all-reduce of their values.
        """
        if not self._sums:
            return {}
        names = sorted(self._sums)
        values = torch.stack([torch.as_tensor(self._sums[name], dtype=torch.float32, device=device).reshape(())
                              for name in names]) / max(self._weight, 1e-12)
        if all_reduce_mean is not None:
            values = all_reduce_mean(values)
        self._sums, self._weight = {}, 0.0
        return {name: float(value) for name, value in zip(names, values.tolist(), strict=True)}
