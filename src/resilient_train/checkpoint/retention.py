"""Which committed checkpoints to delete: a pure function of the list, so it is easy to reason about.

Kept: the newest `keep_last`, the best `keep_best` by `monitor`, every multiple of
`keep_every_n_steps`, and always the newest one. Ordered by step, never by file time or name.
`keep_last=None` keeps everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from resilient_train.checkpoint.info import COMMITTED, CheckpointInfo


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: Optional[int] = 3
    keep_best: Optional[int] = None
    monitor: Optional[str] = None
    mode: str = "min"
    keep_every_n_steps: Optional[int] = None

    @classmethod
    def from_config(cls, ck: Any) -> "RetentionPolicy":
        return cls(
            keep_last=ck.keep_last,
            keep_best=getattr(ck, "keep_best", None),
            monitor=getattr(ck, "monitor", None),
            mode=getattr(ck, "mode", "min"),
            keep_every_n_steps=getattr(ck, "keep_every_n_steps", None),
        )

    def doomed(self, infos: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """The committed checkpoints this policy deletes, oldest first."""
        if self.keep_last is None:
            return []
        committed = sorted((i for i in infos if i.status == COMMITTED), key=lambda i: i.step)
        if not committed:
            return []
        keep = {i.step for i in committed[-self.keep_last:]} | {committed[-1].step}
        if self.keep_every_n_steps:
            keep |= {i.step for i in committed if i.step % self.keep_every_n_steps == 0}
        monitor = self.monitor
        if self.keep_best and monitor:
            scored = [i for i in committed if isinstance(i.metrics.get(monitor), (int, float))]
            scored.sort(key=lambda i: i.metrics[monitor], reverse=self.mode == "max")
            keep |= {i.step for i in scored[: self.keep_best]}
        return [i for i in committed if i.step not in keep]
