"""Experiment trackers that continue across sessions, and a metrics CSV that grows columns.

The trackers are the real packages (each test skips when its package is missing): MLflow with a
local file store, W&B in offline mode (no network), TensorBoard's event files read back with its
own EventAccumulator. A session dies after its last checkpoint and after logging more steps; the
next session, in a new process, resumes from the checkpoint and logs those steps again, with
values that tell the sessions apart (`mark` is the session's number, from the environment).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, cli_env, error_lines

from resilient_train.config import LoggingConfig
from resilient_train.errors import UsageError
from resilient_train.run.metrics import COLUMNS, MetricsLogger, read_rows
from resilient_train.plot import plot_run, read_history
from resilient_train.storage import Storage
from resilient_train.trackers import RunParams

# a small task whose training_step returns a custom metric, `mark`, that says which session ran it;
# TRACKER_TEST_FAIL_AT makes the step raise at that call: a session that dies mid-run
TASK = '''
import os
import torch
from torch import nn

CONFIG = {"trainer": {"max_steps": 12, "batch_size": 8, "log_every_n_steps": 2, "progress_bar": False},
          "checkpoint": {"every_n_steps": 6}}


def build(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    mark = float(os.environ.get("TRACKER_TEST_MARK", "0"))
    fail_at = int(os.environ.get("TRACKER_TEST_FAIL_AT", "0"))
    calls = [0]

    def training_step(model, batch):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("the session dies here")
        x, y = batch
        return {"loss": nn.functional.mse_loss(model(x), y), "mark": torch.tensor(mark)}

    return {"model": nn.Linear(4, 1), "optimizer": lambda p: torch.optim.SGD(p, lr=0.01),
            "train_data": data, "training_step": training_step}
'''

ALL = ("tensorboard", "mlflow", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def _installed(name: str) -> bool:
    try:
        __import__(PACKAGE[name])
    except ImportError:
        return False
    return True


def _offline_env(tmp: Path) -> dict[str, str]:
    """No network for W&B, its files in the test's folder, no console capture."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
            "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}


# -- the two-session run (one die-and-resume, shared by the checks below) ---------------------------
class TwoSessions:
    def __init__(self, root: Path, trackers: list[str]) -> None:
        self.root, self.trackers = root, trackers
        self.run_dir = root / "run"
        self.mlflow_uri = f"file://{root / 'mlruns'}"
        self.wandb_dir = root / "wandb"
        self.first: subprocess.CompletedProcess = subprocess.CompletedProcess([], 0)
        self.second: subprocess.CompletedProcess = subprocess.CompletedProcess([], 0)
        self.mlflow_status_after_first: Any = None


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resilient_train", *args], capture_output=True, text=True,
                          timeout=600, env={**cli_env(), **env}, cwd=REPO)


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory: pytest.TempPathFactory) -> TwoSessions:
    """Session 1 checkpoints step 6, logs step 8 and dies at step 10; session 2 resumes from 6 to 12."""
    root = tmp_path_factory.mktemp("trackers")
    task = root / "marked.py"
    task.write_text(TASK)
    runs = TwoSessions(root, [name for name in ALL if _installed(name)])
    runs.wandb_dir.mkdir()
    env = {**_offline_env(runs.wandb_dir), "TRACKER_TEST_MARK": "1", "TRACKER_TEST_FAIL_AT": "10"}
    runs.first = _cli(["run", str(task), "--run-dir", str(runs.run_dir), f"logging.trackers=[{','.join(runs.trackers)}]",
                       f"logging.mlflow_tracking_uri={runs.mlflow_uri}", "logging.project=rt-test"], env)
    if "mlflow" in runs.trackers:
        runs.mlflow_status_after_first = _mlflow_run(runs).info.status
    env = {**_offline_env(runs.wandb_dir), "TRACKER_TEST_MARK": "2"}
    runs.second = _cli(["resume", str(runs.run_dir)], env)
    return runs


def _ids(runs: TwoSessions) -> dict[str, Any]:
    return json.loads((runs.run_dir / "logs" / "trackers.json").read_text())


def _mlflow_client(runs: TwoSessions) -> Any:
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=runs.mlflow_uri)


def _mlflow_run(runs: TwoSessions) -> Any:
    return _mlflow_client(runs).get_run(_ids(runs)["mlflow"]["run_id"])


@pytest.mark.slow
def test_the_first_session_dies_after_its_checkpoint_and_the_second_finishes(two_sessions: TwoSessions) -> None:
    assert two_sessions.first.returncode == 1, two_sessions.first.stderr[-3000:]
    assert "the session dies here" in two_sessions.first.stderr
    assert two_sessions.second.returncode == 0, two_sessions.second.stderr[-3000:]
    assert "resumed from" in two_sessions.second.stderr and "step 6" in two_sessions.second.stderr


