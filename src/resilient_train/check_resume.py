"""`check-resume`: does this task resume bit-exactly? Train it straight and interrupted, compare.

A resume that is not exact shows up hours later as a loss curve that drifts, when the Colab session
that could have told why is long gone. This check answers before the long run, on the user's own
task: it trains N steps in one go and the same N steps with real interruptions, both through the
real CLI in subprocesses (what a Colab session does), then compares the two final checkpoints with
the library's own readers, so what it checks is what `resume` will do.

The interrupted run (a checkpoint every E = max(2, N // 5) steps, so there are steps between saves):
  1. `run`; SIGKILL to its process group as the checkpoint of step E commits (a save boundary);
  2. `resume` from E; SIGKILL as the save of step 3E begins: the checkpoint of 2E is committed,
     the steps after it are lost mid-save and replayed by the next resume;
  3. `resume` from 2E; SIGTERM as the save of step 3E begins: the run stops a step or two later,
     off the save cadence, saves there and exits 75;
  4. `resume` to step N.
Each signal is anchored on the checkpoint folder (a save beginning, a manifest appearing), never
on a sleep. To land kill 1 at the commit however fast a step is, the run is paused (SIGSTOP)
between slices of a few milliseconds while that save is in flight and killed in a pause where
the manifest exists; pausing changes no number the run computes.

When something differs, a second straight run tells a nondeterministic task (two uninterrupted runs
differ too) from a resume that loses state. Linux/macOS only (POSIX signals).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

from resilient_train.checkpoint.manifest import MANIFEST, step_dir
from resilient_train.errors import EXIT_STOPPED, NotFoundError, ResilientTrainError, UsageError

DEFAULT_STEPS = 20
MIN_STEPS = 10
SLICE_SECONDS = 0.002  # how long the paused run may run between two looks for the manifest
POLL_SECONDS = 0.002


class NotResumeExact(ResilientTrainError):
    """The interrupted run ended in another state than the straight one (exit 1)."""


class CheckFailed(ResilientTrainError):
    """A run of the check failed, or an interruption could not be made (exit 1)."""


# -- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """N steps and the checkpoint cadence E that leaves room for kills between saves."""

    steps: int
    every: int

    def overrides(self) -> list[str]:
        """What the check sets on top of the user's overrides (later wins)."""
        return [
            f"trainer.max_steps={self.steps}",
            f"checkpoint.every_n_steps={self.every}",
            "checkpoint.every_minutes=null",  # saves on steps only: "between saves" means something
            "checkpoint.when_busy=wait",  # every cadence save happens: the kills wait for them
            "checkpoint.mirror=null",  # never write into the user's mirror
            "trainer.log_every_n_steps=1",  # a loss per step: where the runs part shows
            "trainer.progress_bar=false",
        ]


