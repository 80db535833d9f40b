"""Fitting the device micro-batch to whatever GPU the session got, without changing the samples.

Colab hands out a T4 one day and an A100 the next; a micro-batch that fits the A100 runs out of
memory on the T4. The sampler is left alone: it still deals out `trainer.batch_size` samples per
rank per micro-step, in the same order, with the same per-batch seeds. What changes is how a
loaded batch goes through the model: in chunks of `trainer.micro_batch_size` samples along
dimension 0, each chunk's loss weighted by its share of the batch, gradients accumulated. So the
samples per optimizer step and the order in which they are seen stay exactly those of the run
(sample-exact); only the floating-point summation order of the gradient differs.

With `trainer.micro_batch_size=auto` a step that runs out of memory is retried from its start
with chunks half as large: the failed attempt's gradients are dropped, the RNG streams are put
back where the step began (dropout draws the same masks again), and nothing was logged yet. The
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


def batch_length(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (searched in mappings and sequences)."""
    found = _first_tensor(batch)
    if found is None:
        raise UsageError(
            f"trainer.micro_batch_size needs batches that hold tensors to split along dimension 0; "
            f"got a {type(batch).__name__} without any"
        )
    return int(found.shape[0])


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return None
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def split_batch(batch: Any, size: int) -> list[tuple[Any, int]]:
    """The batch cut into chunks of `size` samples along dimension 0, each with its sample count.

    Tensors and lists whose length is the batch's are cut; anything else (a 0-d tensor, a string,
    a list of another length) is handed to every chunk unchanged. Mappings keep their type where
    it can be rebuilt from a dict (a Hugging Face BatchEncoding can), tuples and named tuples too.
    """
    n = batch_length(batch)
    if size >= n:
        return [(batch, n)]
    return [(_slice(batch, n, lo, min(lo + size, n)), min(lo + size, n) - lo) for lo in range(0, n, size)]


def _slice(value: Any, n: int, lo: int, hi: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[lo:hi] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, Mapping):
        items = {key: _slice(item, n, lo, hi) for key, item in value.items()}
        rebuild: Any = type(value)
        try:
            return rebuild(items)
        except Exception:  # noqa: BLE001 - a mapping type that cannot be rebuilt from a dict
            return items
    if isinstance(value, tuple):
        items_t = [_slice(item, n, lo, hi) for item in value]
        return type(value)(*items_t) if hasattr(value, "_fields") else type(value)(items_t)
    if isinstance(value, list):
        if len(value) == n and not any(isinstance(item, torch.Tensor) for item in value):
            return value[lo:hi]  # per-sample items: strings, ids
        return [_slice(item, n, lo, hi) for item in value]
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
        assert self.run is not None
        try:
            if not self.run.exists(RECORD):
                return {}
            value = loads_json(self.run.read_bytes(RECORD), RECORD)
        except Exception as exc:  # noqa: BLE001 - a damaged record costs one retry, never the run
            log.warning("ignoring %s (%s: %s); the micro-batch is found again", self.run.display(RECORD), type(exc).__name__, exc)
            return {}
        return value if isinstance(value, dict) else {}

    def _remember(self) -> None:
        if self.run is None:
            return
        records = {key: value for key, value in self._records().items() if isinstance(value, int)}
        records[self.device] = self.size
        try:
            self.run.write_bytes(dumps_json(records), RECORD)
        except Exception as exc:  # noqa: BLE001 - the next session finds the size again
            log.warning("could not record the micro-batch in %s (%s: %s)", self.run.display(RECORD), type(exc).__name__, exc)
