"""One optimizer step's forward and backward: accumulated micro-batches, device chunks, OOM retry.

Gradients of `micro_batches` loaded batches are accumulated with DDP's all-reduce only on the
last one. With `trainer.micro_batch_size` each loaded batch goes through the device in chunks,
each chunk's loss weighted by its share of the batch; with `auto`, an out-of-memory error rolls
the step back (gradients, BatchNorm buffers, RNG streams) and retries it in smaller chunks on the
same samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from lightning_fabric import Fabric

from resilient_train import state as state_lib
from resilient_train.data.source import BatchSource
from resilient_train.loop.parts import StepFn
from resilient_train.microbatch import MicroBatchFit, split_batch
from resilient_train.step_metrics import MetricWindow, split_output

log = logging.getLogger("resilient_train")


@dataclass
class ForwardBackward:
    """Runs the forward and backward passes of one optimizer step; returns the summed loss."""

    fabric: Fabric
    model: Any
    optimizer: Any
    step_fn: StepFn
    stream: BatchSource
    micro_batches: int
    chunking: Optional[MicroBatchFit] = None
    on_resize: Callable[[int], None] = lambda size: None  # told the new device micro-batch after an OOM

    def run(self, progress: state_lib.Progress, window: MetricWindow) -> torch.Tensor:
        """Accumulate one optimizer step's gradients (progress.samples_seen advances); returns the
        summed loss, or with one micro-batch the loss detached but not converted (only a logged
        step reads it, so the conversion is paid there)."""
        if self.chunking is not None:
            return self._chunked(self.chunking, progress, window)
        fabric, model, micro_batches = self.fabric, self.model, self.micro_batches
        if micro_batches == 1:  # the common case: no accumulator (LogWindow.close converts the loss)
            loss, extras = split_output(self.step_fn(model, fabric.to_device(self.stream.next())))
            fabric.backward(loss)
            if extras:
                window.add(extras)
            progress.samples_seen += self.stream.last_consumed
            if loss.dim() != 0:
                torch.zeros((), device=fabric.device).add_(loss.detach())  # the accumulator's error for a non-scalar
            return loss.detach()  # not the loss itself: that would keep its graph until the next step
        loss_sum = torch.zeros((), device=fabric.device)
        for micro in range(micro_batches):
            batch = fabric.to_device(self.stream.next())
            with fabric.no_backward_sync(model, enabled=micro != micro_batches - 1):
                loss, extras = split_output(self.step_fn(model, batch))
                fabric.backward(loss / micro_batches)
            loss_sum += loss.detach()
            window.add(extras)
            progress.samples_seen += self.stream.last_consumed
        return loss_sum

    def _load(self, progress: state_lib.Progress) -> tuple[Any, int]:
        batch = self.stream.next()
        progress.samples_seen += self.stream.last_consumed
        return batch, self.stream.last_local

    def _chunked(self, chunking: MicroBatchFit, progress: state_lib.Progress, window: MetricWindow) -> torch.Tensor:
        """In chunks; with `auto` the step's batches stay on the host so a retry sees the same samples."""
        if not chunking.auto:
            return self._chunks((self._load(progress) for _ in range(self.micro_batches)), chunking.size, window)
        batches = [self._load(progress) for _ in range(self.micro_batches)]
        rng = state_lib.capture_rng()
        buffers = [buffer.detach().clone() for buffer in self.model.buffers()]
        while True:
            attempt = MetricWindow()  # a failed attempt's metrics are dropped with its gradients
            try:
                loss_sum = self._chunks(iter(batches), chunking.size, attempt)
                window.merge(attempt)
                return loss_sum
            except torch.OutOfMemoryError as exc:
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else "OutOfMemoryError"
            # out of the except block: the traceback and the tensors it kept alive are gone
            self._roll_back(buffers, rng, progress.step + 1)
            chunking.shrink(progress.step + 1, error)
            self.on_resize(chunking.size)  # what the next checkpoint records

    def _roll_back(self, buffers: list[torch.Tensor], rng: Any, step: int) -> None:
        """Undo a failed attempt: its gradients, buffer updates and RNG draws."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)  # trainable parameters the optimizer does not hold, too
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for problem in state_lib.restore_rng(rng):
            log.warning("retrying step %d: %s", step, problem)

    def _chunks(self, batches: Iterator[tuple[Any, int]], size: int, window: MetricWindow) -> torch.Tensor:
        """Accumulate gradients over every chunk; each chunk's loss weighs by its share of its batch.

        Exact for a loss that is a mean over the samples of the batch (the usual case); a sum, a
        mean over tokens of uneven lengths or layers that couple the samples of a batch (BatchNorm,
        in-batch negatives) see a different objective in chunks (see trainer.micro_batch_size).
        """
        fabric, model, micro_batches = self.fabric, self.model, self.micro_batches
        loss_sum = torch.zeros((), device=fabric.device)
        for index, (batch, samples) in enumerate(batches):
            chunks = split_batch(batch, samples, size)
            for number, (chunk, count) in enumerate(chunks):
                syncing = index == micro_batches - 1 and number == len(chunks) - 1
                with fabric.no_backward_sync(model, enabled=not syncing):
                    loss, extras = split_output(self.step_fn(model, fabric.to_device(chunk)))
                    weight = count / samples
                    fabric.backward(loss / micro_batches if count == samples else loss * weight / micro_batches)
                loss_sum += loss.detach() * weight
                window.add(extras, weight)
        return loss_sum
