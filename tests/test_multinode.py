"""Two torchrun "nodes" on 127.0.0.1 (one CPU process each): run, interrupt, resume on one node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_TASK, cli_env, committed_steps_on_disk, run_cli, wait_for

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int, run_dir: Path, order_log: Path) -> subprocess.Popen:
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.Popen(
        [str(torchrun), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--master-addr=127.0.0.1",
         f"--master-port={port}", "-m", "resilient_train", "run", TINY_TASK, "--run-dir", str(run_dir),
         "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp", "trainer.accelerator=cpu",
         "task.n=96", "trainer.batch_size=8", "trainer.global_batch_size=16", "trainer.max_steps=9",
         "checkpoint.every_n_steps=2", "task.sleep=0.1", f"task.order_log={order_log}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO, start_new_session=True,
    )


def test_two_torchrun_nodes_interrupted_then_resumed_on_one_node(tmp_path: Path) -> None:
    run_dir, order_log = tmp_path / "run", tmp_path / "order.log"
    port = _free_port()
    nodes = [_node(rank, port, run_dir, order_log) for rank in (0, 1)]
    try:
        wait_for(lambda: any(n.poll() is not None for n in nodes) or committed_steps_on_disk(run_dir), timeout=180)
        os.killpg(nodes[0].pid, signal.SIGTERM)  # node 0 is preempted; the ranks agree to stop together
        outputs = [n.communicate(timeout=120) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    stopped = committed_steps_on_disk(run_dir)[-1]
    assert stopped < 9, outputs[0][1][-2000:]
    manifest = json.loads((run_dir / "checkpoints" / f"step-{stopped:09d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2

    resumed = run_cli("resume", str(run_dir), "trainer.num_nodes=1", "trainer.strategy=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume is sample-exact (world size 2 -> 1)" in resumed.stderr
    samples = [int(i) for line in order_log.read_text().splitlines() for i in line.split()]
    assert sorted(samples[:96]) == list(range(96))
    report = json.loads(run_cli("inspect", str(run_dir), "--json", check=True).stdout)
    assert [s["world_size"] for s in report["sessions"]] == [2, 1]
    assert report["checkpoint"]["step"] == 9
