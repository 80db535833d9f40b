"""Whole-process cost of `python -m resilient_train run` against a hand-written Lightning Fabric loop.

What a user feels is the wall time of the process: start-up, building the loader, the sampler,
every per-step bookkeeping, logging, the final checkpoint. So both sides run as fresh processes,
timed from outside: A is `run bench/overhead_task.py` (periodic checkpoints off, progress bar off,
no trackers; the final checkpoint at max_steps is kept, as every run writes it), B is
bench/fabric_loop.py on the same model, data, optimizer, batch size and steps. They take turns
(A B, B A, ...) so drift of the machine's speed hits both; the figure is the median of the
per-pair ratios A/B. `--devices 2` runs both as two DDP processes (gloo on CPU).
`--accelerator cuda` runs both sides on a GPU, in the same `--precision` (default 32-true, so
`auto` does not pick bf16 for one side only); `make gpu-check` does that and `--json FILE` writes
the figures for its report.
Goal: <= 1.03 on one CPU process, <= 1.05 on two, <= 1.02 on one GPU.

    .venv/bin/python bench/overhead.py [--pairs 5] [--steps 1500] [--batch 32] [--hidden 256] [--devices 1]
                                       [--accelerator cpu|cuda] [--precision 32-true] [--per-sample] [--json FILE]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one process run to completion (output discarded; a failure stops the bench).

    CPU is user + system time of the process and its children: on a shared or throttled machine
    the wall time of the same program varies by ~10% from run to run, its CPU time much less.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} ... exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def commands(args: argparse.Namespace, run_dir: str) -> tuple[list[str], list[str]]:
    py = sys.executable
    ours = [py, "-m", "resilient_train", "run", "bench/overhead_task.py", "--run-dir", run_dir,
            f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch}", f"task.hidden={args.hidden}",
            f"trainer.accelerator={args.accelerator}", f"trainer.precision={args.precision}",
            f"trainer.devices={args.devices}", "checkpoint.every_n_steps=null",
            "trainer.progress_bar=false", "logging.trackers=[]", "trainer.gpu_stats=false",
            f"task.per_sample={str(args.per_sample).lower()}"]
    if args.devices > 1:
        ours.append("trainer.strategy=ddp")
    baseline = [py, "bench/fabric_loop.py", "--steps", str(args.steps), "--batch", str(args.batch),
                "--hidden", str(args.hidden), "--devices", str(args.devices),
                "--accelerator", args.accelerator, "--precision", args.precision] + (["--per-sample"] if args.per_sample else [])
    return ours, baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", help="the same for both sides (default 32-true)")
    parser.add_argument("--per-sample", action="store_true",
                        help="both sides over a Dataset of its own (fetched sample by sample) instead of a TensorDataset, "
                             "which `run` gathers in one op per tensor")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args()
    # both sides start from bytecode, as after `pip install` (which compiles at install time): with
    # PYTHONDONTWRITEBYTECODE set, the package's ~100 modules would be compiled in every process
    for folder in ("src/resilient_train", "bench"):
        compileall.compile_dir(os.path.join(REPO, folder), quiet=1)
    ours_s, base_s, ratios, cpu_ratios = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs + 1):  # pair 0 warms the file cache and is not counted
            ours, baseline = commands(args, os.path.join(tmp, f"run{pair}"))
            first_ours = pair % 2 == 0
            a = timed(ours) if first_ours else (0.0, 0.0)
            b = timed(baseline)
            a = a if first_ours else timed(ours)
            if pair == 0:
                continue
            ours_s.append(a[0])
            base_s.append(b[0])
            ratios.append(a[0] / b[0])
            cpu_ratios.append(a[1] / b[1])
            print(f"pair {pair}/{args.pairs}: run {a[0]:.2f} s (CPU {a[1]:.2f} s), Fabric loop {b[0]:.2f} s "
                  f"(CPU {b[1]:.2f} s), ratio {a[0] / b[0]:.3f} (CPU {a[1] / b[1]:.3f})", file=sys.stderr)
    goal = goal_for(args.accelerator, args.devices)
    figures = {"accelerator": args.accelerator, "precision": args.precision, "devices": args.devices, "pairs": args.pairs,
               "steps": args.steps, "batch": args.batch, "hidden": args.hidden, "per_sample": args.per_sample,
               "fabric_loop_s": statistics.median(base_s), "run_s": statistics.median(ours_s),
               "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "cpu_ratio": statistics.median(cpu_ratios), "goal": goal}
    data = "a Dataset of its own (per sample)" if args.per_sample else "a TensorDataset"
    print(f"work: 3-layer MLP hidden={args.hidden}, batch {args.batch} per device, {args.steps} steps, {data}, "
          f"{args.devices} process(es), {args.accelerator.upper()} {args.precision}, {args.pairs} pairs")
    print(f"hand-written Fabric loop: {figures['fabric_loop_s']:.2f} s (median wall time of the process)")
    print(f"resilient_train run:      {figures['run_s']:.2f} s")
    print(f"ratio (median of per-pair ratios): {figures['ratio']:.3f}  "
          f"[min {min(ratios):.3f}, max {max(ratios):.3f}; goal <= {goal}]")
    print(f"CPU-time ratio (median of per-pair ratios): {figures['cpu_ratio']:.3f}  "
          f"[min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


def goal_for(accelerator: str, devices: int) -> float:
    """The issue's goals: 1.03 for one CPU process, 1.05 for two, 1.02 on one GPU."""
    if devices > 1:
        return 1.05
    return 1.02 if accelerator == "cuda" else 1.03


if __name__ == "__main__":
    raise SystemExit(main())
