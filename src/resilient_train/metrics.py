"""Metrics of a run: CSV under `logs/` (always), TensorBoard too when it is installed.

A crash mid-append can leave a torn last row in `logs/metrics.csv` (a line without its newline).
Readers (`read_rows`) skip it and any row that does not parse; the next append cuts it off first,
so a new session's row never lands glued onto it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from typing import Any, Optional

from resilient_train.storage import Storage

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
COLUMNS = ("session", "step", "epoch", "time", "loss", "lr", "samples_per_sec", "val_loss")
LOGS, METRICS_CSV = "logs", "metrics.csv"


def read_rows(run: Storage) -> list[dict[str, Any]]:
    """The rows of `logs/metrics.csv` that parse, with `session` and `step` as ints.

    Skipped: a torn last line (no newline after it: the append was cut short), lines with another
    number of fields than the header (e.g. a row glued onto a torn one by an older version), and
    rows whose session or step is not an integer. Raises FileNotFoundError when there is no file.
    """
    text = run.read_bytes(LOGS, METRICS_CSV).decode("utf-8", errors="replace")
    lines = text.split("\n")
    lines.pop()  # after the last newline: "" when the file is whole, else the torn row
    header: Optional[list[str]] = None
    rows: list[dict[str, Any]] = []
    for line in lines:
        try:
            fields = next(csv.reader([line.rstrip("\r")]), [])
        except csv.Error:
            continue
        if header is None:
            header = fields
            continue
        if len(fields) != len(header):
            continue
        row: dict[str, Any] = dict(zip(header, fields, strict=True))
        try:
            row["session"], row["step"] = int(row.get("session") or 0), int(row["step"])
        except (KeyError, ValueError):
            continue
        rows.append(row)
    return rows


class MetricsLogger:
    """Rows of metrics, appended to `logs/metrics.csv` (rewritten whole on object stores, which
    cannot append; a torn last row is cut off before the first append of a session).

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
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writerows(rows)
        header = ",".join(COLUMNS) + "\r\n"  # what DictWriter.writeheader writes
        if self.run.is_local:
            self.run.makedirs(LOGS)
            _append_local(self.run.path(LOGS, METRICS_CSV), header, buffer.getvalue())
            return
        try:  # object stores cannot append: read, cut a torn tail, write back whole
            old = self.run.read_bytes(LOGS, METRICS_CSV).decode("utf-8", errors="replace")
        except FileNotFoundError:
            old = ""
        if old and not old.endswith("\n"):
            kept = old[: old.rfind("\n") + 1]
            _warn_torn(self.run.display(LOGS, METRICS_CSV), len(old) - len(kept))
            old = kept
        self.run.write_text((old or header) + buffer.getvalue(), LOGS, METRICS_CSV)

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()


def _append_local(path: str, header: str, text: str) -> None:
    """Append `text` (after `header` when the file is new or empty), cutting a torn last row first."""
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                keep = _last_newline_end(f, size)
                f.truncate(keep)
                _warn_torn(path, size - keep)
                size = keep
        f.write(((header if size == 0 else "") + text).encode("utf-8"))


def _last_newline_end(f: Any, size: int, block: int = 1 << 16) -> int:
    """Offset just after the last newline before `size` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        index = f.read(end - start).rfind(b"\n")
        if index >= 0:
            return start + index + 1
        end = start
    return 0


def _warn_torn(where: str, nbytes: int) -> None:
    log.warning("%s ended in a torn row (a crash mid-append); cut its %d byte(s) before appending", where, nbytes)
