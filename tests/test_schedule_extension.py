"""Extending a finished run (`resume RUN trainer.max_steps=MORE`) must not make the learning rate jump.

The example task keeps its schedule's horizon in the scheduler's state (a callable object inside
LambdaLR), the pattern docs/configuration.md recommends; this checks the pattern through the
real checkpoint round trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from helpers import run_cli_inprocess
from resilient_train.run.metrics import read_rows
from resilient_train.storage import Storage

pytestmark = pytest.mark.slow

SMALL = ["task.n_layer=1", "task.n_embd=32", "task.n_head=2", "task.block_size=16", "trainer.batch_size=8",
         "task.warmup=2", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=null", "checkpoint.every_n_steps=10",
         "trainer.progress_bar=false"]


def _lrs(run_dir: Path) -> dict[int, float]:
    rows = read_rows(Storage(str(run_dir)))
    return {row["step"]: float(row["lr"]) for row in rows if row.get("lr")}


def test_extending_a_run_continues_at_the_final_learning_rate(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    task = str(REPO / "examples" / "char_gpt.py")
    run_cli_inprocess("run", task, "--run-dir", str(run_dir), "trainer.max_steps=20", *SMALL, check=True)
    final = _lrs(run_dir)[20]
    run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=26", check=True)
    lrs = _lrs(run_dir)
    peak = 6e-3
    assert final == pytest.approx(peak * 0.1, rel=0.05)  # the cosine reached its floor at step 20
    assert all(lrs[step] == pytest.approx(final) for step in range(21, 27)), lrs


def test_an_explicit_schedule_length_change_takes_effect_when_allowed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    task = str(REPO / "examples" / "char_gpt.py")
    run_cli_inprocess("run", task, "--run-dir", str(run_dir), "trainer.max_steps=20", *SMALL, check=True)
    floor = _lrs(run_dir)[20]
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=24", "task.schedule_steps=40",
                   "--allow-change", "task.schedule_steps", check=True)
    assert "approximate" in proc.stderr
    lrs = _lrs(run_dir)
    assert all(lrs[step] > floor * 1.5 for step in range(21, 25)), lrs  # a new, longer cosine: well above the floor
