"""Metrics of a run: `logs/metrics.csv` (always) and the experiment trackers of `logging.trackers`.

The CSV has a column per metric ever logged: the trainer's own (`COLUMNS`), then whatever else a
row brings (metrics returned by `training_step`, device stats such as `gpu_mem_peak_gb`), in the
order they first appear. A row with a new key widens the file: it is written again whole with the
wider header (the earlier rows padded with empty fields), through a temporary file and a rename on
local disk, so a crash leaves the old file or the new one and never loses a row. Otherwise rows are
appended (object stores, which cannot append, get the file rewritten whole either way).

A crash mid-append can leave a torn last row (a line without its newline). Readers (`read_rows`)
skip it and any row that does not parse; the next write cuts it off first, so a new session's row
never lands glued onto it.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Optional

from resilient_train.errors import TrainingStopped
from resilient_train.storage import Storage
from resilient_train.trackers import FAILED, FINISHED, STOPPED, RunParams, Tracker, open_trackers, scalars

if TYPE_CHECKING:
    from resilient_train.config import LoggingConfig, RunConfig

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
    header, rows = _parse(text)
    result: list[dict[str, Any]] = []
    for fields in rows:
        row: dict[str, Any] = dict(zip(header, fields, strict=True))
        try:
            row["session"], row["step"] = int(row.get("session") or 0), int(row["step"])
        except (KeyError, ValueError):
            continue
        result.append(row)
    return result


def _parse(text: str) -> tuple[list[str], list[list[str]]]:
    """(header, the rows with as many fields as it), torn last line and unparsable lines left out."""
    lines = text.split("\n")
    lines.pop()  # after the last newline: "" when the file is whole, else the torn row
    header: Optional[list[str]] = None
    rows: list[list[str]] = []
    for line in lines:
        try:
            fields = next(csv.reader([line.rstrip("\r")]), [])
        except csv.Error:
            continue
        if header is None:
            header = fields
        elif len(fields) == len(header):
            rows.append(fields)
    return header or [], rows


_TORCH_SIGCHLD_HANDLER = os.path.join("torch", "utils", "data", "_utils", "signal_handling.py")


def _raised_by_a_dead_worker(exc: BaseException) -> bool:
    """Whether torch's SIGCHLD handler raised `exc`: when a DataLoader worker dies it raises a plain
    RuntimeError in the main thread wherever that thread is, often inside a metrics write, which
    has nothing to do with it. Told by the frame it came from, not by its text."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(_TORCH_SIGCHLD_HANDLER):
            return True
        tb = tb.tb_next
    return False