def make_plan(steps: int) -> Plan:
    if steps < MIN_STEPS:
        raise UsageError(f"--steps must be at least {MIN_STEPS} (three interruptions need room between saves), got {steps}")
    return Plan(steps=steps, every=max(2, steps // 5))


# -- running the CLI ----------------------------------------------------------------------------


class _Child:
    """One `python -m resilient_train ...` in its own process group, output into a log file."""

    def __init__(self, args: Sequence[str], log_path: str) -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "resilient_train", *args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group_signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        return self.proc.wait()

    def text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def error_line(self) -> str:
        lines = self.text().splitlines()
        errors = [line[len("error:"):].strip() for line in lines if line.startswith("error:")]
        if errors:
            return errors[-1]
        return next((line.strip() for line in reversed(lines) if line.strip()), "no output")

    def stop(self) -> None:
        """Kill the whole group (on the way out of an error or Ctrl-C)."""
        if self.alive():
            self.group_signal(signal.SIGKILL)
            self.proc.wait()


def _committed(run_dir: str, step: int) -> bool:
    return os.path.exists(os.path.join(run_dir, "checkpoints", step_dir(step), MANIFEST))


class _SaveWatch:
    """Tells when a save of `step` begins: a file appears in its folder that was not there before.

    A save killed earlier leaves its folder behind (debris, removed by a later session), so the
    folder's existence alone says nothing; every save attempt writes files under names of its own.
    """

    def __init__(self, run_dir: str, step: int) -> None:
        self.folder = os.path.join(run_dir, "checkpoints", step_dir(step))
        self.before = self._names()

    def _names(self) -> set[str]:
        try:
            return set(os.listdir(self.folder))
        except (FileNotFoundError, NotADirectoryError):
            return set()

    def begun(self) -> bool:
        return bool(self._names() - self.before)


def _newest_committed(run_dir: str) -> int:
    root = os.path.join(run_dir, "checkpoints")
    steps = [0]
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("step-") and name[5:].isdigit() and os.path.exists(os.path.join(root, name, MANIFEST)):
                steps.append(int(name[5:]))
    return max(steps)


def _pause_when(child: _Child, ready: Callable[[], bool], what: str, timeout: float) -> bool:
    """Poll `ready` and pause `child` (SIGSTOP to its group) the moment it holds; False if it exited first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not child.alive():
            return False
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what} did not happen within {timeout:.0f}s; see {child.log_path} (kept with --keep)")
        time.sleep(POLL_SECONDS)
    child.group_signal(signal.SIGSTOP)
    return True


def _pause_at_commit(child: _Child, watch: _SaveWatch, run_dir: str, step: int, timeout: float) -> bool:
    """Return with `child` paused just after the checkpoint at `step` committed; False if it exited.

    While that save is in flight the child runs in slices of a few milliseconds and is paused
    while we look for the manifest, so it cannot get more than a slice past the commit, however
    fast its steps are.
    """
    if not _pause_when(child, watch.begun, f"the save of step {step}", timeout):
        return False
    deadline = time.monotonic() + timeout
    while not _committed(run_dir, step):
        if not child.alive():
            return False
        if time.monotonic() > deadline:
            child.group_signal(signal.SIGCONT)
            raise CheckFailed(f"the checkpoint of step {step} did not commit within {timeout:.0f}s; see {child.log_path}")
        child.group_signal(signal.SIGCONT)
        time.sleep(SLICE_SECONDS)
        child.group_signal(signal.SIGSTOP)
    return True


def _resumed_step(text: str) -> Optional[int]:
    for line in text.splitlines():
        if "resumed from " in line and "(step " in line:
            word = line.split("(step ", 1)[1].split(",")[0].split(")")[0]
            if word.strip().isdigit():
                return int(word)
    return None


def _resume_labels(text: str) -> list[str]:
    """The exactness lines `resume` printed, e.g. "bit-exact (same world size, ...)"."""
    labels = []
    for line in text.splitlines():
        if "resume is " in line:
            labels.append(line.split("resume is ", 1)[1].strip())
    return labels


def _stopped_step(text: str) -> Optional[int]:
    for line in text.splitlines():
        if "stopped at step " in line:
            word = line.split("stopped at step ", 1)[1].split()[0].rstrip(";,")
            if word.isdigit():
                return int(word)
    return None


class _Progress:
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


# -- the runs -----------------------------------------------------------------------------------


@dataclass
class Interruption:
    what: str  # "SIGKILL at a save boundary (the checkpoint of step 4)"
    landed: bool
    resumed_from: Optional[int] = None  # the step the next session continued from
    label: Optional[str] = None  # how that resume labelled itself


class _Session:
    """The runs of one check: the same task, overrides and plan, each run in its own folder."""

    def __init__(self, task: str, overrides: Sequence[str], config: Optional[str], plan: Plan, root: str,
                 progress: _Progress, debug: bool = False) -> None:
        self.task, self.config, self.plan, self.root, self.progress = task, config, plan, root, progress
        self.overrides = [*overrides, *plan.overrides()]
        self.logs = os.path.join(root, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.children: list[_Child] = []
        self.timeout = 600.0
        self.debug = debug  # passed on: tracebacks land in the runs' logs

    def _start(self, args: Sequence[str], name: str) -> _Child:
        child = _Child([*args, "--debug"] if self.debug else args, os.path.join(self.logs, f"{name}.log"))
        self.children.append(child)
        return child

    def _run_args(self, run_dir: str) -> list[str]:
        args = ["run", self.task, "--run-dir", run_dir]
        if self.config:
            args += ["--config", self.config]
        return [*args, *self.overrides]

    def _fail(self, child: _Child, what: str, code: int) -> ResilientTrainError:
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
        every, run_dir = self.plan.every, os.path.join(self.root, "interrupted")
        done: list[Interruption] = []

        # 1. SIGKILL as the checkpoint at step E commits
        what = f"SIGKILL as the checkpoint of step {every} commits (a save boundary)"
        self.progress.begin(f"interrupted run: {what}")
        watch = _SaveWatch(run_dir, every)
        child = self._start(self._run_args(run_dir), "interrupted-1")
        landed = _pause_at_commit(child, watch, run_dir, every, self.timeout)
        self._kill_or_finish(child, landed)
        done.append(Interruption(what, landed))
        self.progress.end("killed" if landed else "finished before the kill")

        # 2. resume; SIGKILL as the save two checkpoints on begins: the steps since the last
        #    committed checkpoint are lost mid-save and replayed. 3. resume; SIGTERM as the next
        #    save begins: the run stops a step or two later, off the cadence, saves there, exits 75.
        for number, sig, ahead in ((2, signal.SIGKILL, 2), (3, signal.SIGTERM, 1)):
            start = _newest_committed(run_dir)
            target = (start // every + ahead) * every
            name = signal.Signals(sig).name
            what = f"{name} as the save of step {target} begins (between saves)"
            self.progress.begin(f"interrupted run: resume from step {start}, {what}")
            watch = _SaveWatch(run_dir, target)
            child = self._start(["resume", run_dir], f"interrupted-{number}")
            landed = _pause_when(child, watch.begun, f"the save of step {target}", self.timeout)
            if landed and sig == signal.SIGKILL:
                child.group_signal(signal.SIGKILL)
            elif landed:
                os.kill(child.proc.pid, signal.SIGTERM)  # the main process only: it stops its workers
                child.group_signal(signal.SIGCONT)
            code = child.wait()
            text = child.text()
            outcome = self._outcome(child, sig, landed, code, text)
            done[-1].resumed_from, done[-1].label = _resumed_step(text), _first(_resume_labels(text))
            done.append(Interruption(what, landed and outcome != _TOO_LATE))
            self.progress.end(outcome)

        # 4. resume to the end
        start = _newest_committed(run_dir)
        self.progress.begin(f"interrupted run: resume from step {start} to step {self.plan.steps}")
        child = self._start(["resume", run_dir], "interrupted-4")
        code = child.wait()
        if code != 0:
            raise self._fail(child, "the last resume", code)
        text = child.text()
        done[-1].resumed_from, done[-1].label = _resumed_step(text), _first(_resume_labels(text))
        self.progress.end("done")
        return run_dir, done

    def _kill_or_finish(self, child: _Child, landed: bool) -> None:
        if landed:
            child.group_signal(signal.SIGKILL)
            child.wait()
            return
        code = child.wait()
        if code != 0:
            raise self._fail(child, "the interrupted run", code)

    def _outcome(self, child: _Child, sig: int, landed: bool, code: int, text: str) -> str:
        if code not in (0, EXIT_STOPPED) and not (landed and sig == signal.SIGKILL):
            raise self._fail(child, "a resume of the interrupted run", code)
        if not landed or code == 0:
            return _TOO_LATE
        if sig == signal.SIGKILL:
            return "killed"
        stopped = _stopped_step(text)
        return f"saved step {stopped} and exited {EXIT_STOPPED}" if stopped is not None else f"exited {EXIT_STOPPED}"

    def stop_all(self) -> None:
        for child in self.children:
            child.stop()


_TOO_LATE = "finished before the signal"


def _short_label(label: Optional[str]) -> str:
    """"bit-exact" alone; any other label with its reasons, which say what changed."""
    if not label:
        return "no exactness line"
    return "bit-exact" if label.startswith("bit-exact") else label


def _first(items: list[str]) -> Optional[str]:
    return items[0] if items else None


# -- comparing ----------------------------------------------------------------------------------


@dataclass
class Difference:
    where: str  # "model weight 0.bias", "optimizer state.0.exp_avg", "RNG stream torch (rank 0)"
    detail: str  # "max abs diff 3.1e-03", "7 (straight) vs 9 (interrupted)"
    max_abs: Optional[float] = None


@dataclass
class Section:
    name: str
    summary: str
    differences: list[Difference] = field(default_factory=list)


@dataclass
class FinalState:
    """What the check compares from one run: its last checkpoint and its logged metrics."""

    step: int
    model: dict[str, Any]
    train: dict[str, Any]
    rng: dict[int, Any]  # rank -> that rank's RNG states
    manifest: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[tuple[str, int], float]  # (column, step) -> value, the newest session's


def read_final_state(run_dir: str) -> FinalState:
    """The newest valid checkpoint of `run_dir`, decoded by the library's own readers."""
    from omegaconf import OmegaConf

    from resilient_train.checkpoint.manager import CheckpointManager
    from resilient_train.config import load_run_yaml
    from resilient_train.storage import Storage

    run = Storage(run_dir)
    loaded = CheckpointManager(run).load_latest()
    if loaded is None:
        raise NotFoundError(f"no valid checkpoint in {run_dir}")
    snapshot = loaded.snapshot(0)
    world = loaded.manifest.get("world_size", 1)
    rng = {0: snapshot.rng}
    for rank in range(1, world if isinstance(world, int) else 1):
        rng[rank] = loaded.snapshot(rank).rng
    stored = OmegaConf.to_container(load_run_yaml(run.read_bytes("run.yaml").decode("utf-8")), resolve=True)
    config = {str(k): v for k, v in stored.items()} if isinstance(stored, dict) else {}
    return FinalState(step=loaded.info.step, model=snapshot.model, train=snapshot.train, rng=rng,
                      manifest=loaded.manifest, config=config, metrics=_metrics(run))


def _metrics(run: Any) -> dict[tuple[str, int], float]:
    from resilient_train.metrics import read_rows

    try:
        rows = read_rows(run)
    except FileNotFoundError:
        return {}
    values: dict[tuple[str, int], float] = {}
    for row in rows:  # file order: a later session's row for a step replaces an earlier one's
        for column in ("loss", "val_loss"):
            text = row.get(column) or ""
            try:
                values[(column, row["step"])] = float(text)
            except ValueError:
                continue
    return values


def _same_tensor(a: Any, b: Any) -> bool:
    import torch

    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0))


