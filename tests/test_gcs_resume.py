"""A run on gs:// that is SIGKILLed and resumed ends bit-identical to the same run on local disk.

The central test of the design guide (section 6) with the run folder on the GCS emulator: no
renames, listings that must be fresh, saves that die with some objects written and no manifest.
The weights and the per-step data order are compared with an uninterrupted local run.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckpt_files import folder_names, listed_names
from conftest import TINY_TASK, run_cli, start_cli, wait_for
from helpers import assert_same_weights

pytestmark = pytest.mark.slow

ACCUM = 2
SETTINGS = [
    "trainer.max_steps=60",
    f"trainer.accumulate_grad_batches={ACCUM}",
    "trainer.gradient_clip_val=1.0",
    "checkpoint.every_n_steps=5",
    "checkpoint.keep_last=2",
    "task.ballast=1000000",  # ~12 MB per checkpoint (weights + two Adam moments): uploads take a moment
    "task.sleep=0.05",
]


def _run_args(run_dir: str, order_log: Path) -> list[str]:
    return ["run", TINY_TASK, "--run-dir", run_dir, *SETTINGS, f"task.order_log={order_log}"]


def _export(target: str, out: Path) -> dict[str, torch.Tensor]:
    run_cli("export", target, str(out), check=True)
    with safe_open(str(out), "pt") as f:
        assert int(f.metadata()["step"]) == 60
    return load_file(str(out))


class GcsRun:
    """Fresh listings of a run's checkpoints on gs:// (fast enough to poll, unlike `ls --json`)."""

    def __init__(self, url: str) -> None:
        self.fs = fsspec.filesystem("gs")
        self.root = url[len("gs://"):].rstrip("/") + "/checkpoints"

    def _folders(self) -> dict[int, set[str]]:
        self.fs.invalidate_cache()
        try:
            names = self.fs.find(self.root)
        except FileNotFoundError:
            return {}
        folders: dict[int, set[str]] = {}
        for name in names:
            folder, _, fname = name[len(self.root) + 1:].partition("/")
            if folder.startswith("step-") and fname:
                folders.setdefault(int(folder[5:]), set()).add(fname)
        return folders

    def committed(self) -> list[int]:
        return sorted(step for step, files in self._folders().items() if "manifest.json" in files)

    def in_flight(self) -> list[int]:
        return sorted(step for step, files in self._folders().items() if "manifest.json" not in files)


def _truncate_log(order_log: Path, committed: list[int]) -> None:
    """Drop the log lines of steps after the newest committed checkpoint: resume replays them."""
    keep = (committed[-1] if committed else 0) * ACCUM
    if order_log.exists():
        lines = order_log.read_text().split("\n")
        order_log.write_text("".join(line + "\n" for line in lines[:keep]))


@pytest.fixture(scope="module")
def uninterrupted_local(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[str]]:
    tmp = tmp_path_factory.mktemp("gcs_baseline")
    order_log = tmp / "order.log"
    proc = run_cli(*_run_args(str(tmp / "run"), order_log))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _export(str(tmp / "run"), tmp / "final.safetensors"), order_log.read_text().splitlines()


def _kill(proc) -> str:
    assert proc.poll() is None, f"the run finished before it could be killed; make it longer\n{proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.stderr.read()


def test_sigkilled_gcs_run_resumes_bit_identical_to_local(gcs_url: str, tmp_path: Path, uninterrupted_local) -> None:
    weights, order = uninterrupted_local
    order_log = tmp_path / "order.log"
    gcs = GcsRun(gcs_url)
    rng = random.Random(20261125)

    # kill 1: soon after the first checkpoint is committed on gs://
    proc = start_cli(*_run_args(gcs_url, order_log))
    wait_for(lambda: proc.poll() is not None or gcs.committed(), timeout=300, interval=0.05)
    time.sleep(rng.uniform(0.0, 0.4))
    _kill(proc)
    first = gcs.committed()
    assert first and first[-1] < 60, first
    _truncate_log(order_log, first)

    # kill 2 (up to 3 tries): in a resumed session, while a save is half-uploaded, so that the
    # objects of an uncommitted checkpoint are left behind on gs:// for the next session to clear
    committed, debris_left = first, []
    for _ in range(3):
        proc = start_cli("resume", gcs_url)
        newest = committed[-1]
        wait_for(lambda: proc.poll() is not None or [s for s in gcs.in_flight() if s > newest], timeout=300, interval=0.02)
        err = _kill(proc)
        assert f"resumed from {gcs_url}/checkpoints/step-{newest:09d}" in err, err[-2000:]
        committed = gcs.committed()
        _truncate_log(order_log, committed)
        debris_left = [s for s in gcs.in_flight() if s > committed[-1]]
        if debris_left:
            break
    assert debris_left, "no kill landed in the middle of an upload; make checkpoints larger"

    # to the end
    proc = start_cli("resume", gcs_url)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {gcs_url}/checkpoints/step-{committed[-1]:09d}" in err, err[-2000:]
    assert "done: step 60" in err

    assert order_log.read_text().splitlines() == order, "the per-step data order differs"
    assert_same_weights(_export(gcs_url, tmp_path / "final.safetensors"), weights)
    committed = gcs.committed()
    assert committed[-1] == 60 and len(committed) <= 2, committed  # retention kept keep_last=2
    assert not gcs.in_flight(), "debris of a killed save is left on gs://"
    for step in committed:  # a killed attempt's files inside a folder committed later are debris too
        assert folder_names(gcs_url, step) == listed_names(gcs_url, step), f"debris left in step {step}"
    proc = run_cli("verify", gcs_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
