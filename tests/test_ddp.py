"""DDP with two CPU processes (gloo): interrupted by SIGTERM, resumed, bit-identical to a straight run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TASK, committed_steps_on_disk, error_lines, run_cli, start_cli, wait_for

pytestmark = pytest.mark.slow

DDP = [
    "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2",
    "trainer.max_steps=30", "trainer.batch_size=4", "trainer.accumulate_grad_batches=2",
    "checkpoint.every_n_steps=4", "task.sleep=0.05",
]


def _export(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    run_cli("export", str(run_dir), str(out), check=True)
    return load_file(str(out))


@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "frozen-layer"])
def test_two_process_ddp_run_interrupted_and_resumed_matches_uninterrupted(tmp_path: Path, frozen: bool) -> None:
    args = [*DDP, f"task.frozen={str(frozen).lower()}"]  # frozen: rank 0 stores the first layer once, in shared files
    straight = run_cli("run", TINY_TASK, "--run-dir", str(tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "interrupted"
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *args)
    wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir))
    os.kill(proc.pid, signal.SIGTERM)  # only rank 0 gets it; the ranks agree to stop together
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = committed_steps_on_disk(run_dir)[-1]
    assert stopped < 30

    manifest = json.loads((run_dir / "checkpoints" / f"step-{stopped:09d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {"rng-rank00000.json", "rng-rank00001.json"} <= set(manifest["files"])
    assert bool(manifest.get("shared")) == frozen

    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _export(tmp_path / "straight", tmp_path / "a.safetensors")
    b = _export(run_dir, tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("losing", [0, 1], ids=["rank-0-loses", "rank-1-loses"])
def test_a_rank_that_loses_its_batch_to_a_group_stop_ends_every_rank_with_75(tmp_path: Path, losing: int) -> None:
    """One rank's batch is lost to a stop signal sent to the whole group, before the step's
    gradient all-reduce; the other got its batch and waits in that all-reduce until the first has
    left. Both stop without saving (exit 75), and the run resumes from the checkpoint before.
    Rank 0 prints the line: what it lost, or that the other rank left."""
    run_dir = tmp_path / "run"
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *DDP, "task.lose_batch_at=9", f"task.kill_rank={losing}",
                     "checkpoint.stop_signals=[SIGUSR1,SIGTERM]")  # a group of its own: the signal goes to the run's processes
    err = _stderr_or_kill(proc)
    assert proc.returncode == 75, err[-3000:]
    wait_for(lambda: not _group_alive(proc.pid), timeout=60)  # rank 1 is gone too, not left waiting
    assert error_lines(err) == [] and "Traceback" not in err, err[-3000:]  # rank 1 stopped as quietly as rank 0
    stopped = [line for line in err.splitlines() if "stopped during step 5" in line]  # calls 9-10 are step 5
    said = "a batch was lost with the stop (ConnectionResetError" if losing == 0 else "another rank left in the middle of it (RuntimeError"
    assert len(stopped) == 1 and said in stopped[0], err[-3000:]
    assert committed_steps_on_disk(run_dir)[-1] == 4
    if losing:
        return  # the resume below is the same for both

    resumed = run_cli("resume", str(run_dir), "task.lose_batch_at=0", "--allow-change", "task.lose_batch_at", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert committed_steps_on_disk(run_dir)[-1] == 30


def test_a_rank_that_loses_a_validation_batch_to_a_group_stop_ends_every_rank_with_75(tmp_path: Path) -> None:
    """Rank 0's validation after step 6 loses a batch to a stop signal sent to the whole group;
    rank 1 finishes its share and waits in the validation's all-reduce. Neither may go on to a
    save whose collectives the other would not meet: both stop without saving (exit 75)."""
    run_dir = tmp_path / "run"
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *DDP, "trainer.val_every_n_steps=6", "task.val_lose_at=18",
                     "task.kill_rank=0", "checkpoint.stop_signals=[SIGUSR1,SIGTERM]")  # sample 18: in rank 0's second batch (the ranks take every other sample)
    err = _stderr_or_kill(proc)
    assert proc.returncode == 75, err[-3000:]
    wait_for(lambda: not _group_alive(proc.pid), timeout=60)
    assert error_lines(err) == [] and "Traceback" not in err, err[-3000:]
    stopped = [line for line in err.splitlines() if "stopped during the validation after step 6" in line]
    assert len(stopped) == 1 and "a batch was lost with the stop (ConnectionResetError" in stopped[0], err[-3000:]
    assert committed_steps_on_disk(run_dir)[-1] == 4  # a resume from there: see the test above


def test_a_stop_exits_75_though_the_main_process_finishes_last(tmp_path: Path) -> None:
    """The main process lingers 7 s after the stop (as a mirror upload or a tracker closing can)
    while rank 1, which Fabric's launcher started, is done at once and dies in its teardown (as an
    interpreter that aborts there does). Lightning's launcher SIGKILLs the main process when a
    child exits with a code other than 0 (it polls every 5 s): the run ended with -9."""
    run_dir = tmp_path / "run"
    proc = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *DDP, "trainer.max_steps=300", "task.linger=7",
                     "task.child_exit=134")
    wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir))
    os.kill(proc.pid, signal.SIGTERM)
    err = _stderr_or_kill(proc)
    assert proc.returncode == 75, err[-3000:]
    assert "Forcefully terminating" not in err, err[-3000:]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stderr_or_kill(proc, timeout: float = 120) -> str:
    """The run's stderr once it exits; a run that hangs (ranks left in collectives that never
    match) is killed, group and all, so no process outlives the test."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