@pytest.mark.slow
def test_tensorboard_shows_each_step_once_with_the_newest_sessions_value(two_sessions: TwoSessions) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert two_sessions.second.returncode == 0, two_sessions.second.stderr[-3000:]
    events = EventAccumulator(str(two_sessions.run_dir / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    marks = [(e.step, e.value) for e in events.Scalars("mark")]
    # step 8 was logged by both sessions: the purge hides the dead session's value
    assert marks == [(2, 1.0), (4, 1.0), (6, 1.0), (8, 2.0), (10, 2.0), (12, 2.0)]
    assert [e.step for e in events.Scalars("loss")] == [2, 4, 6, 8, 10, 12]
    assert len(glob.glob(str(two_sessions.run_dir / "logs" / "tensorboard" / "events.out.tfevents.*"))) == 2


@pytest.mark.slow
def test_mlflow_continues_one_run_and_marks_each_session(two_sessions: TwoSessions) -> None:
    pytest.importorskip("mlflow")
    assert two_sessions.second.returncode == 0, two_sessions.second.stderr[-3000:]
    client = _mlflow_client(two_sessions)
    run = _mlflow_run(two_sessions)
    experiment = client.get_experiment_by_name("rt-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id]
    assert two_sessions.mlflow_status_after_first == "FAILED" and run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["trainer.max_steps"] == "12" and params["checkpoint.every_n_steps"] == "6"
    assert tags["resilient_train.session"] == "2" and tags["env.torch"]
    assert json.loads(tags["resilient_train.session.2"])["start_step"] == 6
    assert json.loads(tags["resilient_train.session.1"])["start_step"] == 0
    # history is append-only: the step both sessions logged has two entries, the newest is session 2's
    history: dict[int, list[Any]] = {}
    for metric in client.get_metric_history(run.info.run_id, "mark"):
        history.setdefault(metric.step, []).append(metric)
    assert sorted(history) == [2, 4, 6, 8, 10, 12]
    assert {step: len(entries) for step, entries in history.items()} == {2: 1, 4: 1, 6: 1, 8: 2, 10: 1, 12: 1}
    newest = {step: max(entries, key=lambda m: m.timestamp).value for step, entries in history.items()}
    assert newest == {2: 1.0, 4: 1.0, 6: 1.0, 8: 2.0, 10: 2.0, 12: 2.0}
    sessions = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "session"))
    assert sessions == [(2, 1.0), (4, 1.0), (6, 1.0), (8, 1.0), (8, 2.0), (10, 2.0), (12, 2.0)]
    assert run.data.metrics["mark"] == 2.0


@pytest.mark.slow
def test_wandb_offline_sessions_log_into_the_run_id_kept_in_the_run_folder(two_sessions: TwoSessions) -> None:
    pytest.importorskip("wandb")
    assert two_sessions.second.returncode == 0, two_sessions.second.stderr[-3000:]
    run_id = _ids(two_sessions)["wandb"]["id"]
    segments = sorted(glob.glob(str(two_sessions.wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(segments) == 2 and all(seg.endswith(f"run-{run_id}.wandb") for seg in segments)
    first, second = (_wandb_history(seg) for seg in segments)
    assert [(row["_step"], row["mark"], row["session"]) for row in first[0]] == [(2, 1, 1), (4, 1, 1), (6, 1, 1), (8, 1, 1)]
    assert [(row["_step"], row["mark"], row["session"]) for row in second[0]] == [(8, 2, 2), (10, 2, 2), (12, 2, 2)]
    for _, config in (first, second):
        assert config["trainer.max_steps"] == 12 and config["env"]["torch"]
    assert first[1]["resilient_train"] == {"session": 1, "start_step": 0}
    assert second[1]["resilient_train"] == {"session": 2, "start_step": 6}


@pytest.mark.slow
def test_the_csv_gains_the_custom_metric_and_plot_draws_the_newest_session(two_sessions: TwoSessions, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert two_sessions.second.returncode == 0, two_sessions.second.stderr[-3000:]
    run = Storage(str(two_sessions.run_dir))
    rows = read_rows(run)
    assert [(r["session"], r["step"], r["mark"]) for r in rows if r["loss"]] == [
        (1, 2, "1.0"), (1, 4, "1.0"), (1, 6, "1.0"), (1, 8, "1.0"), (2, 8, "2.0"), (2, 10, "2.0"), (2, 12, "2.0")]
    with open(two_sessions.run_dir / "logs" / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header[: len(COLUMNS)]) == COLUMNS and "mark" in header
    history = read_history(run)
    assert history.extra["mark"] == {2: 1.0, 4: 1.0, 6: 1.0, 8: 2.0, 10: 2.0, 12: 2.0}
    out = tmp_path / "history.png"
    drawn = plot_run(str(two_sessions.run_dir), str(out))
    assert "mark" in drawn.extra and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _wandb_history(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(history rows, config) of an offline W&B segment, read from its record log."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for data in _leveldb_records(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return [row for row in rows if "mark" in row], config


def _leveldb_records(data: bytes, block: int = 32768) -> list[bytes]:
    """The records of W&B's transaction log (LevelDB's log format after a 7-byte W&B header)."""
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
    return records


# -- trackers through MetricsLogger, in process ------------------------------------------------------
def _session(run: Storage, session: int, start: int, steps: range, offset: float, cfg: LoggingConfig) -> MetricsLogger:
    logger = MetricsLogger(run, session, logging=cfg, start_step=start, params=RunParams(config={"trainer.max_steps": 10}))
    for step in steps:
        logger.log(step, loss=step + offset, lr=0.1)
    logger.close()
    return logger


def test_tensorboard_purges_the_steps_after_the_resume_point(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, cfg = Storage(str(tmp_path / "run")), LoggingConfig(trackers=["tensorboard"])
    _session(run, 1, 0, range(1, 9), 0.0, cfg)  # died at step 8, its checkpoint was step 4
    _session(run, 2, 4, range(5, 11), 0.5, cfg)
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, s + (0.5 if s > 4 else 0.0)) for s in range(1, 11)]
    assert json.loads((tmp_path / "run" / "logs" / "trackers.json").read_text())["tensorboard"]["dir"].endswith("logs/tensorboard")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_mlflow_sessions_share_one_run_whose_latest_values_are_the_newest_sessions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The id lives in the run folder, read and written through its storage (an object store too)."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    run = Storage(str(tmp_path / "run") if where == "local" else f"memory://mlflow-{tmp_path.name}/run")
    cfg = LoggingConfig(trackers=["mlflow"], mlflow_tracking_uri=uri)
    _session(run, 1, 0, range(1, 9), 0.0, cfg)
    _session(run, 2, 4, range(5, 11), 0.5, cfg)
    run_id = json.loads(run.read_text("logs", "trackers.json"))["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("run").experiment_id])) == 1
    assert client.get_run(run_id).data.metrics["loss"] == 10.5
    assert client.get_run(run_id).data.params == {"trainer.max_steps": "10"}


def test_wandb_offline_sessions_reuse_the_recorded_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    for key, value in _offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run, cfg = Storage(str(tmp_path / "run")), LoggingConfig(trackers=["wandb"], wandb_mode="offline")
    _session(run, 1, 0, range(1, 5), 0.0, cfg)
    run_id = json.loads((tmp_path / "run" / "logs" / "trackers.json").read_text())["wandb"]["id"]
    _session(run, 2, 2, range(3, 7), 0.5, cfg)
    segments = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(segments) == 2 and all(seg.endswith(f"run-{run_id}.wandb") for seg in segments)


def test_a_tracker_that_is_not_installed_is_refused_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'resilient_train\[mlflow\]'"):
        MetricsLogger(Storage(str(tmp_path / "run")), 1, logging=LoggingConfig(trackers=["mlflow"]))
    assert not (tmp_path / "run" / "logs" / "trackers.json").exists()


def test_a_missing_tracker_package_exits_2_in_one_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['wandb'] = None\n"
            "from resilient_train.cli import main\nsys.exit(main(sys.argv[1:]))")
    task = tmp_path / "marked.py"
    task.write_text(TASK)
    proc = subprocess.run([sys.executable, "-c", code, "run", str(task), "--run-dir", str(tmp_path / "run"),
                           "logging.trackers=[wandb]", "trainer.max_steps=2"],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "pip install 'resilient_train[wandb]'" in lines[0], proc.stderr[-2000:]


def test_a_tracker_failing_mid_session_is_dropped_and_the_csv_keeps_every_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        name = "broken"
        closed = ""

        def log(self, step: int, values: dict[str, float]) -> None:
            if step == 2:
                raise ConnectionError("server went away")

        def flush(self) -> None:
            pass

        def close(self, outcome: str = "finished") -> None:
            Broken.closed = outcome

    run = Storage(str(tmp_path / "run"))
    logger = MetricsLogger(run, 1)
    logger.trackers.append(Broken())
    for step in (1, 2, 3):
        logger.log(step, loss=1.0)
    logger.close()
    assert logger.trackers == [] and Broken.closed == "failed"
    assert "broken: log failed (ConnectionError: server went away)" in caplog.text
    assert [r["step"] for r in read_rows(run)] == [1, 2, 3]


def test_without_trackers_named_tensorboard_is_used_when_installed_on_local_disk_only(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    local = MetricsLogger(Storage(str(tmp_path / "run")), 1)
    assert [t.name for t in local.trackers] == ["tensorboard"]
    local.close()
    assert glob.glob(str(tmp_path / "run" / "logs" / "tensorboard" / "events.out.tfevents.*"))
    remote = MetricsLogger(Storage("memory://trackers-test/run"), 1)
    assert remote.trackers == []
    named = MetricsLogger(Storage(str(tmp_path / "other")), 1, logging=LoggingConfig(trackers=["tensorboard"]))
    assert [t.name for t in named.trackers] == ["tensorboard"]
    named.close()
    none = MetricsLogger(Storage(str(tmp_path / "none")), 1, logging=LoggingConfig(trackers=[]))
    assert none.trackers == []
    none.log(1, loss=1.0)
    none.close()
    assert not (tmp_path / "none" / "logs" / "tensorboard").exists()


# -- the CSV grows columns ------------------------------------------------------------------------
def _old_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (",".join(COLUMNS) + "\r\n" + "1,2,0,1.0,0.5,0.01,10.0,\r\n" + "1,4,0,1.0,0.4,0.01,10.0,\r\n").encode()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_new_metric_widens_the_csv_and_keeps_every_earlier_row(tmp_path: Path, where: str) -> None:
    url = str(tmp_path / "run") if where == "local" else f"memory://widen-{tmp_path.name}/run"
    run = Storage(url)
    if where == "local":
        _old_file(tmp_path / "run" / "logs" / "metrics.csv")
    else:
        run.write_bytes((",".join(COLUMNS) + "\r\n1,2,0,1.0,0.5,0.01,10.0,\r\n1,4,0,1.0,0.4,0.01,10.0,\r\n").encode(),
                        "logs", "metrics.csv")
    logger = MetricsLogger(run, 2)
    logger.log(6, loss=0.3, accuracy=0.9)
    logger.flush()
    logger.log(8, loss=0.2, gpu_mem_peak_gb=1.5)
    logger.log(10, loss=0.1)
    logger.close()
    text = run.read_bytes("logs", "metrics.csv").decode()
    reader = list(csv.DictReader(text.splitlines()))
    assert list(reader[0]) == [*COLUMNS, "accuracy", "gpu_mem_peak_gb"]
    assert [(r["step"], r["loss"], r["accuracy"], r["gpu_mem_peak_gb"]) for r in reader] == [
        ("2", "0.5", "", ""), ("4", "0.4", "", ""), ("6", "0.3", "0.9", ""), ("8", "0.2", "", "1.5"), ("10", "0.1", "", "")]
    assert [(r["session"], r["step"]) for r in read_rows(run)] == [(1, 2), (1, 4), (2, 6), (2, 8), (2, 10)]


def test_a_crash_while_widening_leaves_the_old_file_whole_and_the_rows_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run" / "logs" / "metrics.csv"
    before = _old_file(path)
    logger = MetricsLogger(Storage(str(tmp_path / "run")), 2)
    logger.log(6, loss=0.3, accuracy=0.9)

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        logger.flush()
    assert path.read_bytes() == before and not list(path.parent.glob(".*.tmp"))
    logger.close()  # the next flush writes what the failed one kept
    assert [(r["step"], r.get("accuracy")) for r in read_rows(Storage(str(tmp_path / "run")))] == [(2, ""), (4, ""), (6, "0.9")]


def test_a_torn_row_is_cut_when_a_new_metric_widens_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "logs" / "metrics.csv"
    whole = _old_file(path)
    path.write_bytes(whole + b"1,6,0,17")  # a crash mid-append
    logger = MetricsLogger(Storage(str(tmp_path / "run")), 2)
    logger.log(6, loss=0.3, mark=2.0)
    logger.close()
    rows = read_rows(Storage(str(tmp_path / "run")))
    assert [(r["session"], r["step"], r["mark"]) for r in rows] == [(1, 2, ""), (1, 4, ""), (2, 6, "2.0")]
    assert b"17\r\n" not in path.read_bytes()


@pytest.mark.slow
def test_a_listed_tracker_that_is_not_installed_stops_every_ddp_rank_in_one_line(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from conftest import REPO, TINY_TASK, cli_env

    shadow = tmp_path / "shadow" / "mlflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('mlflow is not installed here')\n")
    env = {**cli_env(), "PYTHONPATH": str(tmp_path / "shadow")}
    proc = subprocess.run([sys.executable, "-m", "resilient_train", "run", TINY_TASK, "--run-dir", str(tmp_path / "run"),
                           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4",
                           "logging.trackers=[mlflow]"], capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resilient_train[mlflow]" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "DistNetworkError" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
