"""TensorBoard: event files under `logging.tensorboard_dir` (default `RUN/logs/tensorboard`).

The writer opens with `purge_step = resumed step + 1`; TensorBoard then hides the older events from
that step on, so every step shows once, with the newest session's value.
"""

from __future__ import annotations

import os

from resilient_train.trackers.base import FINISHED, LOGS, SessionInfo


class TensorBoardTracker:
    """Event files under `logging.tensorboard_dir` (default `RUN/logs/tensorboard`)."""

    name = "tensorboard"
    package = "torch.utils.tensorboard"
    needs_run_id = False  # its directory is all it needs; it works without logs/trackers.json

    def __init__(self, info: SessionInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = tensorboard_dir(info)
        # purge_step: TensorBoard hides older events at and after it, i.e. what the dead session
        # logged after the checkpoint this session resumed from (`start_step` itself stays)
        self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=info.start_step + 1, flush_secs=30)
        if info.ids.get(self.name).get("dir") != self.log_dir:
            info.ids.remember(self.name, {"dir": self.log_dir})
        self._writer.add_text("resilient_train/session", _session_markdown(info), global_step=info.start_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key != "epoch":
                self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, outcome: str = FINISHED) -> None:
        self._writer.close()


def tensorboard_dir(info: SessionInfo) -> str:
    """`logging.tensorboard_dir`, else `RUN/logs/tensorboard` (local) or `./tb/<run name>` (remote).

    TensorBoard without TensorFlow writes local files only, so a gs:// run keeps its events here.
    """
    if info.logging.tensorboard_dir:
        return info.logging.tensorboard_dir
    if info.run.backend.local_paths:
        return info.run.path(LOGS, "tensorboard")
    return os.path.join("tb", info.run_name)


def _session_markdown(info: SessionInfo) -> str:
    lines = [f"session {info.session}, from step {info.start_step}", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in {**info.params.environment, **info.params.config}.items()]
    return "\n".join(lines)
