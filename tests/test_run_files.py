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
    from resilient_train.run.metrics import read_rows
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


# -- item 2: a data position the source cannot take ------------------------------------------------
STREAM_TASK = str(Path(__file__).resolve().parent / "tasks" / "stream.py")


def _text_data(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"part{i}.txt").write_text("".join(f"f{i} line {j} alpha beta\n" for j in range(25)))
    return folder


def _tamper_position(checkpoint: Path, change) -> None:
    """Rewrite rank 0's data position and fix its record in the manifest (checksums pass)."""
    from resilient_train.checkpoint.manifest import file_record

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    record = manifest["files"]["data-rank00000.json"]
    path = checkpoint / record["path"]
    raw = json.dumps(change(json.loads(path.read_text()))).encode()
    path.write_bytes(raw)
    manifest["files"]["data-rank00000.json"] = {**file_record(raw), "path": record["path"]}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _set_everywhere(value_of, key: str):
    """A change that sets every `key` in a nested JSON value to value_of(old)."""
    def walk(node):
        if isinstance(node, dict):
            return {k: (value_of(v) if k == key else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk


import pytest  # noqa: E402


@pytest.mark.parametrize("key,value", [("shard_example_idx", lambda v: str(v)), ("shard_idx", lambda v: 99),
                                       ("shard_example_idx", lambda v: -3)], ids=["string", "shard-99", "negative"])
def test_a_data_position_the_source_cannot_take_falls_back_to_the_older_checkpoint(tmp_path: Path, key, value) -> None:
    monkey = pytest.MonkeyPatch()
    monkey.setenv("HF_DATASETS_OFFLINE", "1")
    monkey.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    try:
        data, run = _text_data(tmp_path / "data"), tmp_path / "run"
        args = [f"task.data_dir={data}", "task.source=to_iterable", "checkpoint.every_n_steps=4", "checkpoint.keep_last=3"]
        run_cli_inprocess("run", STREAM_TASK, "--run-dir", str(run), *args, "trainer.max_steps=8", check=True)
        newest = run / "checkpoints" / "step-000000008"
        before = (newest / "manifest.json").read_text()
        _tamper_position(newest, _set_everywhere(value, key))
        assert (newest / "manifest.json").read_text() != before and key in json.dumps(
            json.loads(next(newest.glob("data-rank00000.*.json")).read_text()))
        assert run_cli_inprocess("verify", str(run)).returncode == 0  # the checksums pass
        resumed = run_cli_inprocess("resume", str(run), "trainer.max_steps=12")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "(step 4," in resumed.stderr, resumed.stderr[-3000:]  # the older checkpoint was used
        assert "step-000000008" in resumed.stderr  # and the skipped one named
    finally:
        monkey.undo()


# -- items 4 and 5: damaged tracker ids, a micro-batch record that is not a size ------------------
@pytest.mark.slow
def test_a_damaged_mlflow_id_warns_once_and_the_next_sessions_continue_a_new_run(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        run = tmp_path / "run"
        tracking = ["logging.trackers=[mlflow]", f"logging.mlflow_tracking_uri=file://{tmp_path / 'mlruns'}"]
        run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run), *SMALL, *tracking, "trainer.max_steps=5", check=True)
        ids = run / "logs" / "trackers.json"
        ids.write_text(json.dumps({**json.loads(ids.read_text()), "mlflow": {"run_id": 5}}))
        second = run_cli_inprocess("resume", str(run), "trainer.max_steps=10", check=True)
        assert "could not start" not in second.stderr and "mlflow record is damaged (run_id not a string)" in second.stderr
        assert isinstance(json.loads(ids.read_text())["mlflow"]["run_id"], str)  # the new run's id replaced it
        third = run_cli_inprocess("resume", str(run), "trainer.max_steps=15", check=True)
        assert "record is damaged" not in third.stderr and "could not start" not in third.stderr, third.stderr[-2000:]
    finally:
        monkey.undo()


def test_a_damaged_wandb_id_is_dropped_with_one_warning(tmp_path: Path, caplog) -> None:
    from resilient_train.storage import Storage
    from resilient_train.trackers.base import TrackerIds

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "trackers.json").write_text(json.dumps({"wandb": {"id": ["x"], "project": "p"},
                                                                  "tensorboard": {"dir": "/x"}}))
    ids = TrackerIds(Storage(str(tmp_path)))
    assert ids.get("wandb") == {} and ids.get("tensorboard") == {"dir": "/x"}
    assert "wandb record is damaged (id not a string)" in caplog.text


