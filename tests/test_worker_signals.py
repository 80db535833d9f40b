"""A DataLoader worker killed by a signal (issue 18 item 10): SIGTERM to the whole process group, as
Docker and Kubernetes send, also kills the workers, and torch's SIGCHLD handler raises a plain
RuntimeError in the main thread wherever it is; in a metrics write that read `could not write
logs/metrics.csv (RuntimeError: DataLoader worker ... is killed by signal: Terminated)`. The real
handler and a real killed child are used; the run's own stop (exit 75) is tests/test_stop_signals.py's."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data._utils import signal_handling

from resilient_train.run.metrics import MetricsLogger
from resilient_train.storage import Storage


def test_a_killed_dataloader_worker_is_said_and_not_blamed_on_the_csv(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    previous = signal.getsignal(signal.SIGCHLD)
    monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    key = 918273  # the id torch keys a DataLoader iterator's worker pids by
    torch._C._set_worker_pids(key, (worker.pid,))
    logger = MetricsLogger(Storage(str(tmp_path)), session=1)

    def write_while_the_worker_dies(rows: list) -> None:
        worker.terminate()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # torch's SIGCHLD handler raises in here
            time.sleep(0.005)

    monkeypatch.setattr(logger, "_write", write_while_the_worker_dies)
    logger.log(1, loss=0.5)
    try:
        signal_handling._set_SIGCHLD_handler()
        with caplog.at_level(logging.WARNING, logger="resilient_train"):
            logger.flush()
    finally:
        torch._C._remove_worker_pids(key)
        signal.signal(signal.SIGCHLD, previous)
        worker.wait()
    assert "a DataLoader worker was killed by a signal" in caplog.text, caplog.text
    assert "could not write logs/metrics.csv" not in caplog.text
    assert logger._pending  # the row is written at the next flush
