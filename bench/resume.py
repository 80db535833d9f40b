"""Time to the first step: a resumed session against a fresh start of the same run, plus the load.

Both sides are what a user types, in a fresh interpreter each:

    fresh:   python -m resilient_train run bench/resume_task.py --run-dir NEW trainer.max_steps=2
    resumed: python -m resilient_train resume RUN trainer.max_steps=2   (RUN holds a checkpoint at step 1)

The task (bench/resume_task.py) is a stack of 2048 x 2048 Linear layers with AdamW, about
`--params` parameters (default 124e6: a GPT-2-124M-sized state of about 1.5 GB with its AdamW
moments). Each process writes wall-clock stamps and ends itself after its first optimizer step; the
figure is the time from starting the process to the first call of the training step (and, beside
it, to the end of the first optimizer step). The load time is measured in this process, in the same
run: what `Trainer.fit` does to resume (newest valid checkpoint: list, read, verify crc32c,
decode, check against the live model, restore into model and optimizer) on a model built by the
same task, and the same again in a fresh interpreter (timed there from just before the load), whose
buffers are memory the process has not touched before, as in the resumed session. Fresh, resumed
and the two loads alternate for `--reps` repetitions; each figure is the median.

Goal: resumed <= (fresh + load) x 1.10. The checkpoint was just written, so its reads hit the page
cache on both sides (as the load figure of bench/checkpoint.py).

    .venv/bin/python bench/resume.py [--params 124e6] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = os.path.join(REPO, "bench", "resume_task.py")


def child(args: list[str], stamps: str, log: str) -> dict[str, float]:
    """Run the CLI with `args`; the task's stamps, relative to the moment the process was started."""
    env = {**os.environ, "RESUME_BENCH_STAMPS": stamps}
    if os.path.exists(stamps):
        os.remove(stamps)
    with open(log, "w") as out:
        start = time.time()
        subprocess.run([sys.executable, "-m", "resilient_train", *args], check=True, cwd=REPO, env=env, stdout=out, stderr=out)
    with open(stamps) as f:
        return {k: v - start for k, v in json.load(f).items()}


def load_time(run: str, params: float) -> tuple[float, dict[str, float]]:
    """What `Trainer._resume` does, timed in this process on a model built by the same task."""
    import torch  # noqa: F401 - imported before the clock starts, as in the children

    from resilient_train import state as state_lib
    from resilient_train.checkpoint import CheckpointManager
    from resilient_train.checkpoint import format as fmt
    from resilient_train.checkpoint.manager import load_newest_valid
    from resilient_train.config import resolve
    from resilient_train.storage import Storage
    from resilient_train.task import load_task

    task = load_task(TASK)
    cfg = resolve(task.defaults, {"task": {"params": params}})
    parts = task.build(cfg.to_dictconfig())
    model = parts["model"]
    optimizer = parts["optimizer"](model.parameters())
    wanted = {fmt.MODEL_FILE, fmt.STATE_TENSORS, fmt.STATE_JSON, fmt.rng_file(0)}
    phases: dict[str, float] = {}

    def decode(loaded):
        began = time.perf_counter()
        snapshot = loaded.snapshot(0)
        state_lib.check(snapshot, model, optimizer, None, None)
        phases["decode + check"] = time.perf_counter() - began
        return snapshot

    start = time.perf_counter()
    found = load_newest_valid([CheckpointManager(Storage(run))], wanted, decode=decode)
    assert found is not None, f"no checkpoint in {run}"
    phases["list + read + verify"] = time.perf_counter() - start - phases["decode + check"]
    began = time.perf_counter()
    state_lib.restore(found[2], model, optimizer, None, None)
    phases["restore"] = time.perf_counter() - began
    return time.perf_counter() - start, phases