def _tensor_difference(a: Any, b: Any) -> Optional[tuple[str, Optional[float]]]:
    import torch

    if tuple(a.shape) != tuple(b.shape):
        return f"shape {list(a.shape)} (straight) vs {list(b.shape)} (interrupted)", None
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} (straight) vs {b.dtype} (interrupted)", None
    if _same_tensor(a, b):
        return None
    if a.is_complex():
        diff = (a - b).abs()
    else:
        diff = (a.to(torch.float64) - b.to(torch.float64)).abs()
    largest = float(diff.nan_to_num(nan=math.inf).max()) if diff.numel() else 0.0
    return f"max abs diff {largest:.3g}", largest


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(a: Any, b: Any, where: str) -> Iterator[Difference]:
    """Every place where `a` (straight) and `b` (interrupted) differ, tensors bit for bit."""
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        found = _tensor_difference(a, b)
        if found is not None:
            yield Difference(where, *found)
    elif isinstance(a, dict) and isinstance(b, dict):
        only_a, only_b = [k for k in a if k not in b], [k for k in b if k not in a]
        if only_a or only_b:
            yield Difference(where, f"keys only in the straight run {only_a[:3]}, only in the interrupted run {only_b[:3]}")
        for key in a:
            if key in b:
                yield from differences(a[key], b[key], f"{where}.{key}" if where else str(key))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            yield Difference(where, f"{len(a)} items (straight) vs {len(b)} (interrupted)")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, f"{where}[{i}]")
    elif type(a) is not type(b) or a != b:
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return
        numeric = isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
        yield Difference(where, f"{_short(a)} (straight) vs {_short(b)} (interrupted)",
                         abs(float(a) - float(b)) if numeric else None)


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two run.yaml files (run_dir aside: it always does)."""
    fa, fb = _flat(a), _flat(b)
    return sorted(k for k in set(fa) | set(fb) if k != "run_dir" and fa.get(k) != fb.get(k))


def _loss_section(a: FinalState, b: FinalState) -> Section:
    """Losses at the steps both runs logged; a value only one run logged is a note, not a difference.

    The metrics of the steps before a checkpoint are flushed right after it commits: a kill in
    between loses them, and the resume, which starts at that checkpoint, does not log them again.
    """
    common = sorted(set(a.metrics) & set(b.metrics), key=lambda key: (key[1], key[0]))
    diffs = []
    for column, step in common:
        x, y = a.metrics[(column, step)], b.metrics[(column, step)]
        if x != y and not (math.isnan(x) and math.isnan(y)):
            diffs.append(Difference(f"{column} at step {step}", f"{x!r} (straight) vs {y!r} (interrupted)", abs(x - y)))
    only = sorted(set(a.metrics) ^ set(b.metrics), key=lambda key: (key[1], key[0]))
    note = f"; {len(only)} value(s) logged by one run only (steps {only[0][1]}-{only[-1][1]})" if only else ""
    if not common:
        return Section("losses", "none logged by both runs" + note)
    if not diffs:
        return Section("losses", f"same at {len(common)} logged value(s){note}")
    largest = max(d.max_abs or 0.0 for d in diffs)
    steps = sorted({int(d.where.rsplit(" ", 1)[1]) for d in diffs})
    return Section("losses", f"differ from step {steps[0]} on ({len(steps)} step(s), max abs diff {largest:.3g}){note}", diffs)


def _tensor_section(name: str, what: str, a: dict[str, Any], b: dict[str, Any], where: str = "") -> Section:
    diffs = list(differences(a, b, where))
    if not diffs:
        return Section(name, f"same ({len(a)} {what})")
    largest = max((d.max_abs for d in diffs if d.max_abs is not None), default=None)
    tail = f", max abs diff {largest:.3g}" if largest is not None else ""
    return Section(name, f"{len(diffs)} difference(s){tail}", diffs)


_POSITION = ("step", "epoch", "cursor", "samples_seen")


def _split_progress(train: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the data position, everything else the trainer keeps besides optimizer and progress)."""
    progress = train.get("progress")
    progress = progress if isinstance(progress, dict) else {}
    position = {k: progress.get(k) for k in _POSITION}
    other = {k: v for k, v in train.items() if k not in ("optimizer", "progress")}
    other.update({f"progress.{k}": v for k, v in progress.items() if k not in _POSITION})
    return position, other


