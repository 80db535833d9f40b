"""Turning stop signals into a request to stop at the next optimizer-step boundary.

The loop finishes the step it is in, commits a checkpoint and exits with code 75. Which signals
mean "stop" depends on who stops the job: Colab, SkyPilot and Kubernetes send SIGTERM, a user
presses Ctrl-C (SIGINT), and SLURM sends whatever `--signal` names (usually SIGUSR1) a while
before the time limit. So the set is configurable (`checkpoint.stop_signals`). A second Ctrl-C
interrupts at once, for a user who really means it.

A request is honoured from the moment the CLI starts, not only once the loop runs: `run` and
`resume` call `listen_early` first (the default signals), again as soon as the config is resolved
(the configured ones), and `Trainer.fit`'s own StopRequest takes over from that recorder and sees
a request made before it: a stop asked for while the task file imports or `build(cfg)` loads a
model ends the process with 75 before training, instead of the signal's default action.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any, ClassVar, Optional

from resilient_train.errors import BATCH_LOST, PEER_LEFT

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGINT")
# signals a scheduler or a person sends to ask a job to end; the others report faults, children,
# terminals or timers (SLURM sends SIGCONT around a resume), and must keep their own meaning
_STOPPABLE = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGALRM", "SIGXCPU", "SIGPWR")


def parse_signal(name: Any) -> signal.Signals:
    """`SIGUSR1`, `USR1`, `usr1` or the number 10 -> signal.SIGUSR1; ValueError naming the choice."""
    text = str(name).strip().upper()
    if text.isdigit():
        try:
            sig = signal.Signals(int(text))
        except ValueError:
            raise ValueError(f"{name!r} is not a signal number on this system") from None
    else:
        full = text if text.startswith("SIG") else "SIG" + text
        try:
            sig = signal.Signals[full]
        except KeyError:
            raise ValueError(f"{name!r} is not a signal name (e.g. SIGTERM, SIGINT, SIGUSR1)") from None
    if sig.name in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"{sig.name} cannot be caught by a process; use SIGTERM or SIGUSR1")
    if sig.name not in _STOPPABLE:
        allowed = ", ".join(name for name in _STOPPABLE if hasattr(signal, name))
        raise ValueError(f"{sig.name} is not a request to stop (it reports a fault, a child, a terminal or a timer); use one of {allowed}")
    return sig


class StopRequest:
    """A flag set by the stop signals while installed (a context manager; restores previous handlers)."""

    _early: ClassVar[Optional["StopRequest"]] = None  # the process's recorder from CLI start (listen_early)

    def __init__(self, signals: Iterable[Any] = DEFAULT_STOP_SIGNALS) -> None:
        self.reason: Optional[str] = None
        self.signalled = False  # a stop signal came (not only a `request`): it may have reached other processes
        self.signals = tuple(dict.fromkeys(parse_signal(s) for s in signals))
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        early = StopRequest._early
        if early is not None and early is not self:  # after our handlers are in: no request falls between
            self.reason = self.reason or early.reason
            self.signalled = self.signalled or early.signalled
        return self

    @classmethod
    def listen_early(cls, signals: Iterable[Any] = DEFAULT_STOP_SIGNALS) -> None:
        """Record stop requests process-wide from now on (the CLI's start, then the configured
        set once the config is resolved), keeping a request already recorded."""
        previous = cls._early
        early = cls(signals)
        early.__enter__()
        if previous is not None:
            early.reason = early.reason or previous.reason
            early.signalled = early.signalled or previous.signalled
            for sig, handler in previous._previous.items():
                if sig in early._previous:  # taken over: what to put back at the end is the original
                    early._previous[sig] = handler
                else:  # no longer a stop signal: its own meaning again
                    signal.signal(sig, handler)
            previous._previous.clear()
        cls._early = early

    @classmethod
    def retune_early(cls, signals: Iterable[Any]) -> None:
        """The configured signals, where a CLI command listens early (a no-op from Python)."""
        if cls._early is not None:
            cls.listen_early(signals)

    @classmethod
    def early_reason(cls) -> Optional[str]:
        """The stop asked for since the CLI started, if any."""
        return cls._early.reason if cls._early is not None else None

    @classmethod
    def forget_early(cls) -> None:
        """Put back the handlers from before `listen_early` (the CLI's end)."""
        if cls._early is not None:
            cls._early.__exit__()
            cls._early = None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        # A group signal kills the DataLoader workers too, and their SIGCHLDs can arrive while this
        # handler runs: CPython then runs torch's SIGCHLD handler nested inside this one, before
        # it is quieted, and its RuntimeError would escape from here (and end the run with 1, the
        # stop lost when it came before `reason` was set). So: set, quiet, and on that error again.
        while True:
            try:
                self.reason = signal.Signals(signum).name
                self.signalled = True
                _quiet_worker_deaths()
                return
            except RuntimeError as exc:
                if not _worker_death(exc):
                    raise

    def request(self, reason: str) -> None:
        """Ask the loop to stop for a reason other than a signal (a deadline)."""
        self.reason = self.reason or reason

    def explains(self, exc: BaseException) -> Optional[str]:
        """How this stop caused `exc` in the middle of a step or validation (errors.BATCH_LOST or
        PEER_LEFT), or None when it did not: no stop signal came (a deadline's `request` kills no
        worker and makes no rank leave), or an error of another kind.

        BATCH_LOST: a DataLoader worker died of the signal, which went to the whole process group.
        Either the loader noticed (torch's own words), or it had not yet and the worker's batch
        died in transfer: the connection its tensors come through (`file_descriptor` sharing)
        reset or closed (seen in CI: exit 1 with "storage unreachable (ConnectionResetError...)"
        instead of 75). PEER_LEFT: a collective failed because another rank's process left it,
        most likely because it lost its batch so while this one, whose batch came, waited for it
        in the all-reduce (gloo; see `_peer_left`).
        """
        if not self.signalled:
            return None
        if _worker_death(exc) or isinstance(exc, _LOST_IN_TRANSFER):
            return BATCH_LOST
        return PEER_LEFT if _peer_left(exc) else None


# what a DataLoader worker killed by a stop signal can surface as in the main process (see explains)
_LOST_IN_TRANSFER = (ConnectionError, EOFError)
WORKER_LOSS = (RuntimeError, *_LOST_IN_TRANSFER)


def _peer_left(exc: BaseException) -> bool:
    """gloo's words for a collective whose peer process went away: a plain RuntimeError saying
    the connection was closed or reset by the peer. NCCL raises nothing in the main thread then
    (its watchdog ends the process after the collective's timeout), so this is gloo's case only."""
    return isinstance(exc, RuntimeError) and ("closed by peer" in str(exc) or "reset by peer" in str(exc))


def _worker_death(exc: BaseException) -> bool:
    """torch's own words for a DataLoader worker that died (killed, or exited unexpectedly)."""
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)


def _quiet_worker_deaths() -> None:
    """After a stop signal, DataLoader workers killed by the same signal are expected: Docker,
    Kubernetes and Ctrl-C in a terminal signal the whole process group. torch's SIGCHLD handler
    would raise its RuntimeError into the main thread wherever it is (mid-step, mid-save) and end
    the run with 1; wrapped, it raises nothing, and the loop stops at the step boundary as asked.
    A worker lost without a stop still fails the DataLoader's own next fetch.
    """
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGCHLD)
    if not callable(current) or getattr(current, "quiet_after_stop", False):
        return

    def quiet(signum: int, frame: Optional[FrameType]) -> None:
        try:
            current(signum, frame)
        except RuntimeError:
            pass  # a worker died of the stop signal

    quiet.quiet_after_stop = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, quiet)
