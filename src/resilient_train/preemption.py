"""Turning SIGTERM/SIGINT into a request to stop at the next optimizer-step boundary.

The loop finishes the step it is in, commits a checkpoint and exits with code 75. A second Ctrl-C
interrupts at once, for a user who really means it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional


class StopRequest:
    """A flag set by signals while installed (a context manager; restores previous handlers)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def request(self, reason: str) -> None:
        """Ask the loop to stop for a reason other than a signal (a deadline)."""
        self.reason = self.reason or reason
