"""torchrun restarts a worker group whose worker died, and the run goes on by itself (issue 12).

`torchrun --max-restarts=N -m resilient_train run TASK ...`: when a worker is SIGKILLed,
torchelastic stops the others and starts the group again with the same command line; `run`
continues the run from its newest committed checkpoint, and the result is bit-identical to an
uninterrupted 2-process run. The tiny task kills the worker of `task.kill_rank` at call
`task.kill_at`, in the first incarnation only (TORCHELASTIC_RESTART_COUNT 0).

An elastic node range (`--nnodes=1:2`, c10d rendezvous): two torchrun agents on 127.0.0.1 are two
"nodes" of one process each; when one node dies (its agent and its worker SIGKILLed), the other
agent forms a new round alone and restarts its worker, which continues from the newest committed
checkpoint on one process with `trainer.global_batch_size` (sample-exact).
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

import psutil
import pytest
import torch
from conftest import REPO, TINY_TASK, cli_env, committed_steps_on_disk, run_cli, wait_for
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


# 96 samples, 16 per optimizer step (one micro-batch of 8 per node with two nodes, two accumulated
# micro-batches of 8 with one): 6 steps an epoch, 4 epochs
ELASTIC = ["trainer.devices=1", "trainer.strategy=ddp", "trainer.accelerator=cpu", "task.n=96", "trainer.batch_size=8",
           "trainer.global_batch_size=16", "trainer.max_steps=24", "checkpoint.every_n_steps=4", "checkpoint.keep_last=10",
           "task.sleep=0.1"]


def _elastic_agent(run_dir: Path, port: int, order_log: Path, out: IO[str], *, hosts_store: bool) -> subprocess.Popen:
    """One "node": a torchrun agent of an elastic 1:2 node range, one worker process."""
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.Popen(
        [str(torchrun), "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
         "--rdzv-id=elastic-test", f"--rdzv-conf=is_host={int(hosts_store)},join_timeout=600,read_timeout=300", "--max-restarts=2",
         "--monitor-interval=0.5", "-m", "resilient_train", "run", TINY_TASK, "--run-dir", str(run_dir),
         "trainer.num_nodes=2", *ELASTIC, f"task.order_log={order_log}"],
        stdout=out, stderr=subprocess.STDOUT, text=True, env=cli_env(), cwd=REPO, start_new_session=True,
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers (torchrun starts each worker in a session of its own)."""
    try:
        parent = psutil.Process(proc.pid)
        victims = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)


def _step_samples(order_log: Path, steps: int, per_step_lines: int) -> list[list[int]]:
    """The sample indices of each optimizer step, from `per_step_lines` logged micro-batches a step."""
    lines = order_log.read_text().splitlines()
    assert len(lines) == steps * per_step_lines, f"{len(lines)} micro-batches logged, expected {steps * per_step_lines}"
    return [sorted(int(i) for line in lines[n:n + per_step_lines] for i in line.split())
            for n in range(0, len(lines), per_step_lines)]


def test_a_node_that_leaves_an_elastic_range_shrinks_the_world_and_the_run_ends_sample_exact(tmp_path: Path) -> None:
    run_dir, order_log = tmp_path / "run", tmp_path / "order.log"
    port = _free_port()
    logs = {name: (tmp_path / f"agent-{name}.log").open("w") for name in ("kept", "lost")}
    # The node that leaves starts first: its agent waits for the store the other one hosts
    # (is_host=1), so both join the first round as soon as it exists and the round is complete at
    # 2 nodes at once, instead of closing with 1 node when the second agent is slow to start.
    # Killing the agent that hosts the rendezvous store would end the job (the other agent loses
    # its rendezvous), so the lost node is the other one.
    lost = _elastic_agent(run_dir, port, order_log, logs["lost"], hosts_store=False)
    kept = _elastic_agent(run_dir, port, order_log, logs["kept"], hosts_store=True)
    try:
        wait_for(lambda: committed_steps_on_disk(run_dir) or kept.poll() is not None or lost.poll() is not None,
                 timeout=300, interval=0.05)
        assert kept.poll() is None and lost.poll() is None, (tmp_path / "agent-kept.log").read_text()[-3000:]
        first = committed_steps_on_disk(run_dir)[0]
        manifest = json.loads((run_dir / "checkpoints" / f"step-{first:09d}" / "manifest.json").read_text())
        assert manifest["world_size"] == 2, "the first rendezvous round did not hold both nodes"
        _kill_tree(lost)  # the node is gone: its agent and its worker at once
        returncode = kept.wait(timeout=600)
    finally:
        for proc in (kept, lost):
            if proc.poll() is None:
                _kill_tree(proc)
        for out in logs.values():
            out.close()
    kept_log = (tmp_path / "agent-kept.log").read_text()
    context = kept_log[-3000:]
    assert returncode == 0, context
    assert "torchrun restarted the worker group (restart 1, 1 process)" in kept_log, context
    assert "resume is sample-exact (world size 2 -> 1)" in kept_log, context
    resumed = re.search(r"resumed from \S+ \(step (\d+),", kept_log)
    assert resumed, context
    k = int(resumed.group(1))
    assert 4 <= k < 24 and k % 4 == 0, context

    report = json.loads(run_cli("inspect", str(run_dir), "--json", check=True).stdout)
    assert [s["world_size"] for s in report["sessions"]] == [2, 1]
    final = report["checkpoint"]
    assert (final["step"], final["world_size"], final["samples_seen"]) == (24, 1, 24 * 16)

    # the data: steps 1..k on two nodes (one micro-batch each), then k+1..24 on one (two each);
    # what the world-2 group did after step k and lost is logged in between and left out
    lines = order_log.read_text().splitlines()
    (tmp_path / "kept-order.log").write_text("\n".join(lines[:2 * k] + lines[len(lines) - 2 * (24 - k):]) + "\n")
    got_steps = _step_samples(tmp_path / "kept-order.log", 24, 2)
    for epoch in range(4):  # every sample once an epoch
        seen = sorted(i for step in got_steps[6 * epoch:6 * epoch + 6] for i in step)
        assert seen == list(range(96)), f"epoch {epoch}"

    # the same schedule without torchrun: 2 processes to step k, then `resume` on one process
    ref_dir, ref_order = tmp_path / "reference", tmp_path / "reference-order.log"
    run_cli("run", TINY_TASK, "--run-dir", str(ref_dir), *ELASTIC, "trainer.devices=2", f"trainer.max_steps={k}",
            f"task.order_log={ref_order}", timeout=600, check=True)
    ref_resume = run_cli("resume", str(ref_dir), "trainer.devices=1", "trainer.max_steps=24", timeout=600, check=True)
    assert "resume is sample-exact (world size 2 -> 1)" in ref_resume.stderr, ref_resume.stderr[-3000:]
    assert got_steps == _step_samples(ref_order, 24, 2)  # the same samples in every optimizer step
    got, want = _weights(run_dir), _weights(ref_dir)
    assert got.keys() == want.keys()
    for key in got:
        assert torch.equal(got[key], want[key]), f"{key} differs from the 2-then-1-process reference (resumed at step {k})"
