"""Every way out of a run ends in the contract's exit code with nothing in flight lost (issue 8, 3, 4, 10).

An exception in the loop waits for the background save in flight; SIGTERM while the checkpoint
loads exits 75; DDP ranks take save decisions together; read-only commands fail in one line when
the storage is unreachable or their reader goes away.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import fsspec
import fsspec.implementations.memory
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import REPO, TINY_TASK, cli_env, error_lines, run_cli
from faulty_fs import Fault, FaultPlan, forget, in_step, install, named
from helpers import committed_steps, run_cli_inprocess
from resilient_train import Trainer, TrainingStopped, seed_everything


def _fit(url: str, training_step, **overrides):
    seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 8, generator=g)
    settings = dict(max_steps=12, batch_size=8, every_n_steps=3, keep_last=None, progress_bar=False, accelerator="cpu")
    trainer = Trainer(run_dir=url, **{**settings, **overrides})
    return trainer.fit(model, lambda params: torch.optim.AdamW(params, lr=0.01), TensorDataset(x, x.sum(1, keepdim=True)),
                       training_step=training_step)


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def test_an_exception_in_the_loop_waits_for_the_async_save_in_flight() -> None:
    """Case 3: the save of step 6 is still being written when the task raises at step 7."""
    url = f"faulty://rt-exit-{uuid.uuid4().hex}/run"
    calls = [0]

    def failing_step(model, batch):
        calls[0] += 1
        if calls[0] == 7:
            raise RuntimeError("task bug")
        return _mse(model, batch)

    plan = FaultPlan([Fault("delay", both_step6, seconds=1.0)])
    try:
        with install(plan), pytest.raises(RuntimeError, match="task bug"):
            _fit(url, failing_step, async_save="true")
        assert committed_steps(url.replace("faulty://", "memory://")) == [3, 6]
    finally:
        forget(url)


def both_step6(path: str) -> bool:
    return in_step(6)(path) and named("model.safetensors")(path)


def test_sigterm_while_the_checkpoint_loads_stops_with_75() -> None:
    url = f"faulty://rt-load-{uuid.uuid4().hex}/run"
    try:
        with install(FaultPlan()):
            _fit(url, _mse, max_steps=6)
        release = threading.Event()
        plan = FaultPlan([Fault("delay", both(in_step(6), named("model.safetensors")), on="read", seconds=30, release=release)])

        def terminate_while_loading() -> None:
            while not any(f.fired for f in plan.faults):
                threading.Event().wait(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(0.2)
            release.set()

        killer = threading.Thread(target=terminate_while_loading)
        killer.start()
        with install(plan), pytest.raises(TrainingStopped) as stopped:
            _fit(url, _mse, max_steps=12)
        killer.join(30)
        assert stopped.value.code == 75 and stopped.value.step == 6
        assert committed_steps(url.replace("faulty://", "memory://")) == [3, 6]  # nothing new, nothing lost
    finally:
        forget(url)


def both(*predicates):
    return lambda path: all(p(path) for p in predicates)


@pytest.mark.slow
def test_a_task_bug_during_an_async_save_exits_1_in_one_line_with_the_savecommitted_steps(tmp_path: Path) -> None:
    """Through the CLI: the exception hits while the state is being copied and written."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", TINY_TASK, "--run-dir", str(run_dir), "trainer.max_steps=20", "checkpoint.every_n_steps=6",
                   "checkpoint.async_save=true", "checkpoint.keep_last=null", "task.ballast=3000000", "task.fail_at=7")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "task bug" in lines[0], proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert committed_steps(str(run_dir)) == [6]
    assert run_cli("verify", str(run_dir)).returncode == 0


@pytest.mark.slow
def test_ddp_ranks_skip_or_write_the_same_saves_when_saves_outlast_steps(tmp_path: Path) -> None:
    """Case 4: `when_busy=skip` and async decided on rank 0 for both ranks."""
    run_dir = tmp_path / "run"
    proc = run_cli("run", TINY_TASK, "--run-dir", str(run_dir), "trainer.accelerator=cpu", "trainer.strategy=ddp",
                   "trainer.devices=2", "trainer.max_steps=24", "trainer.batch_size=4", "checkpoint.every_n_steps=1",
                   "checkpoint.async_save=auto", "checkpoint.when_busy=skip", "checkpoint.keep_last=null",
                   "task.ballast=2000000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "does not check out" not in proc.stderr and "failed" not in proc.stderr, proc.stderr[-3000:]
    assert committed_steps(str(run_dir))[-1] == 24
    assert run_cli("verify", str(run_dir)).returncode == 0


def test_inspect_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli("run", TINY_TASK, "--run-dir", str(run_dir), "trainer.max_steps=5", check=True)
    proc = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m resilient_train inspect --json '{run_dir}' | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}"],
        capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120,
    )
    assert proc.stdout.strip() == "0", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.slow  # gcsfs retries (we do not retry its retries): about half a minute before the one line
def test_ls_of_an_unreachable_bucket_fails_in_one_line() -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**cli_env(), "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    proc = subprocess.run([sys.executable, "-m", "resilient_train", "ls", "gs://bucket/run"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "unreachable" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


class _CutOffFileSystem(fsspec.implementations.memory.MemoryFileSystem):
    """A store whose every read and listing fails as a dropped network connection does."""

    protocol = "cutoff"

    def _cut(self, *args, **kwargs):
        raise ConnectionResetError(104, "Connection reset by peer")

    cat_file = ls = info = exists = find = _cut


def test_a_connection_error_inside_a_storage_call_says_the_storage_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    from resilient_train.storage import Storage

    fsspec.register_implementation("cutoff", _CutOffFileSystem, clobber=True)
    monkeypatch.setattr(Storage, "retry_base_delay", 0.001)  # the retries still run, without their waits
    proc = run_cli_inprocess("ls", "cutoff://bucket/run")
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: storage unreachable (ConnectionResetError"), proc.stderr
    assert "no committed checkpoint was changed" in lines[0]


def test_a_connection_error_from_the_task_is_named_as_raised_not_blamed_on_the_storage(tmp_path: Path) -> None:
    task = tmp_path / "calls_out.py"
    task.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(cfg):\n"
        "    calls = [0]\n"
        "    def training_step(model, batch):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 3:  # the task's own client of some service lost its connection\n"
        "            raise ConnectionResetError(104, 'Connection reset by peer')\n"
        "        return nn.functional.mse_loss(model(batch[0]), batch[1])\n"
        "    x = torch.randn(64, 4)\n"
        "    return {'model': nn.Linear(4, 1), 'optimizer': lambda p: torch.optim.SGD(p, lr=0.1),\n"
        "            'train_data': torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), 'training_step': training_step}\n"
    )
    run_dir = tmp_path / "run"
    proc = run_cli_inprocess("run", str(task), "--run-dir", str(run_dir), "trainer.max_steps=10", "trainer.batch_size=8",
                             "checkpoint.every_n_steps=1", "trainer.progress_bar=false", "trainer.accelerator=cpu")
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc.stderr)
    assert lines == ["error: ConnectionResetError: [Errno 104] Connection reset by peer (rerun with --debug for the traceback)"], proc.stderr
    assert committed_steps(str(run_dir)) == [1, 2]  # the steps before it stay committed
