"""Which signals mean "save and exit 75" is configurable (issue 12): SLURM sends SIGUSR1 before the
time limit, SkyPilot and Kubernetes send SIGTERM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASK, committed_steps_on_disk, error_lines, start_cli, wait_for
from helpers import run_cli_inprocess
from safetensors.torch import load_file

from resilient_train.config import CheckpointConfig
from resilient_train.errors import ConfigError
from resilient_train.preemption import StopRequest

SETTINGS = ["trainer.max_steps=24", "checkpoint.every_n_steps=4", "checkpoint.keep_last=null", "task.sleep=0.03"]


def test_stop_signals_accept_short_names_and_numbers() -> None:
    config = CheckpointConfig(stop_signals=["usr1", "SIGTERM", int(signal.SIGUSR2), "SIGUSR1"])
    assert config.stop_signals == ["SIGUSR1", "SIGTERM", "SIGUSR2"]
    assert CheckpointConfig().stop_signals == ["SIGTERM", "SIGINT"]


@pytest.mark.parametrize(("value", "says"), [
    (["SIGKILL"], "cannot be caught"),
    (["SIGUSR9"], "not a signal name"),
    (["SIGCHLD"], "not a request to stop"),
    (["SIGCONT"], "not a request to stop"),  # SLURM sends it around a suspend/resume
    ([], "at least one signal"),
])
def test_a_stop_signal_that_cannot_work_is_refused_naming_the_key(value: list, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as refused:
        CheckpointConfig(stop_signals=value)
    assert "checkpoint.stop_signals" in str(refused.value)


def test_the_handlers_of_the_configured_signals_are_restored_afterwards() -> None:
    before, term_before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with StopRequest(["SIGUSR1"]) as stop:
        assert signal.getsignal(signal.SIGUSR1) == stop._handle
        assert signal.getsignal(signal.SIGTERM) == term_before  # only what was asked for
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.reason == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_one_signal_name_alone_is_a_list_of_one() -> None:
    from resilient_train.config import resolve

    assert resolve({"checkpoint": {"stop_signals": "usr1"}}).checkpoint.stop_signals == ["SIGUSR1"]


@pytest.mark.slow
def test_sigusr1_saves_exits_75_and_the_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "straight"), *SETTINGS)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "slurm"
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *SETTINGS, "checkpoint.stop_signals=[SIGUSR1,SIGTERM]")
    wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir))
    os.kill(proc.pid, signal.SIGUSR1)  # what `sbatch --signal=USR1@300` delivers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = next(line for line in err.splitlines() if "stopped at step" in line)
    assert "SIGUSR1" in stopped
    step = int(stopped.split("stopped at step")[1].split()[0])
    assert committed_steps_on_disk(run_dir)[-1] == step < 24

    resumed = run_cli_inprocess("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("straight", "slurm"):
        run_cli_inprocess("export", str(tmp_path / name), str(tmp_path / f"{name}.safetensors"), check=True)
    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "slurm.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bad_stop_signal_on_the_command_line_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "run"), "checkpoint.stop_signals=[SIGKILL]")
    assert proc.returncode == 2
    assert len(error_lines(proc.stderr)) == 1 and "checkpoint.stop_signals" in proc.stderr
    assert not (tmp_path / "run").exists()
