"""Start-up cost: `import resilient_train` and the torch-free CLI commands against `import lightning_fabric`.

Each figure is the median wall time of `--reps` fresh interpreter processes (what a user waits for
when they type the command), measured in the same run as the baseline: a bare `python -c pass` and
`python -c "import lightning_fabric"` (which imports torch). The commands take turns: each
repetition runs every command once, in an order rotated from one repetition to the next, and the
ratio to `import lightning_fabric` is the median of the per-repetition ratios. `ls` and `verify` run
on a small run folder made first. Goal: `ls`/`verify` well under a second, `import resilient_train`
light.

    .venv/bin/python bench/startup.py [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        subprocess.run([py, "-m", "resilient_train", "run", "tests/tasks/tiny.py", "--run-dir", run, "trainer.max_steps=4",
                        "checkpoint.every_n_steps=2"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        rows = [
            ("python -c pass", [py, "-c", "pass"]),
            ("import lightning_fabric (baseline)", [py, "-c", "import lightning_fabric"]),
            ("import torch", [py, "-c", "import torch"]),
            ("import resilient_train", [py, "-c", "import resilient_train"]),
            ("from resilient_train import Trainer", [py, "-c", "from resilient_train import Trainer"]),
            ("python -m resilient_train --help", [py, "-m", "resilient_train", "--help"]),
            ("python -m resilient_train ls RUN", [py, "-m", "resilient_train", "ls", run]),
            ("python -m resilient_train verify RUN", [py, "-m", "resilient_train", "verify", run]),
        ]
        times: dict[str, list[float]] = {name: [] for name, _ in rows}
        for rep in range(args.reps):
            shift = rep % len(rows)
            for name, cmd in rows[shift:] + rows[:shift]:
                times[name].append(timed(cmd))
    base = times["import lightning_fabric (baseline)"]
    med = statistics.median
    print(f"median of {args.reps} fresh processes each; python {sys.version.split()[0]}")
    print(f"{'what':<40} {'seconds':>8} {'vs import lightning_fabric':>28}")
    for name, seconds in times.items():
        ratio = med(t / b for t, b in zip(seconds, base, strict=True))
        print(f"{name:<40} {med(seconds):>8.3f} {ratio:>27.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
