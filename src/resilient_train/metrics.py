"""Metrics of a run: CSV under `logs/` (always), TensorBoard too when it is installed."""

from __future__ import annotations

import csv
import io
import logging
import time
from typing import Any, Optional

from resilient_train.storage import Storage

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
COLUMNS = ("session", "step", "epoch", "time", "loss", "lr", "samples_per_sec", "val_loss")


class MetricsLogger:
    """Rows of metrics, appended to `logs/metrics.csv` (rewritten whole on object stores).

    A resumed session re-logs the steps after its checkpoint; readers keep, per step, the row of
    the newest session.
    """

    def __init__(self, run: Storage, session: int) -> None:
        self.run = run
        self.session = session
        self._pending: list[dict[str, Any]] = []
        self._tb: Optional[Any] = None
        if run.is_local:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV only
                pass
            else:
                self._tb = SummaryWriter(log_dir=run.path("logs", "tensorboard"))

    def log(self, step: int, **values: Any) -> None:
        row = {"session": self.session, "step": step, "time": round(time.time(), 3), **values}
        self._pending.append(row)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Write pending rows; a storage error warns and keeps them for the next try.

        Metrics are not worth stopping a run for (checkpoints are what must not be lost).
        """
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            self._append(rows)
        except Exception as exc:
            self._pending = (rows + self._pending)[-MAX_PENDING:]
            log.warning("could not write logs/metrics.csv (%s: %s); will retry at the next flush", type(exc).__name__, exc)
            return
        if self._tb is not None:
            self._tb.flush()

    def _append(self, rows: list[dict[str, Any]]) -> None:
        self.run.makedirs("logs")
        path = self.run.path("logs", "metrics.csv")
        exists = self.run.exists("logs", "metrics.csv")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
        if self.run.is_local:
            with open(path, "a", newline="") as f:
                f.write(buffer.getvalue())
        else:  # object stores cannot append
            old = self.run.read_text("logs", "metrics.csv") if exists else ""
            self.run.write_text(old + buffer.getvalue(), "logs", "metrics.csv")

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
