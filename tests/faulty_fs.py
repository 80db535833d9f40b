"""A fault-injecting fsspec filesystem for the tests: `faulty://` is `memory://` with sabotage.

`FaultyFileSystem` shares MemoryFileSystem's class-level store, so `memory://x/run` sees what
`faulty://x/run` wrote: a test runs a session on `faulty://` until a fault kills it, then resumes
the same run on plain `memory://`.

`Storage` writes every file of a non-local filesystem with one `fs.pipe_file(path, data)`; that is
the interception point (a write through `fs.open(path, "wb")` meets the same faults, without the
truncating ones). What to sabotage is a `FaultPlan` of `Fault`s installed with `install(plan)`:

    plan = FaultPlan([Fault("crash", in_step(6), nth=2)])   # die before the 2nd file of step 6
    with install(plan):
        ...
    plan.writes   # every write attempt: path, bytes, what happened

Checkpoint data files are stored under token-suffixed names (`model.3f9a1c2b7d.safetensors`, see
ckpt_files.py); `named`, `Write.logical` and `files_of` speak of their logical names, so a fault
aimed at `named("model.safetensors")` hits whichever attempt writes the model file.

Modes:
    crash           raise SimulatedCrash before writing (the process died mid-save)
    truncate_crash  store the first half of the bytes, then raise SimulatedCrash
    truncate        silently store the first half and carry on (an upload that landed short)
    drop            silently store nothing and carry on (an upload that never arrived)
    flip            silently store the bytes with one byte changed (same size, wrong checksum)
    fail_once       raise OSError(EIO) once, then behave (transient: Storage retries it)
    fail_always     raise PermissionError on every matching write (not transient)
    delay           sleep `seconds` (or until `release` is set) before writing

A fault with `on="read"` applies to reads (`cat_file`) instead, and `on="remove"` to deletions
of files: crash, fail_once, fail_always and delay (e.g. hold a background save at its first read
until training has moved on, or refuse deletes as a Drive with a full trash does).

`plan.kill()` marks the process dead: from then on every write, from any thread, raises
SimulatedCrash without storing anything (a background save held by a delay finds it dead when
it wakes, as when the whole process is killed mid-save).

`SimulatedCrash` is a BaseException, like the SystemExit/KeyboardInterrupt a dying process sees,
so no `except Exception` in the library can swallow it.
"""

from __future__ import annotations

import errno
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

from ckpt_files import logical_name

MODES = ("crash", "truncate_crash", "truncate", "drop", "flip", "fail_once", "fail_always", "delay")
OTHER_OP_MODES = ("crash", "fail_once", "fail_always", "delay")  # for reads and removes
_ONCE = ("crash", "truncate_crash", "truncate", "drop", "flip", "fail_once")  # fire on one write only


class SimulatedCrash(BaseException):
    """The process died here (raised from inside a write)."""


PathPredicate = Callable[[str], bool]


def in_folder(fragment: str) -> PathPredicate:
    """Paths inside a folder whose path ends with `fragment` (e.g. "checkpoints/step-000000006")."""
    marker = "/" + fragment.strip("/") + "/"
    return lambda path: marker in path


def in_step(step: int) -> PathPredicate:
    """Files of the checkpoint folder of `step`."""
    return in_folder(f"checkpoints/step-{step:09d}")


def in_steps_from(first: int) -> PathPredicate:
    """Files of every checkpoint folder of step `first` or later."""
    def match(path: str) -> bool:
        step = step_of(path)
        return step is not None and step >= first
    return match


def named(basename: str) -> PathPredicate:
    """Paths whose file is `basename`, or a save attempt's token-suffixed name for it."""
    return lambda path: logical_name(path.rsplit("/", 1)[-1]) == basename


def in_thread(name: str) -> PathPredicate:
    """Any path, when the call comes from the thread called `name` (e.g. "checkpoint-9")."""
    return lambda path: threading.current_thread().name == name


def both(*predicates: PathPredicate) -> PathPredicate:
    return lambda path: all(p(path) for p in predicates)


def step_of(path: str) -> Optional[int]:
    """The step of a path inside `checkpoints/step-NNNNNNNNN/`, else None."""
    parts = path.split("/")
    for parent, name in zip(parts, parts[1:]):
        if parent == "checkpoints" and name.startswith("step-") and name[5:].isdigit() and len(name) == 14:
            return int(name[5:])
    return None