def _rng_section(a: FinalState, b: FinalState) -> Section:
    diffs, names = [], []
    for rank in sorted(set(a.rng) | set(b.rng)):
        ra, rb = a.rng.get(rank) or {}, b.rng.get(rank) or {}
        for stream in [*ra, *(s for s in rb if s not in ra)]:
            if stream not in names:
                names.append(stream)
            if next(differences(ra.get(stream), rb.get(stream), stream), None) is not None:
                where = f"RNG stream {stream}" + (f" (rank {rank})" if len(a.rng) > 1 else "")
                diffs.append(Difference(where, "in another state"))
    if diffs:
        return Section("RNG streams", f"{len(diffs)} differ", diffs)
    return Section("RNG streams", f"same ({', '.join(names)})" if names else "none saved")


def compare(a: FinalState, b: FinalState) -> list[Section]:
    """Config, data position, losses, weights, optimizer, other state and RNG streams, in that order."""
    sections = []
    changed = config_changes(a.config, b.config)
    sections.append(Section("config", "same" if not changed else f"{len(changed)} key(s) differ",
                            [Difference(f"config key {key}", "differs") for key in changed]))
    (position_a, other_a), (position_b, other_b) = _split_progress(a.train), _split_progress(b.train)
    position = list(differences(position_a, position_b, "progress"))
    summary = (f"same (step {position_a['step']}, epoch {position_a['epoch']}, cursor {position_a['cursor']}, "
               f"{position_a['samples_seen']} samples seen)") if not position else f"{len(position)} difference(s)"
    sections.append(Section("data position", summary, position))
    sections.append(_loss_section(a, b))
    sections.append(_tensor_section("model weights", "tensors", {f"model weight {k}": v for k, v in a.model.items()},
                                    {f"model weight {k}": v for k, v in b.model.items()}))
    optimizer_a, optimizer_b = a.train.get("optimizer") or {}, b.train.get("optimizer") or {}
    section = _tensor_section("optimizer", "parts", optimizer_a, optimizer_b, "optimizer")
    if not section.differences and isinstance(optimizer_a, dict):
        section.summary = f"same ({len(optimizer_a.get('state') or {})} parameter states, param groups)"
    sections.append(section)
    sections.append(_tensor_section("other state", "parts: " + ", ".join(other_a) if other_a else "parts", other_a, other_b))
    sections.append(_rng_section(a, b))
    return sections


