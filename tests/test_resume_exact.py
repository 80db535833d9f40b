"""The central promise: kill a run at any moment, resume it, get the uninterrupted result bit for bit.

Runs the real CLI in subprocesses. The tiny task logs the sample indices of every micro-batch, so
both the final weights and the per-step data order are compared with an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    TINY_TASK,
    committed_steps_on_disk,
    run_cli,
    saves_in_flight,
    start_cli,
    wait_for,
)
from helpers import assert_same_weights, run_cli_inprocess

pytestmark = pytest.mark.slow

ACCUM = 2
SETTINGS = [
    "trainer.max_steps=90",
    f"trainer.accumulate_grad_batches={ACCUM}",
    "trainer.gradient_clip_val=1.0",
    "checkpoint.every_n_steps=5",
    "checkpoint.keep_last=2",
    "task.ballast=3000000",  # ~36 MB per checkpoint: saves last long enough to be killed mid-way
    "task.sleep=0.02",
]


def _run_args(run_dir: Path, order_log: Path) -> list[str]:
    return ["run", TINY_TASK, "--run-dir", str(run_dir), *SETTINGS, f"task.order_log={order_log}"]


def _export(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    run_cli_inprocess("export", str(run_dir), str(out), check=True)
    return load_file(str(out))


def _truncate_log(order_log: Path, run_dir: Path) -> None:
    """Drop the log lines of steps after the newest committed checkpoint: resume replays them."""
    steps = committed_steps_on_disk(run_dir)
    keep = (steps[-1] if steps else 0) * ACCUM
    if order_log.exists():
        lines = order_log.read_text().split("\n")
        order_log.write_text("".join(line + "\n" for line in lines[:keep]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[str]]:
    tmp = tmp_path_factory.mktemp("baseline")
    order_log = tmp / "order.log"
    proc = run_cli_inprocess(*_run_args(tmp / "run", order_log))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _export(tmp / "run", tmp / "final.safetensors"), order_log.read_text().splitlines()


def test_sigkill_at_random_moments_resumes_bit_identical(tmp_path: Path, uninterrupted) -> None:
    weights, order = uninterrupted
    run_dir, order_log = tmp_path / "run", tmp_path / "order.log"
    rng = random.Random(20261124)
    modes = ["during_save", "random", "during_save", "random", "during_save", "random"]
    proc = start_cli(*_run_args(run_dir, order_log))
    killed_during_save = 0
    for mode in modes:
        before = committed_steps_on_disk(run_dir)
        if mode == "during_save":
            # let this session commit one checkpoint first, so every kill leaves progress behind
            wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir) != before)
            wait_for(lambda: proc.poll() is not None or saves_in_flight(run_dir))
        else:
            wait_for(lambda: proc.poll() is not None or (run_dir / "run.yaml").exists())
            time.sleep(rng.uniform(0.5, 3.0))
        assert proc.poll() is None, f"the run finished before kill '{mode}'; make it longer\n{proc.stderr.read()[-2000:]}"
        in_flight = bool(saves_in_flight(run_dir))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_during_save += in_flight and mode == "during_save"
        _truncate_log(order_log, run_dir)
        proc = start_cli("resume", str(run_dir))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert killed_during_save >= 2, "too few kills landed during a save"
    assert order_log.read_text().splitlines() == order, "the per-step data order differs"
    assert_same_weights(_export(run_dir, tmp_path / "final.safetensors"), weights)


def test_sigterm_saves_at_the_current_step_exits_75_and_resumes_bit_identical(tmp_path: Path, uninterrupted) -> None:
    weights, order = uninterrupted
    run_dir, order_log = tmp_path / "run", tmp_path / "order.log"
    proc = start_cli(*_run_args(run_dir, order_log))
    wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir))
    time.sleep(0.37)  # land between two checkpoint steps
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped_line = next(line for line in err.splitlines() if "stopped at step" in line)
    stopped_step = int(stopped_line.split("stopped at step")[1].split()[0])
    assert committed_steps_on_disk(run_dir)[-1] == stopped_step
    assert len(order_log.read_text().splitlines()) == stopped_step * ACCUM  # nothing to replay

    proc = run_cli("resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"step {stopped_step}" in proc.stderr
    assert order_log.read_text().splitlines() == order
    assert_same_weights(_export(run_dir, tmp_path / "final.safetensors"), weights)
