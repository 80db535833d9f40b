"""A stop signal during start-up (issue 18 item 7): while the task file imports or `build(cfg)`
loads a model, SIGTERM (or a configured SIGUSR1) used to kill the process with 143 (138) and no
message, after run.yaml existed. It is honoured from the CLI's start: one line, exit 75, nothing
saved, and `resume` then starts from step 0. The process boundary is the subject: subprocesses."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import error_lines, start_cli, wait_for
from helpers import run_cli_inprocess

from resilient_train.preemption import StopRequest

# waits at import or in build until the test has sent its signal (the file `go` appears)
SLOW_START_TASK = '''
import os, pathlib, time
import torch

HERE = pathlib.Path(__file__).parent
WHERE = os.environ.get("SLOW_START_AT", "")


def _wait(stage):
    if WHERE != stage:
        return
    (HERE / "waiting").write_text(stage)
    while not (HERE / "go").exists():
        time.sleep(0.01)


_wait("import")

CONFIG = {"trainer": {"max_steps": 4, "batch_size": 4, "progress_bar": False}, "checkpoint": {"every_n_steps": 2}}


def build(cfg):
    _wait("build")
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    return {"model": torch.nn.Linear(4, 1), "optimizer": lambda p: torch.optim.SGD(p, lr=0.1),
            "train_data": data, "training_step": lambda m, b: m(b[0]).square().mean()}
'''


def _start_and_signal(tmp_path: Path, stage: str, sig: int, *overrides: str):
    task = tmp_path / "slow_start.py"
    task.write_text(SLOW_START_TASK)
    run = tmp_path / "run"
    os.environ["SLOW_START_AT"] = stage
    try:
        proc = start_cli("run", str(task), "--run-dir", str(run), *overrides)
    finally:
        del os.environ["SLOW_START_AT"]
    try:
        wait_for(lambda: (tmp_path / "waiting").exists() or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, sig)
        (tmp_path / "go").write_text("")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, run


@pytest.mark.parametrize("stage, sig, overrides", [
    ("import", signal.SIGTERM, ()),
    ("build", signal.SIGTERM, ()),
    ("import", signal.SIGUSR1, ("checkpoint.stop_signals=[SIGUSR1]",)),
])
def test_a_stop_during_start_up_exits_75_and_resume_starts_from_step_0(tmp_path: Path, stage: str, sig: int,
                                                                        overrides: tuple) -> None:
    code, err, run = _start_and_signal(tmp_path, stage, sig, *overrides)
    assert code == 75, err
    assert not error_lines(err), err
    assert "stopped before training started" in err, err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert (run / "run.yaml").exists()  # the run folder is whole: resume continues it
    resumed = run_cli_inprocess("resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    sessions = json.loads((run / "sessions.json").read_text())
    records = sessions if isinstance(sessions, list) else sessions.get("sessions", [])
    assert records and records[0]["start_step"] == 0, records


def test_the_configured_set_replaces_the_early_one_and_a_request_carries_over() -> None:
    """What the CLI installs at its start is handed on: to the configured signals once the config is
    resolved (the others get their own meaning back), then to fit's StopRequest, which sees a
    request made before it; at the end every handler is as it was."""
    term, usr1 = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    try:
        StopRequest.listen_early()
        os.kill(os.getpid(), signal.SIGTERM)
        StopRequest.retune_early(["SIGUSR1"])
        assert signal.getsignal(signal.SIGTERM) == term
        assert StopRequest.early_reason() == "SIGTERM"
        with StopRequest(["SIGUSR1"]) as stop:
            assert stop.reason == "SIGTERM"
    finally:
        StopRequest.forget_early()
    assert signal.getsignal(signal.SIGTERM) == term and signal.getsignal(signal.SIGUSR1) == usr1