# -- diagnosis ----------------------------------------------------------------------------------


@dataclass
class Facts:
    """What the diagnosis looks at; gathered from the comparison, the config and the resume logs."""

    config_changed: list[str] = field(default_factory=list)
    data_position_differs: bool = False
    weights_differ: bool = False
    optimizer_differs: bool = False
    trainer_rng_differs: list[str] = field(default_factory=list)
    num_workers: int = 0
    on_gpu: bool = False
    validation: bool = False
    straight_runs_agree: Optional[bool] = None  # None: not checked
    first_loss_step: Optional[int] = None
    resume_points: list[int] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # the resumes' own exactness lines


@dataclass(frozen=True)
class Cause:
    title: str  # short: it ends the one-line error
    advice: str  # why it is suspected and what to do

    def __str__(self) -> str:
        return f"{self.title}: {self.advice}"


def diagnose(facts: Facts) -> list[Cause]:
    """Likely causes, most likely first; each says what to do about it."""
    causes: list[Cause] = []
    if facts.straight_runs_agree is False:
        if facts.on_gpu:
            causes.append(Cause(
                "nondeterministic GPU kernels",
                "two uninterrupted runs differ too, so no resume can match one; torch.are_deterministic_algorithms_enabled() "
                "is false unless the task enables it: call torch.use_deterministic_algorithms(True) in build, set "
                "CUBLAS_WORKSPACE_CONFIG=:4096:8 and check again"))
        else:
            causes.append(Cause(
                "randomness the trainer does not seed",
                "two uninterrupted runs differ too: a generator seeded from time or os.urandom (random.Random(), "
                "numpy.random.default_rng() or torch.Generator().seed() without a seed); seed it from cfg.seed"))
    if facts.config_changed:
        causes.append(Cause("a changed config", f"the interrupted run trained with other values for {', '.join(facts.config_changed[:5])}"))
    odd_labels = [label for label in facts.labels if not label.startswith("bit-exact")]
    if odd_labels:
        causes.append(Cause("the resume said so", f"the trainer labelled a resume {odd_labels[0]}"))
    if facts.data_position_differs:
        causes.append(Cause(
            "data order",
            "the runs end at another place in the data (epoch, cursor or samples seen): a custom sampler or "
            "batch_sampler the trainer cannot fast-forward, or a dataset whose length changes"))
    if facts.num_workers > 0:
        causes.append(Cause(
            "DataLoader workers' RNG",
            f"trainer.num_workers={facts.num_workers}: randomness in __getitem__ or collate_fn can depend on which "
            "worker runs a batch; check again with trainer.num_workers=0 to confirm"))
    if facts.trainer_rng_differs:
        if facts.validation:
            causes.append(Cause(
                "model mode",
                "the trainer's RNG streams end in other states and validation ran: dropout drew random numbers on other "
                "steps, as when code switches modules with .eval()/.train() itself and a resumed session trains in "
                "another mode"))
        causes.append(Cause(
            "a different number of random draws",
            f"the trainer's RNG streams ({', '.join(facts.trainer_rng_differs[:4])}) end in other states: a resumed "
            "session draws a different number of random numbers than an uninterrupted one (dropout in another mode, "
            "randomness drawn only on the first steps of a session)"))
    elif (facts.weights_differ or facts.optimizer_differs) and facts.straight_runs_agree is not False:
        causes.append(Cause(
            "RNG streams the trainer does not see",
            "the weights differ while the trainer's RNG states (python, torch, numpy, cuda) match, so the task draws "
            "from a generator of its own (a torch.Generator, random.Random or numpy Generator made in build, or state "
            "in a module-level variable) that restarts at every resume; draw from the global torch/random/numpy RNGs, "
            "which checkpoints keep"))
        if facts.validation:
            causes.append(Cause(
                "model mode",
                "validation ran in this check; code that switches modules with .eval()/.train() itself can leave "
                "BatchNorm or dropout in another mode after a resume"))
    if facts.on_gpu and facts.straight_runs_agree is None:
        causes.append(Cause("nondeterministic GPU kernels",
                            "torch.are_deterministic_algorithms_enabled() is false unless the task enables it"))
    if not causes:
        causes.append(Cause("unknown", "every resume was labelled bit-exact; please report this with the task"))
    return causes


