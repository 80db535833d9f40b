"""Two incarnations writing one run: the stale writer is fenced and the newer one loses nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt_files import data_path
from conftest import TINY_TASK, committed_steps_on_disk, error_lines, start_cli, wait_for
from helpers import run_cli_inprocess
from resilient_train.checkpoint.lease import FencedError, Lease, read_lease
from resilient_train.storage import Storage

SETTINGS = ["trainer.max_steps=40", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2", "task.sleep=0.2"]


def test_a_newer_lease_fences_the_older_holder(tmp_path: Path) -> None:
    run = Storage(str(tmp_path))
    old = Lease.acquire(run)
    old.check("to save")  # still the holder
    new = Lease.acquire(run)
    assert new.incarnation == old.incarnation + 1
    with pytest.raises(FencedError, match="taken over by incarnation 2"):
        old.check("to commit step 10")
    new.check("to commit step 10")
    assert read_lease(run)["writer"] == new.writer


@pytest.mark.slow
def test_zombie_session_is_fenced_and_the_resumed_run_ends_bit_identical(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(straight), *SETTINGS, check=True)

    run_dir = tmp_path / "run"
    zombie = start_cli("run", TINY_TASK, "--run-dir", str(run_dir), *SETTINGS)  # the old Colab session
    wait_for(lambda: zombie.poll() is not None or committed_steps_on_disk(run_dir))
    resumed = start_cli("resume", str(run_dir))  # the run, resumed elsewhere while the zombie lives
    try:
        _, zombie_err = zombie.communicate(timeout=240)
    finally:
        if zombie.poll() is None:
            os.killpg(zombie.pid, signal.SIGKILL)
    _, resumed_err = resumed.communicate(timeout=240)

    assert resumed.returncode == 0, resumed_err[-3000:]
    assert zombie.returncode == 1, zombie_err[-3000:]
    lines = error_lines(zombie_err)
    assert len(lines) == 1 and "taken over" in lines[0] and "stale incarnation 1" in lines[0], zombie_err[-2000:]

    assert committed_steps_on_disk(run_dir)[-1] == 40
    assert run_cli_inprocess("verify", str(run_dir)).returncode == 0
    a = load_file(data_path(straight, 40, "model.safetensors"))
    b = load_file(data_path(run_dir, 40, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
