"""A save that raises in the background writer (issue 18 item 11): under DDP a peer that dies while
rank 0's async save is in its collectives made rank 0 print `Exception in thread checkpoint-10:
Traceback ... Connection closed by peer`. The failure is the save's outcome, said in one line."""

from __future__ import annotations

import threading

import pytest

from resilient_train.checkpoint.protocol import Result
from resilient_train.checkpoint.writer import BackgroundWriter


def test_a_save_that_raises_is_a_failed_outcome_not_a_thread_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    escaped: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))

    def save():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234\nmore")

    writer = BackgroundWriter()
    writer.start(10, lambda: None, save)
    outcome = writer.collect(timeout=30)
    assert escaped == []
    assert outcome is not None and outcome.result is Result.FAILED
    assert outcome.error is not None and "Connection closed by peer" in outcome.error and "\n" not in outcome.error
    assert outcome.traceback and "Traceback" in outcome.traceback