def test_a_micro_batch_record_that_is_not_a_size_is_ignored_with_a_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "micro_batch.json").write_text(json.dumps({"cpu": True}))
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run), *SMALL, "trainer.max_steps=5",
                             "trainer.micro_batch_size=auto", check=True)
    assert "micro-batch True" not in proc.stderr and "ignoring" in proc.stderr and "micro_batch.json" in proc.stderr
    manifest = json.loads((run / "checkpoints" / "step-000000005" / "manifest.json").read_text())
    assert manifest.get("device_micro_batch") is not True, manifest  # the whole batch of 8, in one chunk


# -- item 3: export through a symlink; a modified task snapshot -----------------------------------
def _tiny_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run), *SMALL, "trainer.max_steps=5", check=True)
    return run


@pytest.mark.parametrize("linked,name", [("task", "tiny.py"), ("logs", "metrics.csv")])
def test_export_through_a_symlink_into_the_run_is_refused(tmp_path: Path, linked: str, name: str) -> None:
    run = _tiny_run(tmp_path)
    before = (run / linked / name).read_bytes()
    (tmp_path / "link").symlink_to(run / linked)
    proc = run_cli_inprocess("export", str(run), str(tmp_path / "link" / name))
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert "run's own files" in proc.stderr
    assert (run / linked / name).read_bytes() == before


def test_a_resume_refuses_a_modified_task_snapshot_in_one_line(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path)
    (run / "task" / "tiny.py").write_bytes(b"not the task any more")
    proc = run_cli_inprocess("resume", str(run), "trainer.max_steps=10")
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
    assert "was modified" in proc.stderr and "restore it" in proc.stderr


# -- item 6: a copy is born whole; a half copy says to sync again ---------------------------------
def test_sync_writes_the_task_snapshot_first_and_run_yaml_last(tmp_path: Path) -> None:
    from resilient_train.checkpoint.transfer import copy_run_files
    from resilient_train.storage import Storage

    run = _tiny_run(tmp_path)
    dst = Storage(str(tmp_path / "copy"))
    order: list[str] = []
    real = dst.write_bytes
    dst.write_bytes = lambda data, *parts: (order.append("/".join(parts)), real(data, *parts))[1]  # type: ignore[method-assign]
    copy_run_files(Storage(str(run)), dst)
    assert order[-1] == "run.yaml", order
    assert order.index("task/tiny.py") < order.index("task/task.json") < order.index("run.json"), order


def test_a_half_copied_run_says_to_sync_again(tmp_path: Path) -> None:
    import shutil

    run = _tiny_run(tmp_path)
    cases = {"no-run-yaml": lambda c: (c / "run.yaml").unlink(),
             "no-task-json": lambda c: (c / "task" / "task.json").unlink(),
             "no-task-file": lambda c: (c / "task" / "tiny.py").unlink()}
    for label, cut in cases.items():
        copy = tmp_path / label
        shutil.copytree(run, copy)
        cut(copy)
        proc = run_cli_inprocess("resume", str(copy))
        assert proc.returncode == 3 and len(error_lines(proc.stderr)) == 1, (label, proc.stderr)
        assert "sync" in error_lines(proc.stderr)[0] and "again" in error_lines(proc.stderr)[0], (label, proc.stderr)
