"""Session budgets: save and stop before the machine is taken away.

Colab ends a session after at most 12 hours (24 paid) and sends no reliable signal first, so a
run that waits for SIGTERM loses everything since its last checkpoint. With a budget the trainer
stops by itself, leaving time for one more save as long as the slowest save so far (plus a step).
"""

from __future__ import annotations

import re
import time
from typing import Optional

from resilient_train.env import host_kind
from resilient_train.errors import ConfigError

COLAB_DEFAULT = "11h30m"  # the free tier's 12 h limit, minus a margin
_PART = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")


def parse_duration(text: str, key: str = "checkpoint.session_budget") -> float:
    """Seconds in `11h30m`, `90m`, `45s`, `1.5h` or a plain number of seconds."""
    compact = str(text).replace(" ", "").lower()
    parts = _PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ConfigError(key, f"'{text}' is not a duration like 11h30m, 90m, 45s or 3600")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
    return sum(float(n) * scale[u] for n, u in parts)


def budget_seconds(setting: Optional[str]) -> Optional[float]:
    """`auto`: the Colab default on Colab, none elsewhere; `off`: none; else the duration."""
    value = (setting or "auto").strip().lower()
    if value == "off":
        return None
    if value == "auto":
        return parse_duration(COLAB_DEFAULT) if host_kind() == "colab" else None
    return parse_duration(value)


def session_elapsed_offset() -> float:
    """Seconds the session had already used when training started: on Colab the VM's uptime."""
    if host_kind() != "colab":
        return 0.0
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


class SessionDeadline:
    """Answers "is it time to save and stop?" once per step."""

    def __init__(self, budget: float, already_used: float = 0.0) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget - already_used
        self._last = time.monotonic()
        self.slowest_step = 0.0

    def expired(self, slowest_save: Optional[float]) -> bool:
        now = time.monotonic()
        self.slowest_step = max(self.slowest_step, now - self._last)
        self._last = now
        save = slowest_save if slowest_save is not None else min(60.0, 0.1 * self.budget)
        return now + 1.5 * (save + self.slowest_step) >= self.deadline
