"""The runs of one check and the verdict: straight, interrupted (killed, stopped, resumed), compared.

The interrupted run (a checkpoint every E steps, so there are steps between saves):
  1. `run`; SIGKILL to its process group as the checkpoint of step E commits (a save boundary);
  2. `resume` from E; SIGKILL as the save of step 3E begins: the checkpoint of 2E is committed,
     the steps after it are lost mid-save and replayed by the next resume;
  3. `resume` from 2E; the run's first stop signal (`checkpoint.stop_signals`, SIGTERM by default)
     as the save of step 3E begins: the run stops a step or two later,
     off the save cadence, saves there and exits 75;
  4. `resume` to step N.
Where each session resumed from and how it labelled that resume is read from the run's session
records (records.py), the checkpoints from the library's listing (driver.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

from resilient_train.errors import EXIT_STOPPED, ResilientTrainError, UsageError
from resilient_train.tools.check_resume.compare import compare, first_difference, read_final_state, report
from resilient_train.tools.check_resume.diagnose import explain, gather_facts
from resilient_train.tools.check_resume.driver import Checkpoints, Child, SaveWatch, pause_at_commit, pause_when, stop_signal
from resilient_train.tools.check_resume.plan import DEFAULT_STEPS, CheckFailed, NotResumeExact, Plan, make_plan
from resilient_train.tools.check_resume.records import ResumeFact, last_session, resume_after

_TOO_LATE = "finished before the signal"
_NO_RESUME = ResumeFact(None, None)


class Progress:
    """Progress lines on stderr: "straight run: 20 steps ... done in 4.6s"."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = 0.0

    def begin(self, text: str) -> None:
        self.started = time.monotonic()
        self.out.write(f"{text} ... ")
        self.out.flush()

    def end(self, text: str) -> None:
        self.out.write(f"{text} ({time.monotonic() - self.started:.1f}s)\n")
        self.out.flush()


@dataclass
class Interruption:
    what: str  # "SIGKILL at a save boundary (the checkpoint of step 4)"
    landed: bool
    resume: ResumeFact = _NO_RESUME  # how the next session resumed from it, as its record says


