"""Custom metrics a `training_step` returns beside its loss, averaged over each log window.

`training_step` may return a scalar loss or a mapping `{"loss": loss, "accuracy": acc, ...}`.
The extra scalars are summed on the device as they come (tensors stay tensors: reading one with
`.item()` every step would synchronise the GPU) and turned into numbers once per log window,
averaged over the window's micro-batches and, under DDP, over the ranks in one all-reduce. The
names the trainer logs itself are refused so a user's metric never silently overwrites them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from resilient_train.errors import UsageError

_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")
RESERVED = frozenset({"session", "step", "epoch", "time", "loss", "lr", "samples_per_sec", "val_loss"})
# the device statistics (gpu_stats.py: gpu_mem_peak_gb, gpu_util, cpu_mem_gb, ...) and validation's
# val_<name> averages of these metrics share the CSV's columns: a user metric must not take them
RESERVED_PREFIXES = ("gpu_", "cpu_", "val_")


def split_output(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """(loss, extra scalars) of what `training_step` returned: a loss, or a mapping holding "loss"."""
    if type(out) is torch.Tensor or not isinstance(out, Mapping):  # a bare loss: skip the ABC check
        return out, {}
    if "loss" not in out:
        raise UsageError(f"training_step returned a mapping without 'loss' (keys: {', '.join(map(str, out))}); "
                         "return {'loss': loss, ...}")
    extras = {}
    for name, value in out.items():
        if name == "loss":
            continue
        if not isinstance(name, str) or not _PRINTABLE.match(name):
            raise UsageError(f"training_step returned the metric name {name!r}; use a non-empty string without control characters")
        if name in RESERVED or name.startswith(RESERVED_PREFIXES):
            what = "a name the trainer logs itself"
            if name not in RESERVED:
                what += f" (columns starting {', '.join(RESERVED_PREFIXES)} are device statistics and validation averages)"
            raise UsageError(f"training_step returned the metric {name!r}, {what}; rename it")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise UsageError(f"training_step returned {name!r} of shape {tuple(value.shape)} beside the loss; metrics must be "
                                 "scalars (for a Hugging Face output, return out.loss)")
            value = value.detach()
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"training_step's metric {name!r} is a {type(value).__name__}; return a number or a scalar tensor")
        extras[name] = value
    return out["loss"], extras


class MetricWindow:
    """Sums of the extra metrics over the current log window, read (and reset) at log time.

    Each name keeps its own weight, so a metric that appears on some micro-batches only is the
    mean over those, not diluted by the others.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Any] = {}
        self._weights: dict[str, float] = {}

    def add(self, extras: Mapping[str, Any], weight: float = 1.0) -> None:
        """Add one micro-batch's metrics (`weight`: its share of the batch when it ran in chunks)."""
        for name, value in extras.items():
            scaled = value.float().reshape(()) * weight if isinstance(value, torch.Tensor) else float(value) * weight
            self._sums[name] = self._sums[name] + scaled if name in self._sums else scaled
            self._weights[name] = self._weights.get(name, 0.0) + weight

    def merge(self, other: MetricWindow) -> None:
        """Take over another window's sums (a retried step's successful attempt)."""
        for name, value in other._sums.items():
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._weights[name] = self._weights.get(name, 0.0) + other._weights[name]

    def read(self, ranks: Optional[Ranks], device: torch.device) -> dict[str, float]:
        """The window's means (over every rank's micro-batches when `ranks` is given); then reset.

        Under DDP the ranks first agree on the union of their metric names (one small all-gather
        per window), then sum (value, weight) pairs in one all-reduce, so a metric some ranks do
        not return neither hangs the collective nor mixes with another name.
        """
        names = sorted(self._sums)
        if ranks is not None:
            names = sorted({name for names_of_rank in ranks.gather_names(names) for name in names_of_rank})
        if not names:
            return {}
        pairs = torch.zeros(len(names), 2, dtype=torch.float32, device=device)
        for index, name in enumerate(names):
            if name in self._sums:
                pairs[index, 0] = torch.as_tensor(self._sums[name], dtype=torch.float32, device=device).reshape(())
                pairs[index, 1] = self._weights[name]
        if ranks is not None:
            pairs = ranks.sum(pairs)
        self._sums, self._weights = {}, {}
        return {name: float(total / weight) for name, (total, weight) in zip(names, pairs.tolist(), strict=True) if weight > 0}


class Ranks:
    """The two collectives a window needs, given by the trainer (Fabric's, on the training group)."""

    def __init__(self, gather_names: Callable[[list[str]], list[list[str]]], sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.gather_names = gather_names
        self.sum = sum
