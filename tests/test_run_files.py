"""The run files beside the checkpoints (issue 18, items 1-6): metrics and sessions across a run
and its mirror, sync order, task snapshot integrity, tracker ids and micro_batch.json.

Everything runs the CLI in process (tests/helpers.run_cli_inprocess) on tests/tasks/tiny.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY_TASK, error_lines
from helpers import run_cli_inprocess

SMALL = ["task.n=64", "checkpoint.every_n_steps=5", "checkpoint.keep_last=3"]


def _logged_steps(run: Path) -> set[int]:
    from resilient_train.metrics import read_rows
    from resilient_train.storage import Storage

    return {row["step"] for row in read_rows(Storage(str(run)))}


def _sessions(run: Path) -> list[dict]:
    return json.loads((run / "sessions.json").read_text())


def test_a_run_resumed_from_its_mirror_and_back_keeps_every_step_and_session(tmp_path: Path) -> None:
    primary, mirror = tmp_path / "P", tmp_path / "M"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(primary), *SMALL, "trainer.max_steps=20",
                      f"checkpoint.mirror={mirror}", check=True)
    run_cli_inprocess("resume", str(mirror), "trainer.max_steps=40", check=True)  # the mirror goes on as a run
    back = run_cli_inprocess("resume", str(primary), "trainer.max_steps=60", check=True)
    assert "step-000000040" in back.stderr and str(mirror) in back.stderr  # resumed from the mirror's newer checkpoint

    assert set(range(5, 61, 5)) <= _logged_steps(primary)
    assert set(range(5, 41, 5)) <= _logged_steps(mirror)
    numbers = [record["session"] for record in _sessions(primary)]
    assert numbers == [1, 2, 3], numbers  # the mirror's session taken over, the new one numbered after it
    assert [r["resumed_from"] for r in _sessions(primary)] == [None, 20, 40]
    kept = [r["session"] for r in _sessions(mirror)]
    assert kept[:2] == [1, 2] and len(set(kept)) == len(kept), kept  # the mirror lost no record either


def test_sync_force_never_shortens_the_destinations_history(tmp_path: Path) -> None:
    primary, copy = tmp_path / "P", tmp_path / "C"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(primary), *SMALL, "trainer.max_steps=10", check=True)
    run_cli_inprocess("sync", str(primary), str(copy), check=True)
    run_cli_inprocess("resume", str(copy), "trainer.max_steps=20", check=True)
    refused = run_cli_inprocess("sync", str(primary), str(copy))
    assert refused.returncode == 2 and len(error_lines(refused.stderr)) == 1, refused.stderr
    run_cli_inprocess("sync", str(primary), str(copy), "--force", check=True)
    assert set(range(5, 21, 5)) <= _logged_steps(copy)
    assert [r["session"] for r in _sessions(copy)] == [1, 2]
