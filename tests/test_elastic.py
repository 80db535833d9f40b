"""torchrun restarts a worker group whose worker died, and the run goes on by itself (issue 12).

`torchrun --max-restarts=N -m resilient_train run TASK ...`: when a worker is SIGKILLed,
torchelastic stops the others and starts the group again with the same command line; `run`
continues the run from its newest committed checkpoint, and the result is bit-identical to an
uninterrupted 2-process run. The tiny task kills the worker of `task.kill_rank` at call
`task.kill_at`, in the first incarnation only (TORCHELASTIC_RESTART_COUNT 0).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TASK, cli_env, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TRAIN = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.max_steps=24",
         "trainer.accumulate_grad_batches=2", "checkpoint.every_n_steps=4", "checkpoint.keep_last=2", "trainer.progress_bar=false"]


def _torchrun(run_dir: Path, *extra: str, static: bool = False) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    rendezvous = ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"] if static else ["--standalone"]
    return subprocess.run(
        [str(torchrun), *rendezvous, "--nproc-per-node=2", "--max-restarts=2", "--monitor-interval=0.5",
         "-m", "resilient_train", "run", TINY_TASK, "--run-dir", str(run_dir), *TRAIN, *extra],
        capture_output=True, text=True, timeout=600, env=cli_env(), cwd=REPO,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = run_dir.parent / f"{run_dir.name}.safetensors"
    run_cli("export", str(run_dir), str(out), check=True)
    return load_file(str(out))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("elastic") / "straight"
    proc = _torchrun(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(run_dir)


@pytest.mark.parametrize("kill_rank", [0, 1])
def test_a_worker_killed_at_a_random_step_is_restarted_by_torchrun_and_ends_bit_identical(
        tmp_path: Path, uninterrupted: dict[str, torch.Tensor], kill_rank: int) -> None:
    kill_at = random.randint(6, 40)  # a training-step call: 2 per optimizer step, 48 in all
    run_dir = tmp_path / "killed"
    proc = _torchrun(run_dir, f"task.kill_at={kill_at}", f"task.kill_rank={kill_rank}", static=kill_rank == 1)
    context = f"rank {kill_rank} killed at call {kill_at}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, context
    assert "exitcode: -9" in proc.stderr, context  # the kill happened, and torchrun saw it
    assert "torchrun restarted the worker group (restart 1, 2 processes)" in proc.stderr, context
    assert "Connection refused" not in proc.stderr, context  # the restart did not meet the dead workers' addresses
    got = _weights(run_dir)
    assert got.keys() == uninterrupted.keys()
    for key in got:
        assert torch.equal(got[key], uninterrupted[key]), f"{key} differs ({context[:60]})"
