"""Weights & Biases: one W&B run (id kept in the run folder), resumed with `resume="allow"` by every session.

Online, W&B itself refuses steps below the run's last step; those few steps keep the dead session's
values (skipped here with one line, instead of a W&B warning per row). Offline, each session writes
its own segment; `wandb sync` uploads them in order into the same run, where re-logged steps may
appear once per session (the `session` metric tells them apart).
"""

from __future__ import annotations

import uuid
from typing import Any, Optional, cast

from resilient_train.trackers.base import FAILED, FINISHED, SessionInfo, log


class WandbTracker:
    """One W&B run (id kept in the run folder), resumed with `resume="allow"` by every session."""

    name = "wandb"
    package = "wandb"
    needs_run_id = True

    def __init__(self, info: SessionInfo) -> None:
        import wandb

        record = info.ids.get(self.name)
        self.run_id = record.get("id") or uuid.uuid4().hex[:12]
        if not record.get("id"):  # recorded before init: a session killed during init still left its id
            info.ids.remember(self.name, {"id": self.run_id, "project": info.project})
        self._session = info.session
        self._run = wandb.init(
            project=info.project, id=self.run_id, name=info.run_name, resume="allow", mode=cast(Any, info.logging.wandb_mode),
            config={**info.params.config, "env": dict(info.params.environment),
                    "resilient_train": {"session": info.session, "start_step": info.start_step}},
            allow_val_change=True,  # a resumed run may change e.g. trainer.max_steps, and the machine
            reinit="create_new",  # never finish a W&B run the user's own code has open
        )
        # online, W&B knows the run's last step and drops rows below it; offline it knows nothing (0)
        self._floor = int(getattr(self._run, "starting_step", 0) or 0)
        self._skipped: Optional[int] = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if step < self._floor:
            if self._skipped is None:
                self._skipped = step
                log.info("wandb: steps %d..%d were logged by the session before; W&B keeps those rows", step, self._floor - 1)
            return
        self._run.log({**values, "session": self._session}, step=step)

    def flush(self) -> None:
        pass

    def close(self, outcome: str = FINISHED) -> None:
        self._run.finish(exit_code=1 if outcome == FAILED else 0)
