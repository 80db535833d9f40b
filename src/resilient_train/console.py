"""Messages of the library on a console that also shows a progress bar.

Log lines go through `tqdm.write`, which lifts the bar, prints the line and redraws the bar below
it: a checkpoint or validation message never lands inside the bar's line, in a terminal or in a
notebook cell.
"""

from __future__ import annotations

import logging


class Prefixed(logging.Formatter):
    """`resilient_train: message` for our lines, `urllib3: message` for another library's: a line
    must say who is talking."""

    def format(self, record: logging.LogRecord) -> str:
        source = record.name.split(".")[0] if record.name and record.name != "root" else "resilient_train"
        return f"{source}: {record.getMessage()}" + (f"\n{self.formatException(record.exc_info)}" if record.exc_info else "")


class AboveTheBar(logging.StreamHandler):
    """A StreamHandler that writes each message on its own line above any tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise into the training loop
            self.handleError(record)


def ensure_log_handler() -> None:
    """Make the library's messages visible in scripts and notebooks unless the user configured logging."""
    log = logging.getLogger("resilient_train")
    if not log.handlers and not logging.getLogger().handlers:
        handler = AboveTheBar()
        handler.setFormatter(Prefixed())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