class Runs:
    """The runs of one check: the same task, overrides and plan, each run in its own folder."""

    def __init__(self, task: str, overrides: Sequence[str], config: Optional[str], plan: Plan, root: str,
                 progress: Progress, debug: bool = False) -> None:
        self.task, self.config, self.plan, self.root, self.progress = task, config, plan, root, progress
        self.overrides = [*overrides, *plan.overrides()]
        self.logs = os.path.join(root, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.children: list[Child] = []
        self.timeout = 600.0
        self.debug = debug  # passed on: tracebacks land in the runs' logs

    def _start(self, args: Sequence[str], name: str) -> Child:
        child = Child([*args, "--debug"] if self.debug else args, os.path.join(self.logs, f"{name}.log"))
        self.children.append(child)
        return child

    def _run_args(self, run_dir: str) -> list[str]:
        args = ["run", self.task, "--run-dir", run_dir]
        if self.config:
            args += ["--config", self.config]
        return [*args, *self.overrides]

    def _fail(self, child: Child, what: str, code: int) -> ResilientTrainError:
        """The error for a run that failed, after its last lines (the folder goes unless --keep)."""
        self.progress.end(f"failed, exit {code}")
        line = child.error_line()
        if code == 2:
            return UsageError(f"{what} refused the task or its settings: {line}")
        tail = child.text().splitlines()[-15:]
        self.progress.out.write("".join(f"  | {text}\n" for text in tail))
        return CheckFailed(f"{what} failed (exit {code}): {line}")

    def straight(self, name: str, label: str) -> tuple[str, float]:
        """Train N steps in one process; returns the run folder and the seconds it took."""
        run_dir = os.path.join(self.root, name)
        self.progress.begin(f"{label}: {self.plan.steps} steps")
        started = time.monotonic()
        child = self._start(self._run_args(run_dir), name)
        code = child.wait()
        if code != 0:
            raise self._fail(child, "the " + label.split(" (")[0], code)
        seconds = time.monotonic() - started
        self.progress.end("done")
        return run_dir, seconds

    def interrupted(self) -> tuple[str, list[Interruption]]:
        """The same N steps, killed at a save boundary, killed and stopped between saves, resumed."""
        run_dir = os.path.join(self.root, "interrupted")
        checkpoints = Checkpoints(run_dir)
        done = [self._kill_at_commit(run_dir, checkpoints)]
        # 2. resume; SIGKILL as the save two checkpoints on begins: the steps since the last
        #    committed checkpoint are lost mid-save and replayed. 3. resume; a stop signal as the next
        #    save begins: the run stops a step or two later, off the cadence, saves there, exits 75.
        for number, sig, ahead in ((2, signal.SIGKILL, 2), (3, stop_signal(run_dir), 1)):
            done.append(self._resume_and_signal(run_dir, checkpoints, number, sig, ahead, done[-1]))
        # 4. resume to the end
        start = checkpoints.newest_committed()
        self.progress.begin(f"interrupted run: resume from step {start} to step {self.plan.steps}")
        seen = last_session(run_dir)
        child = self._start(["resume", run_dir], "interrupted-4")
        code = child.wait()
        if code != 0:
            raise self._fail(child, "the last resume", code)
        done[-1].resume = resume_after(run_dir, seen)
        self.progress.end("done")
        return run_dir, done

    def _kill_at_commit(self, run_dir: str, checkpoints: Checkpoints) -> Interruption:
        """1. SIGKILL as the checkpoint at step E commits."""
        every = self.plan.every
        what = f"SIGKILL as the checkpoint of step {every} commits (a save boundary)"
        self.progress.begin(f"interrupted run: {what}")
        watch = SaveWatch(checkpoints, every)
        child = self._start(self._run_args(run_dir), "interrupted-1")
        landed = pause_at_commit(child, watch, self.timeout)
        if landed:
            child.group_signal(signal.SIGKILL)
            child.wait()
        else:
            code = child.wait()
            if code != 0:
                raise self._fail(child, "the interrupted run", code)
        self.progress.end("killed" if landed else "finished before the kill")
        return Interruption(what, landed)

    def _resume_and_signal(self, run_dir: str, checkpoints: Checkpoints, number: int, sig: int, ahead: int,
                           before: Interruption) -> Interruption:
        """Resume, and send `sig` as the save `ahead` checkpoints on begins; `before` learns how it resumed."""
        every = self.plan.every
        start = checkpoints.newest_committed()
        target = (start // every + ahead) * every
        what = f"{signal.Signals(sig).name} as the save of step {target} begins (between saves)"
        self.progress.begin(f"interrupted run: resume from step {start}, {what}")
        watch = SaveWatch(checkpoints, target)
        seen = last_session(run_dir)
        child = self._start(["resume", run_dir], f"interrupted-{number}")
        landed = pause_when(child, watch.begun, f"the save of step {target}", self.timeout)
        if landed:
            child.interrupt(sig)
        code = child.wait()
        outcome = self._outcome(child, checkpoints, sig, landed, code)
        before.resume = resume_after(run_dir, seen)
        self.progress.end(outcome)
        return Interruption(what, landed and outcome != _TOO_LATE)

    def _outcome(self, child: Child, checkpoints: Checkpoints, sig: int, landed: bool, code: int) -> str:
        if code not in (0, EXIT_STOPPED) and not (landed and sig == signal.SIGKILL):
            raise self._fail(child, "a resume of the interrupted run", code)
        if not landed or code == 0:
            return _TOO_LATE
        if sig == signal.SIGKILL:
            return "killed"
        stopped = checkpoints.newest_committed()  # exit 75 comes after the checkpoint where it stopped
        return f"saved step {stopped} and exited {EXIT_STOPPED}" if stopped else f"exited {EXIT_STOPPED}"

    def stop_all(self) -> None:
        for child in self.children:
            child.stop()


def _short_label(fact: ResumeFact) -> str:
    """"bit-exact" alone; any other label with its reasons, which say what changed."""
    if not fact.label:
        return "exactness not recorded"
    return "bit-exact" if fact.label.startswith("bit-exact") else fact.label


def _verdict(runs: Runs, straight_dir: str, interrupted_dir: str, interruptions: list[Interruption],
             out: TextIO) -> int:
    """Compare the two runs, print the table; 0 when bit-exact, else NotResumeExact with the likely cause."""
    straight, interrupted = read_final_state(straight_dir), read_final_state(interrupted_dir)
    sections = compare(straight, interrupted)
    resumes = [f"from step {i.resume.resumed_from} ({_short_label(i.resume)})"
               for i in interruptions if i.resume.resumed_from is not None]
    out.write(f"resumes: {', '.join(resumes) or 'none'}\n")
    report(sections, out)
    out.flush()  # before the progress lines of a second straight run, on the other stream
    difference = first_difference(sections)
    if difference is None:
        out.write(f"bit-exact: after {sum(i.landed for i in interruptions)} interruption(s), each resumed, the run ends "
                  "with the same weights, optimizer state, RNG streams, data position and losses as the straight run\n")
        return 0
    facts = gather_facts(straight, interrupted, sections, [i.resume for i in interruptions])
    again_dir, _ = runs.straight("straight-again", "second straight run (is the task deterministic?)")
    facts.straight_runs_agree = not any(s.differences for s in compare(straight, read_final_state(again_dir)))
    causes = explain(facts, out)
    raise NotResumeExact(f"resume is not bit-exact: {difference.where} differs ({difference.detail}); "
                         f"likely cause: {causes[0].title} (see above)")


def check_resume(task: str, overrides: Sequence[str] = (), steps: int = DEFAULT_STEPS, config: Optional[str] = None,
                 keep: bool = False, debug: bool = False, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the check; 0 when the interrupted run ends bit-exactly where the straight one does.

    Raises NotResumeExact (exit 1) naming the first difference and the likely cause; UsageError
    (exit 2) when the task or its settings are refused; CheckFailed (exit 1) when a run fails.
    """
    if not hasattr(os, "killpg"):
        raise UsageError("check-resume needs POSIX signals (Linux or macOS)")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"override '{item}' is not KEY=VALUE (for example task.lr=0.001)")
    plan = make_plan(steps)
    root = tempfile.mkdtemp(prefix="resilient_train_check_")
    runs = Runs(task, overrides, config, plan, root, Progress(err), debug)
    err.write(f"check-resume: {task}, {plan.steps} steps, a checkpoint every {plan.every}, in {root}\n")
    try:
        straight_dir, seconds = runs.straight("straight", "straight run")
        runs.timeout = max(600.0, 10 * seconds)
        interrupted_dir, interruptions = runs.interrupted()
        for missed in (i for i in interruptions if not i.landed):
            err.write(f"warning: the run finished before this interruption landed: {missed.what}; raise --steps\n")
        if not any(i.landed for i in interruptions):
            raise CheckFailed("no interruption landed: the run finished before every signal; raise --steps")
        return _verdict(runs, straight_dir, interrupted_dir, interruptions, out)
    finally:
        runs.stop_all()
        if keep:
            err.write(f"kept the runs and their logs in {root}\n")
        else:
            shutil.rmtree(root, ignore_errors=True)
