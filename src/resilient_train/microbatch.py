"""Fitting the device micro-batch to whatever GPU the session got, without changing the samples.

Colab hands out a T4 one day and an A100 the next; a micro-batch that fits the A100 runs out of
memory on the T4. The sampler is left alone: it still deals out `trainer.batch_size` samples per
rank per micro-step, in the same order, with the same per-batch seeds. What changes is how a
loaded batch goes through the model: in chunks of `trainer.micro_batch_size` samples along
dimension 0, each chunk's loss weighted by its share of the batch, gradients accumulated. So the
samples per optimizer step and the order in which they are seen stay exactly those of the run
(sample-exact). For a loss that is a mean over the batch's samples only the floating-point
summation order of the gradient differs; a summed loss, a mean over tokens of uneven lengths or
layers that couple the samples of a batch (BatchNorm, in-batch negatives) see smaller batches.

With `trainer.micro_batch_size=auto` a step that runs out of memory is retried from its start
with chunks half as large: the failed attempt's gradients are dropped, the RNG streams and the
module buffers (BatchNorm statistics) are put back where the step began (dropout draws the same
masks again), and nothing was logged yet. The
size found is kept per device name in `RUN/micro_batch.json`, so the next session on a T4 starts
at the size that fit the T4 last time instead of running out of memory again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch

from resilient_train.checkpoint.jsonio import dumps_json, loads_json
from resilient_train.errors import ResilientTrainError, UsageError
from resilient_train.storage import Storage

log = logging.getLogger("resilient_train")

RECORD = "micro_batch.json"
AUTO = "auto"


def split_batch(batch: Any, samples: int, size: int) -> list[tuple[Any, int]]:
    """The batch of `samples` samples cut into chunks of `size` along its sample dimension.

    The sample count comes from the sampler, not from the batch, so nothing is guessed: a tensor
    whose first dimension is `samples` is cut; a list or tuple of `samples` items that are not
    themselves batch-shaped tensors (strings, per-sample target dicts, images of their own sizes)
    is cut item-wise; mappings, tuples and lists of fields are walked. Anything else (a 0-d tensor,
    a string, a tensor of another length) goes to every chunk unchanged. A batch in which nothing
    has `samples` along a first dimension is refused: it cannot be split without guessing.
    """
    if size >= samples:
        return [(batch, samples)]
    bounds = [(lo, min(lo + size, samples)) for lo in range(0, samples, size)]
    found = [False]
    chunks = [(_slice(batch, samples, lo, hi, found), hi - lo) for lo, hi in bounds]
    if not found[0]:
        raise UsageError(
            f"trainer.micro_batch_size: found nothing of {samples} samples along a first dimension in the "
            f"{type(batch).__name__} batch, so it cannot be split; give batches of tensors (or mappings, tuples "
            "or lists of them) with the samples along dimension 0, or unset trainer.micro_batch_size"
        )
    return chunks


def _fields(value: Any, n: int) -> bool:
    """Whether a list/tuple holds fields of the batch (walked) rather than one item per sample (cut).

    Of another length than `n` it can only hold fields; of length `n` it holds fields when every
    item carries the batch dimension itself ((inputs, labels) with two samples), else samples.
    """
    return len(value) != n or all(_holds_batch(item, n) for item in value)


def _holds_batch(value: Any, n: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == n
    if isinstance(value, Mapping):
        return any(_holds_batch(item, n) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_batch(item, n) for item in value)
    return False


def _slice(value: Any, n: int, lo: int, hi: int, found: list[bool]) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == n:
            found[0] = True
            return value[lo:hi]
        return value
    if isinstance(value, Mapping):
        items = {key: _slice(item, n, lo, hi, found) for key, item in value.items()}
        rebuild: Any = type(value)
        try:
            return rebuild(items)
        except Exception:  # noqa: BLE001 - a mapping type that cannot be rebuilt from a dict
            return items
    if isinstance(value, (list, tuple)):
        if _fields(value, n):
            parts = [_slice(item, n, lo, hi, found) for item in value]
        else:  # one item per sample
            found[0] = True
            parts = list(value[lo:hi])
        if isinstance(value, tuple):
            return type(value)(*parts) if hasattr(value, "_fields") else type(value)(parts)
        return parts
    return value


def device_name(device: torch.device) -> str:
    """What the recorded size is keyed by: the GPU model ("NVIDIA L4"), or the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class MicroBatchFit:
    """The chunk size in use, and (auto) shrinking it on out-of-memory and remembering it per device."""

    def __init__(self, setting: Any, loaded: int, device: str, run: Optional[Storage] = None) -> None:
        self.auto = setting == AUTO
        self.loaded = loaded  # samples per loaded micro-batch (trainer.batch_size)
        self.device = device
        self.run = run
        self.size = loaded if self.auto else min(int(setting), loaded)
        self.recalled: Optional[int] = None
        if self.auto and run is not None:
            remembered = self._records().get(device)
            if isinstance(remembered, int) and 1 <= remembered < loaded:
                self.size = self.recalled = remembered

    @property
    def splits(self) -> bool:
        return self.size < self.loaded

    def chunks(self) -> int:
        return math.ceil(self.loaded / self.size)

    def shrink(self, step: int, error: str) -> None:
        """Halve the chunk after an out-of-memory error; at one sample there is nothing left to try."""
        if self.size <= 1:
            raise ResilientTrainError(
                f"out of memory at step {step} even with one sample per chunk on {self.device} ({error}); "
                "use a smaller model, gradient checkpointing (trainer.gradient_checkpointing=true) or a larger GPU"
            )
        old, self.size = self.size, max(1, self.size // 2)
        log.info("out of memory at step %d with %d samples per chunk on %s: retrying the step with %d (%d chunks per micro-batch)",
                 step, old, self.device, self.size, self.chunks())
        self._remember()

    def _records(self) -> dict[str, Any]:
        if self.run is None:  # ranks other than 0 keep no record
            return {}
        try:
            if not self.run.exists(RECORD):
                return {}
            value = loads_json(self.run.read_bytes(RECORD), RECORD)
        except Exception as exc:  # noqa: BLE001 - a damaged record costs one retry, never the run
            log.warning("ignoring %s (%s: %s); the micro-batch is found again", self.run.display(RECORD), type(exc).__name__, exc)
            return {}
        if not isinstance(value, dict):
            return {}
        sizes = {key: size for key, size in value.items() if _is_size(size)}
        if len(sizes) != len(value):  # `{"cpu": true}` is no size: it would chunk batches by True
            wrong = ", ".join(sorted(str(key) for key in value if key not in sizes))
            log.warning("ignoring %s's entries for %s (not a whole number of samples >= 1); the micro-batch is found again",
                        self.run.display(RECORD), wrong)
        return sizes

    def _remember(self) -> None:
        if self.run is None:
            return
        records = self._records()
        records[self.device] = self.size
        try:
            self.run.write_bytes(dumps_json(records), RECORD)
        except Exception as exc:  # noqa: BLE001 - the next session finds the size again
            log.warning("could not record the micro-batch in %s (%s: %s)", self.run.display(RECORD), type(exc).__name__, exc)


def _is_size(value: Any) -> bool:
    """A micro-batch size: an int of at least 1 (JSON's true is a bool, which Python calls an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
