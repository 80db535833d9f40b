"""`sync` never damages what is at the destination (issue 8, cases 2 and 7), through the real CLI.

A committed checkpoint at DST is never written again; DST's run files are not replaced when DST
has moved past SRC; two different runs are not merged; a step pruned at SRC during the copy is
skipped without debris; symlinks at SRC are never followed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TINY_TASK, error_lines
from helpers import run_cli_inprocess

SETTINGS = ["trainer.max_steps=12", "checkpoint.every_n_steps=3", "checkpoint.keep_last=3", "task.n=64"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _committed(run: Path) -> list[int]:
    rows = json.loads(run_cli_inprocess("ls", str(run), "--json", check=True).stdout)
    return sorted(r["step"] for r in rows if r["status"] == "committed")


def _one_error(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, trained_runs) -> dict[str, Path]:
    """Run A to step 12; run B, another run (other seed) with its own steps 6, 9, 12."""
    tmp = tmp_path_factory.mktemp("sync-safety")
    a, b = tmp / "a", tmp / "b"
    trained_runs.copy(a, *SETTINGS)
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(b), *SETTINGS, "seed=7", check=True)
    return {"a": a, "b": b}


def test_sync_into_another_run_is_refused_and_writes_nothing(runs, tmp_path: Path) -> None:
    dst = tmp_path / "b"
    shutil.copytree(runs["b"], dst)
    before = _tree(dst)
    line = _one_error(run_cli_inprocess("sync", str(runs["a"]), str(dst)), 2)
    assert "different runs" in line, line
    assert _tree(dst) == before


def test_sync_into_another_run_without_run_ids_keeps_its_committed_checkpoints(runs, tmp_path: Path) -> None:
    """Even when the run ids are gone (runs from before run ids), same-numbered steps are conflicts."""
    dst = tmp_path / "b"
    shutil.copytree(runs["b"], dst)
    (dst / "run.json").unlink(missing_ok=True)
    before = _tree(dst)
    proc = run_cli_inprocess("sync", str(runs["a"]), str(dst))
    line = _one_error(proc, 1)
    assert "left as they are" in line, line
    assert _tree(dst) == before  # checkpoints, run.yaml, sessions and logs: another history, kept
    assert run_cli_inprocess("verify", str(dst)).returncode == 0


def test_sync_onto_a_copy_that_moved_on_keeps_its_config_sessions_logs_and_retention(runs, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    run_cli_inprocess("sync", str(runs["a"]), str(copy), check=True)
    proc = run_cli_inprocess("resume", str(copy), "trainer.max_steps=18", "checkpoint.keep_last=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _committed(copy) == [18]
    before = _tree(copy)

    line = _one_error(run_cli_inprocess("sync", str(runs["a"]), str(copy)), 2)
    assert "moved past" in line and "--force" in line, line
    assert _tree(copy) == before  # run.yaml, sessions.json, metrics.csv, checkpoints: all as they were

    proc = run_cli_inprocess("sync", str(runs["a"]), str(copy), "--force")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _tree(copy)
    assert after["run.yaml"] == (runs["a"] / "run.yaml").read_bytes()  # forced: replaced
    assert {k: v for k, v in after.items() if k.startswith("checkpoints/step-000000018")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/step-000000018")}


def test_resync_does_not_bring_back_checkpoints_the_destination_pruned(runs, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    run_cli_inprocess("sync", str(runs["a"]), str(copy), check=True)
    for step in (6, 9):
        shutil.rmtree(copy / "checkpoints" / f"step-{step:09d}")  # what retention at DST does
    proc = run_cli_inprocess("sync", str(runs["a"]), str(copy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "older than the destination's newest" in proc.stderr, proc.stderr
    assert _committed(copy) == [12]


def test_sync_does_not_follow_symlinks(runs, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(runs["a"], src)
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    os.symlink(secret, src / "logs" / "x")
    proc = run_cli_inprocess("sync", str(src), str(dst))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (dst / "logs" / "x").exists()
    assert "symlink" in proc.stderr
    assert _committed(dst) == [6, 9, 12]


def test_a_step_pruned_at_the_source_during_sync_is_skipped_without_debris(runs, tmp_path: Path, monkeypatch) -> None:
    """In-process: the source loses step 9 while step 6 is being copied (a live run pruning)."""
    from resilient_train.checkpoint.manager import CheckpointManager
    from resilient_train.checkpoint.transfer import sync_run
    from resilient_train.storage import Storage

    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(runs["a"], src)
    real_read = Storage.read_buffer
    pruned = []

    def read_and_prune(self, *parts):
        if "step-000000006" in parts and not pruned:
            pruned.append(True)
            CheckpointManager(Storage(str(src))).delete(9)
        return real_read(self, *parts)

    monkeypatch.setattr(Storage, "read_buffer", read_and_prune)
    report = sync_run(Storage(str(src)), Storage(str(dst)))
    assert report.copied == [6, 12] and report.vanished == [9]
    assert sorted(p.name for p in (dst / "checkpoints").iterdir()) == ["step-000000006", "step-000000012"]


def test_the_mirror_copies_run_files_only_when_they_changed(runs, tmp_path: Path) -> None:
    """Each mirrored checkpoint re-sends only what changed (logs grow; the task snapshot does not)."""
    import uuid

    from faulty_fs import FaultPlan, forget, install
    from resilient_train.checkpoint.mirror import Mirror
    from resilient_train.checkpoint.retention import RetentionPolicy
    from resilient_train.storage import Storage

    run_dir = tmp_path / "run"
    shutil.copytree(runs["a"], run_dir)
    url = f"faulty://rt-mirror-{uuid.uuid4().hex}/run"
    mirror = Mirror(Storage(str(run_dir)), Storage(url), RetentionPolicy(keep_last=3))
    try:
        with install(FaultPlan()) as plan:
            mirror.submit(6)
            mirror.close()
            metrics = run_dir / "logs" / "metrics.csv"
            width = len(metrics.read_text().splitlines()[0].split(","))  # a whole row: the mirror merges rows
            with open(metrics, "a") as f:
                f.write(",".join(["2", "13", "0", "0", "0.5", "0.01", "1"] + [""] * (width - 7)) + "\n")
            mirror.submit(9)
            mirror.close()
        names = [w.path.split("/run/", 1)[1] for w in plan.writes if "/checkpoints/" not in w.path]
        assert names.count("task/tiny.py") == 1 and names.count("run.yaml") == 1, names
        assert names.count("logs/metrics.csv") == 2, names
        assert mirror.copied == [6, 9] and not mirror.errors
    finally:
        forget(url)


def test_a_mirror_that_holds_another_run_is_never_written(runs, tmp_path: Path) -> None:
    from resilient_train.checkpoint.mirror import Mirror
    from resilient_train.checkpoint.retention import RetentionPolicy
    from resilient_train.storage import Storage

    other = tmp_path / "b"
    shutil.copytree(runs["b"], other)
    before = _tree(other)
    mirror = Mirror(Storage(str(runs["a"])), Storage(str(other)), RetentionPolicy(keep_last=3))
    mirror.submit(12)
    mirror.close()
    assert _tree(other) == before
    assert mirror.errors and "different runs" in mirror.errors[0]
