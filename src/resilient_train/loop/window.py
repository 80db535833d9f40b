"""The log window: every `trainer.log_every_n_steps` steps, one line (or bar postfix) and one metrics row.

The loss of the window's last step is averaged across ranks; throughput counts the window's
optimizer steps; custom metrics from `training_step` are averaged over the window (and across
ranks, by name); device statistics come from rank 0.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from lightning_fabric import Fabric

from resilient_train.config import TrainerConfig
from resilient_train.gpu_stats import DeviceStats
from resilient_train.loop.comm import all_reduce, gather_objects
from resilient_train.run.metrics import MetricsLogger
from resilient_train.step_metrics import MetricWindow, Ranks

log = logging.getLogger("resilient_train")


class LogWindow:
    """Collects a window's custom metrics and timing; `close` reports and starts the next window."""

    def __init__(self, fabric: Fabric, cfg: TrainerConfig, metrics: Optional[MetricsLogger], bar: Any, global_batch: int) -> None:
        self.fabric, self.cfg, self.metrics, self.bar = fabric, cfg, metrics, bar
        self.global_batch = global_batch
        self.custom = MetricWindow()  # what training_step returns besides the loss
        self.ranks = None if fabric.world_size == 1 else Ranks(lambda names: gather_objects(fabric, names),
                                                               lambda t: all_reduce(fabric, t, "sum"))
        self.device_stats = DeviceStats(fabric.device) if cfg.gpu_stats and fabric.global_rank == 0 else None
        self._start, self._steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self._steps += 1
        self.bar.update(1)

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.cfg.log_every_n_steps == 0 or last_step

    def close(self, step: int, epoch: int, loss_sum: torch.Tensor, micro_batches: int, lr: float) -> float:
        """Report the window ending at `step`; returns its loss (mean over ranks)."""
        fabric = self.fabric
        # in the accumulator's dtype: ForwardBackward.run hands a lone micro-batch's loss over unconverted
        total = loss_sum.to(torch.get_default_dtype())
        loss = all_reduce(fabric, total / micro_batches, "mean").item()
        elapsed = time.perf_counter() - self._start
        rate = self._steps * self.global_batch / elapsed if elapsed > 0 else float("nan")
        self._start, self._steps = time.perf_counter(), 0
        extra = {**self.custom.read(self.ranks, fabric.device), **(self.device_stats.read() if self.device_stats is not None else {})}
        if fabric.global_rank == 0:
            self._show(step, epoch, loss, lr, extra)
        if self.metrics is not None:
            self.metrics.log(step, epoch=epoch, loss=loss, lr=lr, samples_per_sec=round(rate, 2), **extra)
        return loss

    def _show(self, step: int, epoch: int, loss: float, lr: float, extra: dict[str, float]) -> None:
        """A window's figures: on the bar's postfix, or as one line when there is no bar."""
        memory = extra.get("gpu_mem_peak_gb", extra.get("cpu_mem_gb"))
        shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        shown.update({name: f"{value:.4g}" for name, value in extra.items() if not name.startswith(("gpu_", "cpu_"))})
        if memory is not None:
            shown["mem"] = f"{memory:.2f}G"
        if self.cfg.progress_bar:
            self.bar.set_postfix(shown, refresh=False)
        else:  # no bar: a long run must still say how it is doing
            log.info("step %d/%d (epoch %d) %s", step, self.cfg.max_steps, epoch, " ".join(f"{k} {v}" for k, v in shown.items()))


def progress_bar(fabric: Fabric, cfg: TrainerConfig, initial: int) -> Any:
    """tqdm over optimizer steps on global rank 0 (disabled elsewhere, or when progress_bar is off)."""
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=fabric.global_rank != 0 or not cfg.progress_bar, mininterval=0.5)
