"""`plot`: a PNG of loss/lr/throughput across the sessions of a run."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from conftest import TINY_TASK, error_lines
from helpers import run_cli_inprocess
from resilient_train.plot import read_history
from resilient_train.storage import Storage


@pytest.fixture(scope="module")
def two_session_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("plot") / "run"
    common = ["task.n=64", "trainer.log_every_n_steps=2", "checkpoint.every_n_steps=4"]
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), "trainer.max_steps=8", *common, check=True)
    run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=14", check=True)
    return run_dir


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_for_a_run_with_two_sessions(two_session_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "history.png"
    proc = run_cli_inprocess("plot", str(two_session_run), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 session(s)" in proc.stderr
    data = out.read_bytes()
    width, height = _png_size(data)
    assert width >= 800 and height >= 600 and len(data) > 20_000


def test_history_finds_both_sessions_and_their_resume_point(two_session_run: Path) -> None:
    history = read_history(Storage(str(two_session_run)))
    assert [s.number for s in history.sessions] == [1, 2]
    assert history.sessions[1].start_step == 8
    assert all("CPU" in s.label and "32-true" in s.label for s in history.sessions)
    assert list(history.loss) == [2, 4, 6, 8, 10, 12, 14]


def test_plot_of_a_missing_run_exits_3(tmp_path: Path) -> None:
    proc = run_cli_inprocess("plot", str(tmp_path / "nothing"), str(tmp_path / "x.png"))
    assert proc.returncode == 3 and len(error_lines(proc.stderr)) == 1
