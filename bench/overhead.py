"""Per-step overhead of `Trainer.fit` against a hand-written Lightning Fabric loop.

Both run the same model, data and optimizer in one process, alternating, several repetitions.
A step's time is measured from inside the step function (time between consecutive calls over the
steady part of the run), so start-up and the final checkpoint are excluded while everything the
trainer adds per step (sampler, accumulation bookkeeping, stop checks, metric logging) is
included; the progress bar is off to keep the output readable.
Prints the median per-step time of each and their ratio. Goal: ratio <= 1.05.

    .venv/bin/python bench/overhead.py [--steps 150] [--reps 5] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time

import torch
from lightning_fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resilient_train import Trainer


def make_problem(hidden: int, n: int = 8192, dim: int = 256) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
    x = torch.randn(n, dim)
    return model, TensorDataset(x, x.sum(dim=1, keepdim=True))


def step_fn(stamps: list[float]):
    def training_step(model: nn.Module, batch) -> torch.Tensor:
        stamps.append(time.perf_counter())
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    return training_step


def per_step(stamps: list[float], warmup: int = 10) -> float:
    steady = stamps[warmup:]
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def run_trainer(hidden: int, steps: int, batch: int) -> float:
    model, data = make_problem(hidden)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(run_dir=run_dir, max_steps=steps, batch_size=batch, every_n_steps=None, accelerator="cpu", devices=1, progress_bar=False)
        trainer.fit(model, lambda p: torch.optim.AdamW(p, lr=1e-4), data, training_step=step_fn(stamps))
    return per_step(stamps)


def run_fabric(hidden: int, steps: int, batch: int) -> float:
    model, data = make_problem(hidden)
    stamps: list[float] = []
    training_step = step_fn(stamps)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-4))
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=batch, shuffle=True, drop_last=True))
    done = 0
    while done < steps:
        for batch_data in loader:
            loss = training_step(model, batch_data)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return per_step(stamps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    logging.getLogger("resilient_train").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    trainer_times, fabric_times = [], []
    for rep in range(args.reps):
        order = (run_trainer, run_fabric) if rep % 2 == 0 else (run_fabric, run_trainer)
        for fn in order:
            t = fn(args.hidden, args.steps, args.batch)
            (trainer_times if fn is run_trainer else fabric_times).append(t)
        print(f"rep {rep + 1}/{args.reps}: trainer {trainer_times[-1] * 1e3:.2f} ms/step, fabric loop {fabric_times[-1] * 1e3:.2f} ms/step", file=sys.stderr)
    t_med, f_med = statistics.median(trainer_times), statistics.median(fabric_times)
    ratios = [t / f for t, f in zip(trainer_times, fabric_times)]
    print(f"model: 3-layer MLP hidden={args.hidden}, batch={args.batch}, {args.steps} steps x {args.reps} reps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"hand-written Fabric loop: {f_med * 1e3:.2f} ms/step (median)")
    print(f"Trainer.fit:              {t_med * 1e3:.2f} ms/step (median)")
    print(f"ratio (median of per-rep ratios): {statistics.median(ratios):.3f}  [goal <= 1.05]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