def gather_facts(straight: FinalState, interrupted: FinalState, sections: list[Section],
                 interruptions: list[Interruption]) -> Facts:
    by_name = {s.name: s for s in sections}
    trainer_cfg = interrupted.config.get("trainer", {}) if isinstance(interrupted.config, dict) else {}
    workers = trainer_cfg.get("num_workers", 0)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    gpus = (straight.manifest.get("environment") or {}).get("gpus") or []
    on_gpu = bool(gpus) and accelerator in ("auto", "gpu", "cuda")
    loss = by_name.get("losses")
    first_loss = None
    for d in (loss.differences if loss else []):
        if d.max_abs is not None and d.where.rsplit(" ", 1)[-1].isdigit():
            first_loss = int(d.where.rsplit(" ", 1)[-1])
            break
    return Facts(
        config_changed=config_changes(straight.config, interrupted.config),
        data_position_differs=bool(by_name["data position"].differences),
        weights_differ=bool(by_name["model weights"].differences),
        optimizer_differs=bool(by_name["optimizer"].differences),
        trainer_rng_differs=[d.where.replace("RNG stream ", "") for d in by_name["RNG streams"].differences],
        num_workers=workers if isinstance(workers, int) else 0,
        on_gpu=on_gpu,
        validation=any(column == "val_loss" for column, _ in straight.metrics),
        first_loss_step=first_loss,
        resume_points=[i.resumed_from for i in interruptions if i.resumed_from is not None],
        labels=[i.label for i in interruptions if i.label],
    )