@dataclass
class Fault:
    """Sabotage the writes (or reads, removes: `on`) whose path matches `match`.

    `nth` (1-based) picks one matching write (counting retries of the same file as writes too);
    without it the first matching write fires. crash/truncate*/flip/fail_once fire once;
    fail_always and delay fire on every matching write from the `nth` on.
    """

    mode: str
    match: PathPredicate
    nth: Optional[int] = None
    seconds: float = 0.0
    release: Optional[threading.Event] = None  # a delay ends early when this is set
    on: str = "write"  # or "read", "remove"
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fault mode {self.mode!r}; one of {MODES}")
        if self.on not in ("write", "read", "remove") or (self.on != "write" and self.mode not in OTHER_OP_MODES):
            raise ValueError(f"fault {self.mode!r} cannot apply on {self.on!r}")

    def applies(self, path: str, op: str = "write") -> bool:
        """Count a matching call and say whether this fault fires on it (call under the plan lock)."""
        if op != self.on or not self.match(path):
            return False
        self.seen += 1
        if self.mode in _ONCE:
            hit = self.fired == 0 and self.seen == (self.nth or 1)
        else:
            hit = self.seen >= (self.nth or 1)
        if hit:
            self.fired += 1
        return hit


@dataclass
class Write:
    """One write attempt as the filesystem saw it."""

    path: str
    nbytes: Optional[int]  # None for a write through open()
    outcome: str = "ok"  # "ok" or the mode of the fault that fired
    stored: Optional[int] = None  # bytes actually stored (None when nothing was)
    thread: str = ""

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def logical(self) -> str:
        """The logical name of a checkpoint file (the token of its save attempt stripped)."""
        return logical_name(self.name)

    @property
    def step(self) -> Optional[int]:
        return step_of(self.path)


@dataclass
class FaultPlan:
    faults: list[Fault] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    # a full disk: writes under `quota_root` that would make its files exceed `quota` bytes raise
    # OSError(ENOSPC), as a local disk or a Drive over its storage quota does
    quota: Optional[int] = None
    quota_root: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (operation, path) of every call
    # crash matrix: the process dies at the `crash_at`-th call (1-based) that `crash_where` matches,
    # before the call touches the store; every later call from any thread dies too
    crash_at: Optional[int] = None
    crash_where: Callable[[str, str, str], bool] = lambda op, path, thread: True
    crashed: Optional[tuple[str, str, str]] = None  # (op, path, thread) of the call that died
    threads: list[str] = field(default_factory=list)  # the thread of each entry of `calls`

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.dead = False

    def kill(self) -> None:
        """From now on nothing more is written: every write raises SimulatedCrash."""
        self.dead = True

    def check_alive(self, path: str) -> None:
        if self.dead:
            raise SimulatedCrash(f"the process is dead: {path} is never written")

    def decide(self, path: str, nbytes: Optional[int]) -> tuple[Write, Optional[Fault]]:
        with self._lock:
            fault = next((f for f in self.faults if f.applies(path)), None)
            write = Write(path, nbytes, outcome=fault.mode if fault else "ok", thread=threading.current_thread().name)
            self.writes.append(write)
        return write, fault

    def fault_for(self, op: str, path: str) -> Optional[Fault]:
        """The fault that fires on this read or remove, if any."""
        with self._lock:
            return next((f for f in self.faults if f.applies(path, op)), None)

    def note_call(self, op: str, path: str) -> None:
        thread = threading.current_thread().name
        with self._lock:
            self.calls.append((op, path))
            self.threads.append(thread)
            if self.crash_at is not None and self.crashed is None and self.crash_where(op, path, thread):
                self._matched = getattr(self, "_matched", 0) + 1
                if self._matched == self.crash_at:
                    self.crashed, self.dead = (op, path, thread), True
        if self.crashed is not None:
            raise SimulatedCrash(f"the process died at {self.crashed[0]} of {self.crashed[1]}: {op} of {path} never happens")

    def count(self, op: str, predicate: PathPredicate = lambda path: True) -> int:
        """How many `op` calls ("ls", "find", "read", "write", "remove", "exists") matched."""
        return sum(1 for o, p in self.calls if o == op and predicate(p))

    def over_quota(self, path: str, nbytes: int) -> bool:
        if self.quota is None or not path.startswith(self.quota_root):
            return False
        store = MemoryFileSystem.store
        used = sum(f.size for key, f in list(store.items()) if key.startswith(self.quota_root) and key != path)
        return used + nbytes > self.quota

    def note_removed(self, path: str) -> None:
        with self._lock:
            self.removed.append(path)

    # -- queries for assertions ----------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        """Steps whose manifest.json was stored in full, in the order they were committed."""
        return [w.step for w in self.writes if w.name == "manifest.json" and w.step is not None
                and w.outcome in ("ok", "delay") and w.stored == w.nbytes]

    def files_of(self, step: int) -> list[str]:
        """Logical names stored in full in the folder of `step`, in write order (retries deduplicated)."""
        out: list[str] = []
        for w in self.writes:
            if w.step == step and w.outcome in ("ok", "delay") and w.stored == w.nbytes and w.logical not in out:
                out.append(w.logical)
        return out

    def attempts(self, predicate: PathPredicate) -> list[Write]:
        return [w for w in self.writes if predicate(w.path)]


