"""Resuming on other hardware: another world size, another precision, a session deadline.

World-size changes run the real CLI with 1 and 2 CPU processes (gloo). The tiny task logs the
sample indices of every micro-batch; the first epoch's samples across both sessions must be each
sample exactly once (sample-exact), whatever the world sizes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import TINY_TASK, committed_steps_on_disk, run_cli, start_cli, wait_for
from helpers import run_cli_inprocess

DDP = ["trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2"]
ONE = ["trainer.accelerator=cpu", "trainer.strategy=auto", "trainer.devices=1"]
BASE = ["task.n=96", "trainer.batch_size=8", "trainer.global_batch_size=16", "checkpoint.every_n_steps=2", "trainer.max_steps=9"]


def _interrupt_after_first_checkpoint(run_dir: Path, args: list[str]) -> int:
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *args)
    wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir))
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    return committed_steps_on_disk(run_dir)[-1]


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(ONE, DDP), (DDP, ONE)], ids=["1-to-2", "2-to-1"])
def test_world_size_change_trains_each_sample_of_the_interrupted_epoch_exactly_once(tmp_path: Path, first, second) -> None:
    run_dir, order_log = tmp_path / "run", tmp_path / "order.log"
    args = [*BASE, f"task.order_log={order_log}", "task.sleep=0.1", *first]
    stopped = _interrupt_after_first_checkpoint(run_dir, args)
    assert stopped < 6, "stop landed after the first epoch; the test needs it mid-epoch"

    resumed = run_cli("resume", str(run_dir), *second)  # task.* keys cannot change on resume
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume is sample-exact (world size" in resumed.stderr, resumed.stderr[-2000:]
    rng = "rank 1 starts a fresh RNG stream" if first == ONE else "rank 1's RNG stream is dropped"
    assert rng in resumed.stderr, resumed.stderr[-2000:]
    assert "samples per optimizer step" not in resumed.stderr  # global_batch_size kept it at 16

    samples = [int(i) for line in order_log.read_text().splitlines() for i in line.split()]
    assert sorted(samples[:96]) == list(range(96)), "the interrupted epoch skipped or repeated samples"
    assert len(samples) == 9 * 16  # every optimizer step saw 16 samples on both world sizes

    report = json.loads(run_cli_inprocess("inspect", str(run_dir), "--json", check=True).stdout)
    assert [s["world_size"] for s in report["sessions"]] == ([1, 2] if first == ONE else [2, 1])
    assert report["checkpoint"]["step"] == 9


def test_world_size_change_without_global_batch_size_is_reported_approximate(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), "task.n=64", "trainer.max_steps=2", check=True)
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=3", "trainer.batch_size=4", "--allow-change", "trainer.batch_size")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("resume is approximate (per-device batch 8 -> 4; samples per optimizer step 8 -> 4; "
            "config changed with --allow-change: trainer.batch_size)") in proc.stderr


def test_same_hardware_resume_is_reported_bit_exact(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), "task.n=64", "trainer.max_steps=2", check=True)
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=3")
    assert proc.returncode == 0 and "resume is bit-exact" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("before, after", [("32-true", "bf16-mixed"), ("bf16-mixed", "32-true")])
def test_precision_change_on_cpu_resumes_and_is_reported(tmp_path: Path, before: str, after: str) -> None:
    run_dir = tmp_path / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), "task.n=64", "trainer.max_steps=3", f"trainer.precision={before}", check=True)
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=6", f"trainer.precision={after}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resume is sample-exact (precision {before} -> {after})" in proc.stderr
    manifest = json.loads((run_dir / "checkpoints" / "step-000000006" / "manifest.json").read_text())
    assert manifest["precision"] == after


def test_session_budget_saves_and_exits_75_before_it_runs_out(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    budget = 6.0
    started = time.monotonic()
    proc = run_cli("run", TINY_TASK, "--run-dir", str(run_dir), "trainer.max_steps=100000", "task.sleep=0.02",
                   "checkpoint.every_n_steps=1000", f"checkpoint.session_budget={budget:g}s")
    wall = time.monotonic() - started
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "(session budget); checkpoint committed" in proc.stderr
    steps = committed_steps_on_disk(run_dir)
    assert steps and steps[-1] > 10  # it trained, then saved the step it stopped at
    sessions = json.loads((run_dir / "sessions.json").read_text())
    assert len(sessions) == 1
    assert wall < budget + 30  # start-up (imports) is outside the budget; the budget itself was kept
    report = json.loads(run_cli_inprocess("inspect", str(run_dir), "--json", check=True).stdout)
    assert report["checkpoint"]["step"] == steps[-1]


def test_bad_session_budget_is_a_usage_error_naming_the_key(tmp_path: Path) -> None:
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "r"), "checkpoint.session_budget=soon")
    assert proc.returncode == 2 and "checkpoint.session_budget" in proc.stderr


def test_training_on_the_cpu_of_a_gpu_machine_counts_as_cpu() -> None:
    """A checkpoint written on a GPU and resumed with trainer.accelerator=cpu on the same machine
    is a device change (sample-exact), although the GPU is still present and listed."""
    from resilient_train.portability import device_kind, exactness

    l4 = [{"name": "NVIDIA L4", "memory_gib": 22.0, "capability": "8.9"}]
    saved = {"world_size": 1, "precision": "32-true", "micro_batch": 8, "environment": {"gpus": l4, "device": "cuda"}}
    now = {"world_size": 1, "precision": "32-true", "micro_batch": 8, "global_batch": 8, "environment": {"gpus": l4, "device": "cpu"}}
    assert device_kind(now["environment"]) == "CPU" and device_kind(saved["environment"]) == "1x NVIDIA L4"
    assert exactness(saved, now) == ("sample-exact", ["device 1x NVIDIA L4 -> CPU"])
    assert device_kind({"gpus": l4}) == "1x NVIDIA L4"  # records written before `device` existed: as before
