"""DDP with two CPU processes (gloo): interrupted by SIGTERM, resumed, bit-identical to a straight run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TASK, committed_steps_on_disk, run_cli, start_cli, wait_for

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