def load_in_fresh_process(run: str, params: float) -> float:
    """`load_time` in a new interpreter: its 1.5 GB of buffers are fresh memory, as in a resume."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--load-only", run, "--params", f"{params:g}"],
                         check=True, cwd=REPO, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["load"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=124e6)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--load-only", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only:
        seconds, phases = load_time(args.load_only, args.params)
        print(json.dumps({"load": seconds, **phases}))
        return 0
    overrides = [f"task.params={args.params:g}", "trainer.max_steps=2"]
    fresh, resumed, loads, child_loads = [], [], [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        run = os.path.join(tmp, "run")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "resilient_train", "run", TASK, "--run-dir", run, f"task.params={args.params:g}",
                        "trainer.max_steps=1"], check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ck = os.path.join(run, "checkpoints")
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ck) for f in files)
        print(f"made the checkpoint to resume from ({size / 1e6:.0f} MB, {time.perf_counter() - started:.1f} s)", file=sys.stderr)
        for rep in range(args.reps):
            stamps, log = os.path.join(tmp, "stamps.json"), os.path.join(tmp, f"log{rep}")

            def do_fresh() -> None:
                fresh.append(child(["run", TASK, "--run-dir", os.path.join(tmp, f"fresh{rep}"), *overrides], stamps, log + "f"))

            def do_resumed() -> None:
                resumed.append(child(["resume", run, "trainer.max_steps=2"], stamps, log + "r"))

            def do_load() -> None:
                loads.append(load_time(run, args.params))

            def do_child_load() -> None:
                child_loads.append(load_in_fresh_process(run, args.params))

            order = (do_fresh, do_resumed, do_load, do_child_load)
            for fn in (order if rep % 2 == 0 else order[::-1]):
                fn()
            f, r, (lt, _), cl = fresh[-1], resumed[-1], loads[-1], child_loads[-1]
            print(f"rep {rep + 1}/{args.reps}: fresh {f['first_step']:.2f} s, resumed {r['first_step']:.2f} s, load {lt:.2f} s "
                  f"(in a fresh process {cl:.2f} s); resumed / (fresh + load) = {r['first_step'] / (f['first_step'] + lt):.3f} "
                  f"({r['first_step'] / (f['first_step'] + cl):.3f} with the fresh-process load)", file=sys.stderr)
        with open(os.path.join(tmp, "log0r")) as f:
            resumed_log = [line.rstrip() for line in f if "resumed from" in line]

    med = statistics.median

    def stamp(runs: list[dict[str, float]], key: str) -> float:
        return med(r[key] for r in runs)

    load = med(lt for lt, _ in loads)
    print(f"time to the first step, {args.params:g} parameters (median of {args.reps} fresh processes each); {resumed_log[:1]}")
    print(f"{'seconds from process start to':<32} {'fresh':>8} {'resumed':>8}")
    for key in ("import", "build_start", "build_end", "first_step", "first_update"):
        print(f"  {key:<30} {stamp(fresh, key):>8.2f} {stamp(resumed, key):>8.2f}")
    print(f"load in-process (list, read, verify, decode, check, restore): {load:.2f} s; "
          + ", ".join(f"{k} {med(p[k] for _, p in loads):.2f} s" for k in loads[0][1]))
    print(f"load in a fresh process (the same, its buffers in memory the process has not touched before): {med(child_loads):.2f} s")
    ratios = [r["first_step"] / (f["first_step"] + lt) for f, r, (lt, _) in zip(fresh, resumed, loads, strict=True)]
    child_ratios = [r["first_step"] / (f["first_step"] + cl) for f, r, cl in zip(fresh, resumed, child_loads, strict=True)]
    extra = stamp(resumed, "first_step") - stamp(fresh, "first_step")
    print(f"resumed - fresh = {extra:.2f} s (load {load:.2f} s in-process, {med(child_loads):.2f} s in a fresh process)")
    print(f"resumed / (fresh + load) = {med(ratios):.3f}  [goal <= 1.10]; per rep: " + ", ".join(f"{x:.3f}" for x in ratios))
    print(f"resumed / (fresh + load in a fresh process) = {med(child_ratios):.3f}  [goal <= 1.10]; per rep: "
          + ", ".join(f"{x:.3f}" for x in child_ratios))
    # a fresh run allocates its AdamW moments in its first optimizer step; a resumed one got them in the load
    update_ratios = [r["first_update"] / (f["first_update"] + cl) for f, r, cl in zip(fresh, resumed, child_loads, strict=True)]
    print(f"to the end of the first optimizer step: resumed / (fresh + load in a fresh process) = {med(update_ratios):.3f}; per rep: "
          + ", ".join(f"{x:.3f}" for x in update_ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