_NO_PLAN = FaultPlan()


class FaultyFileSystem(MemoryFileSystem):
    """`memory://` whose writes (and reads and removes, where a fault asks) go through the installed plan."""

    protocol = ("faulty",)
    plan: FaultPlan = _NO_PLAN  # class-level: fsspec caches instances, the plan belongs to the test
    _in_pipe = threading.local()  # set while pipe_file writes through _open
    _in_find = threading.local()  # set while find lists folder by folder (counted as one call)

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("faulty://"):
            path = "memory://" + path[len("faulty://"):]
        return super()._strip_protocol(path)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        data = bytes(value)
        self.plan.check_alive(path)
        self.plan.note_call("write", path)
        write, fault = self.plan.decide(path, len(data))
        store = data
        if fault is not None:
            _raise_or_wait(fault, path)
            self.plan.check_alive(path)  # it may have died while this write waited
            if fault.mode == "drop":
                return
            if fault.mode in ("truncate", "truncate_crash"):
                store = data[: len(data) // 2]
            elif fault.mode == "flip":
                store = bytearray(data)
                store[len(store) // 2] ^= 0xFF
                store = bytes(store)
        if self.plan.over_quota(path, len(store)):
            write.outcome = "nospace"
            raise OSError(errno.ENOSPC, "No space left on device (simulated)", path)
        self._in_pipe.inside = True
        try:
            super().pipe_file(path, store, mode=mode, **kwargs)
        finally:
            self._in_pipe.inside = False
        write.stored = len(store)
        if fault is not None and fault.mode == "truncate_crash":
            raise SimulatedCrash(f"simulated crash after writing half of {path}")

    def _open(self, path, mode="rb", **kwargs):
        if any(c in mode for c in "wax+") and not getattr(self._in_pipe, "inside", False):
            path = self._strip_protocol(path)
            self.plan.check_alive(path)
            write, fault = self.plan.decide(path, None)
            if fault is not None:
                _raise_or_wait(fault, path)
                self.plan.check_alive(path)
                if fault.mode != "delay":
                    raise NotImplementedError(f"fault {fault.mode!r} needs a pipe_file write, not open({mode!r})")
            write.stored = 0
        return super()._open(path, mode=mode, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        if not getattr(self._in_find, "inside", False):
            self.plan.note_call("ls", self._strip_protocol(path))
        return super().ls(path, detail=detail, **kwargs)

    def find(self, path, *args, **kwargs):
        self.plan.note_call("find", self._strip_protocol(path))
        self._in_find.inside = True
        try:
            return super().find(path, *args, **kwargs)
        finally:
            self._in_find.inside = False

    def exists(self, path, **kwargs):
        self.plan.note_call("exists", self._strip_protocol(path))
        return super().exists(path, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.plan.note_call("read", self._strip_protocol(path))
        fault = self.plan.fault_for("read", self._strip_protocol(path))
        if fault is not None:
            _raise_or_wait(fault, path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _rm(self, path):
        path = self._strip_protocol(path)
        fault = self.plan.fault_for("remove", path)
        if fault is not None:
            _raise_or_wait(fault, path)
        self.plan.check_alive(path)
        self.plan.note_call("remove", path)
        self.plan.note_removed(path)
        return super()._rm(path)


def _raise_or_wait(fault: Fault, path: str) -> None:
    """The part of a fault that happens before the store is touched."""
    if fault.mode == "crash":
        raise SimulatedCrash(f"simulated crash at {fault.on} of {path}")
    if fault.mode == "fail_once":
        raise OSError(errno.EIO, "simulated transient I/O error", path)
    if fault.mode == "fail_always":
        raise PermissionError(errno.EACCES, "simulated permanent failure", path)
    if fault.mode == "delay":
        if fault.release is not None:
            fault.release.wait(fault.seconds)
        else:
            time.sleep(fault.seconds)


fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


@contextmanager
def install(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Route `faulty://` writes through `plan` for the duration of the block."""
    previous, FaultyFileSystem.plan = FaultyFileSystem.plan, plan
    try:
        yield plan
    finally:
        FaultyFileSystem.plan = previous


def forget(url: str) -> None:
    """Drop everything under a `memory://` or `faulty://` URL from the shared store."""
    root = MemoryFileSystem._strip_protocol(url.replace("faulty://", "memory://", 1))
    for key in [k for k in MemoryFileSystem.store if k == root or k.startswith(root + "/")]:
        MemoryFileSystem.store.pop(key, None)
    MemoryFileSystem.pseudo_dirs[:] = [d for d in MemoryFileSystem.pseudo_dirs if not (d == root or d.startswith(root + "/"))]