class MetricsLogger:
    """Rows of metrics, to `logs/metrics.csv` (at each `flush`) and to the session's trackers
    (at each `log`, so their charts are live). Global rank 0 only.

    A resumed session re-logs the steps after its checkpoint; CSV readers keep, per step, the row of
    the newest session, and each tracker does what it can (see `resilient_train.trackers`).
    """

    def __init__(self, run: Storage, session: int, logging: Optional[LoggingConfig] = None, start_step: int = 0,
                 params: Optional[RunParams] = None) -> None:
        from resilient_train.config import LoggingConfig

        self.run = run
        self.session = session
        self._pending: list[dict[str, Any]] = []
        self.trackers: list[Tracker] = open_trackers(run, session, logging or LoggingConfig(), start_step, params or RunParams())

    @classmethod
    def for_run(cls, run: Storage, session: int, config: RunConfig, start_step: int) -> MetricsLogger:
        """The logger of a training session: `config.logging`'s trackers, given the config and machine."""
        return cls(run, session, logging=config.logging, start_step=start_step, params=RunParams.of(config))

    def log(self, step: int, **values: Any) -> None:
        """One row: `values` are any scalars (new names become new CSV columns)."""
        row = {"session": self.session, "step": step, "time": round(time.time(), 3), **values}
        self._pending.append(row)
        if self.trackers:
            numbers = scalars(values)
            for tracker in list(self.trackers):
                try:
                    tracker.log(step, numbers)
                except Exception as exc:  # noqa: BLE001 - a tracker outage must not stop the training
                    self._drop(tracker, "log", exc)

    def flush(self) -> None:
        """Write pending rows; a storage error warns and keeps them for the next try.

        Metrics are not worth stopping a run for (checkpoints are what must not be lost).
        """
        for tracker in list(self.trackers):
            try:
                tracker.flush()
            except Exception as exc:  # noqa: BLE001
                self._drop(tracker, "flush", exc)
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        try:
            self._write(rows)
        except Exception as exc:
            self._pending = (rows + self._pending)[-MAX_PENDING:]
            if _raised_by_a_dead_worker(exc):
                log.warning("a DataLoader worker was killed by a signal (%s); a signal sent to the whole process group "
                            "(as Docker and Kubernetes stop a container) reaches the workers too; the metrics rows are "
                            "kept for the next flush", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            else:
                log.warning("could not write logs/metrics.csv (%s: %s); will retry at the next flush", type(exc).__name__, exc)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        path = self.run.local_path(LOGS, METRICS_CSV)  # an OS path can be appended to in place
        if path is not None:
            header = _local_header(path)
            if header is not None and not _new_keys(header, rows):
                _append_local(path, _rows_text(header, rows))
                return
        try:  # a new file, new columns, or an object store (which cannot append): write it whole
            old = self.run.read_bytes(LOGS, METRICS_CSV).decode("utf-8", errors="replace")
        except FileNotFoundError:
            old = ""
        if old and not old.endswith("\n"):
            kept = old[: old.rfind("\n") + 1]
            _warn_torn(self.run.display(LOGS, METRICS_CSV), len(old) - len(kept))
            old = kept
        header, _ = _parse(old)
        if not header:
            old, header = "", []
        new = _new_keys(header or list(COLUMNS), rows)
        if not header:
            self.run.write_text(_rows_text(list(COLUMNS) + new, rows, with_header=True), LOGS, METRICS_CSV)
        elif not new:
            self.run.write_text(old + _rows_text(header, rows), LOGS, METRICS_CSV)
        else:
            self.run.write_text(_widen(old, header, new) + _rows_text(header + new, rows), LOGS, METRICS_CSV)

    def close(self) -> None:
        """Flush, then close the trackers, telling them how the session ended (an exception may be
        on its way out: `close` runs in the trainer's `finally`)."""
        error = sys.exc_info()[1]
        outcome = FINISHED if error is None else STOPPED if isinstance(error, (TrainingStopped, KeyboardInterrupt)) else FAILED
        self.flush()
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close(outcome)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: could not close (%s: %s)", tracker.name, type(exc).__name__, exc)

    def _drop(self, tracker: Tracker, what: str, exc: BaseException) -> None:
        log.warning("%s: %s failed (%s: %s); the rest of this session goes to logs/metrics.csv only",
                    tracker.name, what, type(exc).__name__, str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "")
        self.trackers.remove(tracker)
        try:
            tracker.close(FAILED)
        except Exception:  # noqa: BLE001 - already reported
            pass


def _new_keys(header: Iterable[str], rows: list[dict[str, Any]]) -> list[str]:
    """Keys of `rows` that `header` lacks, in the order they first appear."""
    known = set(header)
    new: list[str] = []
    for row in rows:
        for key in row:
            if key not in known:
                known.add(key)
                new.append(key)
    return new


def _rows_text(header: list[str], rows: list[dict[str, Any]], with_header: bool = False) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, extrasaction="ignore")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _widen(old: str, header: list[str], new: list[str]) -> str:
    """`old` (whole lines) with `new` columns added: a wider header, every row padded to it.

    Lines that do not parse as a row of `header` are dropped: readers skip them anyway.
    """
    _, rows = _parse(old)
    wide = header + new
    return _rows_text(wide, [dict(zip(header, fields, strict=True)) for fields in rows], with_header=True)


def _local_header(path: str) -> Optional[list[str]]:
    """The header of a local metrics file with at least one whole line, else None."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except FileNotFoundError:
        return None
    if not first.endswith(b"\n"):
        return None
    fields = next(csv.reader([first.decode("utf-8", errors="replace").rstrip("\r\n")]), [])
    return fields or None


def _append_local(path: str, text: str) -> None:
    """Append `text`, cutting a torn last row first."""
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                keep = _last_newline_end(f, size)
                f.truncate(keep)
                _warn_torn(path, size - keep)
        f.write(text.encode("utf-8"))


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