_VERDICT_ORDER = ("model weights", "optimizer", "other state", "RNG streams", "data position", "losses", "config")


def first_difference(sections: list[Section]) -> Optional[Difference]:
    """The first tensor that differs (weights before optimizer state before the rest)."""
    by_name = {s.name: s for s in sections}
    for name in _VERDICT_ORDER:
        section = by_name.get(name)
        if section is not None and section.differences:
            return section.differences[0]
    return None


def _report(sections: list[Section], out: TextIO) -> None:
    width = max(len(s.name) for s in sections)
    out.write("compare (straight vs interrupted):\n")
    for section in sections:
        out.write(f"  {section.name:<{width}}  {section.summary}\n")
        for diff in section.differences[:3]:
            out.write(f"  {'':<{width}}    {diff.where}: {diff.detail}\n")
        if len(section.differences) > 3:
            out.write(f"  {'':<{width}}    ... and {len(section.differences) - 3} more\n")


def _explain(facts: Facts, out: TextIO) -> list[Cause]:
    """Print what the second straight run showed, where the losses part, and the likely causes."""
    if facts.straight_runs_agree:
        out.write("a second straight run ends bit-exactly like the first: the task is deterministic, the interruptions "
                  "cause the difference\n")
    else:
        out.write("a second straight run differs from the first too: the task is not deterministic\n")
    after = [p for p in facts.resume_points if facts.first_loss_step is not None and p < facts.first_loss_step]
    if after:
        out.write(f"losses first differ at step {facts.first_loss_step}, after the resume from step {max(after)}\n")
    causes = diagnose(facts)
    out.write("likely cause" + ("s, most likely first" if len(causes) > 1 else "") + ":\n")
    for cause in causes:
        out.write(f"  - {cause}\n")
    return causes


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
    progress = _Progress(err)
    session = _Session(task, overrides, config, plan, root, progress, debug)
    err.write(f"check-resume: {task}, {plan.steps} steps, a checkpoint every {plan.every}, in {root}\n")
    try:
        straight_dir, seconds = session.straight("straight", "straight run")
        session.timeout = max(600.0, 10 * seconds)
        interrupted_dir, interruptions = session.interrupted()
        for missed in (i for i in interruptions if not i.landed):
            err.write(f"warning: the run finished before this interruption landed: {missed.what}; raise --steps\n")
        if not any(i.landed for i in interruptions):
            raise CheckFailed("no interruption landed: the run finished before every signal; raise --steps")
        straight, interrupted = read_final_state(straight_dir), read_final_state(interrupted_dir)
        sections = compare(straight, interrupted)
        resumes = [f"from step {i.resumed_from} ({_short_label(i.label)})" for i in interruptions if i.resumed_from is not None]
        out.write(f"resumes: {', '.join(resumes) or 'none'}\n")
        _report(sections, out)
        out.flush()  # before the progress lines of a second straight run, on the other stream
        difference = first_difference(sections)
        if difference is None:
            out.write(f"bit-exact: after {sum(i.landed for i in interruptions)} interruption(s), each resumed, the run ends "
                      "with the same weights, optimizer state, RNG streams, data position and losses as the straight run\n")
            return 0
        facts = gather_facts(straight, interrupted, sections, interruptions)
        again_dir, _ = session.straight("straight-again", "second straight run (is the task deterministic?)")
        facts.straight_runs_agree = not any(s.differences for s in compare(straight, read_final_state(again_dir)))
        causes = _explain(facts, out)
        raise NotResumeExact(f"resume is not bit-exact: {difference.where} differs ({difference.detail}); "
                             f"likely cause: {causes[0].title} (see above)")
    finally:
        session.stop_all()
        if keep:
            err.write(f"kept the runs and their logs in {root}\n")
        else:
            shutil.rmtree(root, ignore_errors=True)
