"""The cost of `run` against the hand-written Fabric loop in instructions: a figure noise cannot move.

On a shared VM the wall time of the same process varies by 10-20 % from one run to the next (the
host's load changes the CPU's speed), so `bench/overhead.py` needs many pairs to tell 3 % apart.
This script counts the instructions each whole process executes under valgrind's callgrind, with
one torch thread (OpenMP threads spin while they wait, and what they execute then depends on
timing). Each side runs twice, at `--short` and `--long` steps: the difference is the cost of
`long - short` steps, the rest is the fixed cost (start-up, imports, run folder, final
checkpoint). The figure printed is the ratio at `--steps`, extrapolated from those two.

Instructions are not time (cache misses and the torch kernels' vector width weigh differently),
but an extra Python call, import or file write shows up in them exactly, every run the same.
Needs valgrind; ~10 minutes on two cores with the defaults (the four processes run two at a time).

    .venv/bin/python bench/instructions.py [--steps 1500] [--short 10] [--long 110] [--per-sample]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count(command: list[str], workdir: str) -> int:
    """Instructions executed by `command` (one process, children not followed)."""
    out = os.path.join(workdir, "callgrind.out")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"error: {' '.join(command[:4])} ... under valgrind exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def commands(steps: int, run_dir: str, per_sample: bool) -> dict[str, list[str]]:
    py = sys.executable
    ours = [py, "-m", "resilient_train", "run", "bench/overhead_task.py", "--run-dir", run_dir,
            f"trainer.max_steps={steps}", "checkpoint.every_n_steps=null", "trainer.progress_bar=false",
            "logging.trackers=[]", "trainer.gpu_stats=false", f"task.per_sample={str(per_sample).lower()}"]
    baseline = [py, "bench/fabric_loop.py", "--steps", str(steps)] + (["--per-sample"] if per_sample else [])
    return {"run": ours, "fabric": baseline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="the run length the ratio is given for")
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=110)
    parser.add_argument("--per-sample", action="store_true", help="a Dataset of its own instead of a TensorDataset")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("error: valgrind is not installed (apt-get install valgrind)")
    if args.long <= args.short:
        raise SystemExit("error: --long must be more steps than --short")
    import compileall

    for folder in ("src/resilient_train", "bench"):  # both sides from bytecode, as after pip install
        compileall.compile_dir(os.path.join(REPO, folder), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            for steps in (args.short, args.long):
                for side, command in commands(steps, os.path.join(tmp, f"run{steps}"), args.per_sample).items():
                    workdir = os.path.join(tmp, f"{side}{steps}")
                    os.makedirs(workdir)
                    jobs[side, steps] = pool.submit(count, command, workdir)
        counts = {key: job.result() for key, job in jobs.items()}
    span = args.long - args.short
    figures = {}
    for side in ("fabric", "run"):
        per_step = (counts[side, args.long] - counts[side, args.short]) / span
        fixed = counts[side, args.short] - args.short * per_step
        figures[side] = (fixed, per_step, fixed + args.steps * per_step)
    data = "a Dataset of its own (per sample)" if args.per_sample else "a TensorDataset"
    print(f"work: bench/overhead_task.py, {data}, 1 torch thread; instructions under callgrind")
    for side, label in (("fabric", "hand-written Fabric loop"), ("run", "resilient_train run")):
        fixed, per_step, total = figures[side]
        print(f"{label:25s} fixed {fixed / 1e6:8.0f} M, per step {per_step / 1e6:6.3f} M, at {args.steps} steps {total / 1e9:6.2f} G")
    (fixed_b, step_b, total_b), (fixed_a, step_a, total_a) = figures["fabric"], figures["run"]
    print(f"fixed cost: +{(fixed_a - fixed_b) / 1e6:.0f} M instructions; per step: {step_a / step_b:.3f}x")
    print(f"ratio at {args.steps} steps (instructions): {total_a / total_b:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
