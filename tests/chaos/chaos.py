"""`make chaos`: the third-party crash harness ckpt-chaos, unmodified, against the real CLI.

ckpt-chaos (`run` mode) runs `python -m resilient_train run` once fault-free, recording every file
event under the run folder, then kills a fresh copy at each event (`before`: the event never
happens; `torn`: the file is written, cut to half its size, and the process dies), continues the
job, and compares the exported final weights with the fault-free run's. Three set-ups:

- `single`: one process;
- `ddp`: two gloo ranks on CPU, launched by the harness like torchrun, rank 0 crashed;
- `ddp-rank1`: the same, rank 1 crashed (its own RNG file is its only write);
- `single-frozen`: one process, the first layer frozen, so saves create and reference shared files.

A verdict other than PASS fails the run (exit 1), and so does a point that was not hit: a crash
run that failed before its event tested nothing. Beside the harness's verdicts this script checks
lost work itself (see resume.py: ckpt-chaos cannot match checkpoints whose file names are unique
to each save attempt), and prints one table for docs/checkpoint-format.md.

    python tests/chaos/chaos.py                                      # every crash point (make chaos)
    python tests/chaos/chaos.py --setups single,ddp --max-points 6   # a sample (make chaos-ci)

The code under test is a copy of src/resilient_train and the task taken at the start (WORK/code),
so edits to the working tree during the run do not mix two versions. Working folders go under the
system temp folder (`--work-root`) and are kept for inspection; the fault-free run of each set-up
is WORK/<setup>/reference, each crash point WORK/<setup>/pt_NNN.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from resume import logical_name  # tests/chaos, first on sys.path when this file is run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TASK = REPO / "tests" / "tasks" / "tiny.py"

# Ten steps, a checkpoint at 5 and the final one at 10: a crash in the first save has nothing older
# to fall back on, a crash in the second must land on step 5. Every checkpoint is kept, because the
# harness cannot follow keep-last-N rotation.
TRAIN = ["trainer.max_steps=10", "checkpoint.every_n_steps=5", "checkpoint.keep_last=null",
         "trainer.log_every_n_steps=5", "trainer.progress_bar=false", "trainer.accelerator=cpu"]
SINGLE = ["trainer.devices=1"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]  # as in tests/test_ddp.py; the harness starts the ranks

SETUPS = {  # name -> (overrides, ranks, crash rank)
    "single": (SINGLE, 1, 0),
    "ddp": (DDP, 2, 0),
    "ddp-rank1": (DDP, 2, 1),
    "single-frozen": (SINGLE + ["task.frozen=true"], 1, 0),  # shared files: created at the first save, referenced after
}
STEP_REGEX = r"resumed from .* \(step (\d+), epoch \d+\)"  # trainer.py `_resume`, printed by rank 0
FAIL_ON = "HARD_FAIL,SILENT_DIVERGENCE,LOST_WORK,CONTROL_FAIL"
VERDICTS = ("PASS", "HARD_FAIL", "SILENT_DIVERGENCE", "LOST_WORK")
NOT_HIT, NOT_REACHED = "not hit", "not reached"


@dataclass
class Point:
    label: str
    verdict: str  # the harness's verdict, or LOST_WORK from our own check
    harness_verdict: str
    newest_complete: int | None
    resumed_from: int | None
    action: str
    miss: str  # "" when the kill happened at the planned event number, else why not
    shifted: str  # when it hit another kind of event than planned: that event
    resume_tail: str


@dataclass
class Outcome:
    setup: str
    work: Path
    rc: int
    seconds: float
    points: list[Point] = field(default_factory=list)
    error: str = ""

    def failed(self) -> bool:
        return bool(self.error) or self.rc != 0 or any(p.verdict != "PASS" or p.miss == NOT_HIT for p in self.points)


def snapshot(root: Path) -> tuple[Path, Path]:
    """Copy the package and the task to ROOT/code: (folder to put first on PYTHONPATH, task file).

    The harness compares runs made minutes apart with its fault-free one; an edit of the working
    tree in between (another session working in this checkout) would show up as divergence.
    """
    code = root / "code"
    shutil.copytree(REPO / "src" / "resilient_train", code / "src" / "resilient_train",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(TASK, code / TASK.name)
    return code / "src", code / TASK.name


def harness_command(setup: str, work: Path, task: Path, a: argparse.Namespace) -> list[str]:
    """The ckpt-chaos command line for one set-up, exactly as it runs."""
    overrides, ranks, crash_rank = SETUPS[setup]
    py = sys.executable
    train = [py, "-m", "resilient_train", "run", str(task), "--run-dir", "{out}/run", *TRAIN, *overrides]
    resume = [py, str(HERE / "resume.py"), "--out", "{out}", "--reference", str(work / "reference" / "out"),
              "--mode", a.resume_mode, "--", *train]
    result = [py, str(HERE / "fingerprint.py"), "{out}/run", "{out}/final.safetensors"]
    return [
        py, "-m", "ckpt_chaos", "run",
        "--work", str(work),
        "--step-regex", STEP_REGEX,
        # Matches our checkpoints, but finds no twin while data file names are unique per save:
        # our own check in resume.py covers LOST_WORK until then.
        "--checkpoint-glob", "{out}/run/checkpoints/step-*",
        "--resume-cmd", shlex.join(resume),
        "--result-cmd", shlex.join(result),
        "--fail-on", FAIL_ON,
        "--modes", a.modes,
        "--max-points", str(a.max_points),
        "--jobs", str(a.jobs),
        "--timeout", str(a.timeout),
        "--ranks", str(ranks),
        "--crash-rank", str(crash_rank),
        "--", *train,
    ]


def events(log: Path) -> dict[int, tuple[str, str]]:
    """A harness event log as event number -> (kind, logical file name)."""
    found = {}
    if log.exists():
        for line in log.read_text().splitlines():
            n, kind, name, _ = line.split("\t")
            found[int(n)] = (kind, logical_name(name))
    return found


def collect(work: Path, crash_rank: int) -> list[Point]:
    """The harness's verdict per crash point, joined with our record of what was complete.

    Labels and the hit check are ours too. The harness names an event by its file name as it is,
    and ours are unique to each run, so its "plan drift" flag is raised on nearly every point.
    Here a point is hit when the crash rank's last event is the planned event number (the kill
    ends the process there), and shifted when that event is another kind of event than planned:
    under DDP, whichever rank comes first creates a shared folder, so a rank has one `mkdir` more
    or less from run to run. A shifted point is still a crash, one event away; a point past the
    end of a run that had one event less is not reached (the run finished, exit 0). A crash run
    that failed before its event is NOT HIT and fails the check: it tested nothing.
    """
    from ckpt_chaos.runner import rejudge

    plan = events(work / "reference" / f"events.log.rank{crash_rank}")
    records = sorted(((json.loads(p.read_text()), p.parent) for p in work.glob("pt_*/result.json")),
                     key=lambda item: item[0]["order"])
    rows = rejudge(work)  # same order: by the record's "order"
    points = []
    for (rec, folder), row in zip(records, rows):
        ours_path = folder / "chaos-resume.json"
        ours = json.loads(ours_path.read_text()) if ours_path.exists() else {}
        newest = ours.get("newest_complete")
        resumed = row.outcome.resumed_from_step
        verdict = row.verdict
        if verdict == "PASS" and newest is not None and (resumed or 0) < newest:
            verdict = "LOST_WORK"
        label, miss, shifted = row.label, "", ""
        if "point" in rec:
            n, mode = rec["point"]
            kind, name = plan.get(n, ("?", "?"))
            label = f"#{n} {kind}:{name} [{mode}]"
            seen = events(folder / f"events.log.rank{crash_rank}")
            hit = (n in seen) if mode == "term" else max(seen, default=0) == n
            if not hit:
                miss = NOT_REACHED if rec.get("rc") == 0 else NOT_HIT
            elif seen[n] != plan.get(n):
                shifted = f"{seen[n][0]}:{seen[n][1]}"
        points.append(Point(label, verdict, row.verdict, newest, resumed, ours.get("action", "-"),
                            miss, shifted, rec.get("resume_tail", "")))
    return points


def harness_env(src: Path, crash_rank: int) -> dict[str, str]:
    """The environment of ckpt-chaos and so of every run it starts."""
    # ckpt-chaos 0.1.8 does not pass `run --crash-rank` on to its injector, which reads this
    # variable (default 0) in every rank: without it a crash rank other than 0 is never killed.
    env = dict(os.environ, PYTHONUNBUFFERED="1", CKPT_CHAOS_CRASH_RANK=str(crash_rank))
    env.setdefault("OMP_NUM_THREADS", "1")  # several jobs share few cores; every run gets the same setting
    env.pop("COLAB_RELEASE_TAG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    imported = subprocess.run([sys.executable, "-c", "import resilient_train; print(resilient_train.__file__)"],
                              env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(imported).is_relative_to(src):
        sys.exit(f"chaos: runs would import resilient_train from {imported}, not from the copy in {src}")
    return env


def run_setup(setup: str, root: Path, code: tuple[Path, Path], a: argparse.Namespace) -> Outcome:
    work = root / setup
    cmd = harness_command(setup, work, code[1], a)
    print(f"\n=== {setup}: {shlex.join(cmd)}\n", flush=True)
    env = harness_env(code[0], SETUPS[setup][2])
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    print(proc.stdout, flush=True)
    outcome = Outcome(setup, work, proc.returncode, seconds)
    if not any(work.glob("pt_*/result.json")):
        outcome.error = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"exit {proc.returncode}"
        return outcome
    outcome.points = collect(work, SETUPS[setup][2])
    return outcome


def print_points(outcome: Outcome) -> None:
    print(f"--- {outcome.setup}: crash points with our lost-work check ({outcome.seconds:.0f}s, {outcome.work})")
    print(f"{'crash point':<52}{'newest ok':>10}{'resumed':>9}  {'continued by':<14}verdict")
    for p in outcome.points:
        newest = "-" if p.newest_complete is None else str(p.newest_complete)
        resumed = "-" if p.resumed_from is None else str(p.resumed_from)
        note = "" if p.verdict == p.harness_verdict else f" (harness: {p.harness_verdict})"
        note += f"  [{p.miss.upper()}]" if p.miss else ""
        note += f"  [hit {p.shifted}]" if p.shifted else ""
        print(f"{p.label:<52}{newest:>10}{resumed:>9}  {p.action:<14}{p.verdict}{note}")
    for p in outcome.points:
        if p.miss == NOT_HIT:
            print(f"\n  NOT HIT: {p.label}\n    the crash run failed before this event, so the point was not tested")
        if p.verdict != "PASS":
            tail = "\n      ".join(p.resume_tail.strip().splitlines()[-8:])
            print(f"\n  {p.verdict}: {p.label}\n    newest complete {p.newest_complete}, resumed from "
                  f"{p.resumed_from}, continued by {p.action}; end of the resume output:\n      {tail}")
    print()


def markdown(outcomes: list[Outcome], a: argparse.Namespace) -> str:
    lines = [
        f"modes `{a.modes}`, at most {a.max_points} crash points per set-up, resume by `{a.resume_mode}`",
        "",
        "| set-up | crash points | " + " | ".join(VERDICTS) + " | shifted | not reached | not hit | time |",
        "|---|---|" + "---|" * len(VERDICTS) + "---|---|---|---|",
    ]
    for o in outcomes:
        if o.error:
            lines.append(f"| {o.setup} | harness failed: {o.error} |" + " |" * (len(VERDICTS) + 4))
            continue
        counts = Counter(p.verdict for p in o.points)
        crash_points = sum(1 for p in o.points if not p.label.startswith("no crash"))
        other = sorted(set(counts) - set(VERDICTS))
        cells = [str(counts.get(v, 0)) for v in VERDICTS]
        if other:
            cells[-1] += " (+" + ", ".join(f"{counts[v]} {v}" for v in other) + ")"
        misses = Counter(p.miss for p in o.points)
        shifted = sum(bool(p.shifted) for p in o.points)
        lines.append(f"| {o.setup} | {crash_points} + control | " + " | ".join(cells)
                     + f" | {shifted} | {misses[NOT_REACHED]} | {misses[NOT_HIT]} | {o.seconds:.0f}s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    ap.add_argument("--max-points", type=int, default=1000, help="crash points per set-up, split between modes "
                    "(default: all of them)")
    ap.add_argument("--modes", default="before,torn")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("CHAOS_JOBS", "2")),
                    help="crash points run at once (default $CHAOS_JOBS or 2)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per command")
    ap.add_argument("--resume-mode", choices=["resume", "run"], default="resume",
                    help="resume: `resume RUN` when the run exists, else `run` again (the documented supervisor); "
                         "run: always the original `run` command (the harness's default)")
    ap.add_argument("--work-root", type=Path, default=Path(tempfile.gettempdir()) / "resilient_train-chaos")
    ap.add_argument("--markdown", type=Path, help="also write the summary table to this file")
    a = ap.parse_args(argv)
    setups = [s.strip() for s in a.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        ap.error(f"--setups takes {', '.join(SETUPS)}; got {a.setups!r}")

    root = a.work_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    code = snapshot(root)
    print(f"code under test: a copy of src/resilient_train and {TASK.name} in {code[0].parent}", flush=True)
    outcomes = []
    for setup in setups:
        outcome = run_setup(setup, root, code, a)
        if outcome.points:
            print_points(outcome)
        outcomes.append(outcome)
    table = markdown(outcomes, a)
    print(table)
    if a.markdown:
        a.markdown.write_text(table)
    failed = [o.setup for o in outcomes if o.failed()]
    print(f"ckpt-chaos: {'FAILED ' + ', '.join(failed) if failed else 'all PASS'} (work folders in {root})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
