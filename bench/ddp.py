"""Per-step cost of `Trainer.fit` under 2-process DDP against a hand-written Fabric DDP loop.

What it measures: whether the trainer's cross-rank bookkeeping (agreeing on stop and save, the
resumable sampler, accumulation) costs step time. Before the asynchronous agreement (see
src/resilient_train/agreement.py) every step did a blocking all-reduce + `.item()`.

Each measurement is a fresh pair of processes (Fabric's launcher starts rank 1 by re-running this
script), alternating trainer and Fabric loop for `--reps` repetitions; rank 0 times its steps from
inside the step function over the steady part of the run. Prints the medians and the median of
the per-repetition ratios. Goal: ratio <= 1.02. CPU/gloo here; on a GPU machine pass
`--accelerator cuda` (NCCL for training; the agreement stays on a CPU gloo group).

    .venv/bin/python bench/ddp.py [--steps 200] [--reps 5] [--hidden 512] [--accelerator cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

WARMUP = 10


def _problem(hidden: int, n: int = 16384, dim: int = 128):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
    x = torch.randn(n, dim)
    return model, TensorDataset(x, x.sum(dim=1, keepdim=True))


def _step_fn(stamps: list[float]):
    from torch import nn

    def training_step(model, batch):
        stamps.append(time.perf_counter())
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    return training_step


def _per_step(stamps: list[float]) -> float:
    steady = stamps[WARMUP:]
    return (steady[-1] - steady[0]) / (len(steady) - 1)


def child(mode: str, steps: int, hidden: int, batch: int, accelerator: str, out: str) -> None:
    import torch

    logging.getLogger("resilient_train").setLevel(logging.WARNING)
    model, data = _problem(hidden)
    stamps: list[float] = []
    if mode == "trainer":
        from resilient_train import Trainer

        run_dir = os.environ["BENCH_RUN_DIR"]  # the same folder for both ranks (rank 1 re-runs this script)
        trainer = Trainer(run_dir=run_dir, max_steps=steps, batch_size=batch, every_n_steps=None,
                          accelerator=accelerator, devices=2, strategy="ddp", progress_bar=False)
        result = trainer.fit(model, lambda p: torch.optim.AdamW(p, lr=1e-4), data, training_step=_step_fn(stamps))
        rank = result.rank
    else:
        from lightning_fabric import Fabric
        from torch.utils.data import DataLoader

        fabric = Fabric(accelerator=accelerator, devices=2, strategy="ddp", precision="32-true")
        fabric.launch()
        rank = fabric.global_rank
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-4))
        loader = fabric.setup_dataloaders(DataLoader(data, batch_size=batch, shuffle=True, drop_last=True))
        step = _step_fn(stamps)
        done = 0
        while done < steps:
            for batch_data in loader:
                loss = step(model, batch_data)
                fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done += 1
                if done == steps:
                    break
        fabric.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"per_step": _per_step(stamps)}, f)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--mode", choices=["trainer", "fabric"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args.mode, args.steps, args.hidden, args.batch, args.accelerator, args.out)
        return 0

    times: dict[str, list[float]] = {"trainer": [], "fabric": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = ("trainer", "fabric") if rep % 2 == 0 else ("fabric", "trainer")
            for mode in order:
                out = os.path.join(tmp, f"{mode}{rep}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--out", out, "--steps", str(args.steps),
                       "--hidden", str(args.hidden), "--batch", str(args.batch), "--accelerator", args.accelerator]
                env = {**os.environ, "BENCH_RUN_DIR": os.path.join(tmp, f"run-{mode}{rep}")}
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
                with open(out) as f:
                    times[mode].append(json.load(f)["per_step"])
            print(f"rep {rep + 1}/{args.reps}: trainer {times['trainer'][-1] * 1e3:.2f} ms/step, "
                  f"fabric loop {times['fabric'][-1] * 1e3:.2f} ms/step", file=sys.stderr)
    ratios = [t / f for t, f in zip(times["trainer"], times["fabric"])]
    print(f"2-process DDP ({args.accelerator}), MLP hidden={args.hidden}, batch {args.batch}/rank, {args.steps} steps x {args.reps} reps")
    print(f"hand-written Fabric DDP loop: {statistics.median(times['fabric']) * 1e3:.2f} ms/step (median)")
    print(f"Trainer.fit:                  {statistics.median(times['trainer']) * 1e3:.2f} ms/step (median)")
    print(f"ratio (median of per-rep ratios): {statistics.median(ratios):.3f}  [goal <= 1.02]; per rep: "
          + ", ".join(f"{r:.2f}" for r in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
