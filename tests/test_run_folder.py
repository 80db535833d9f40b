"""The run folder's bookkeeping can never block a resume (issue 8, cases 8 and 9).

- A run folder is born whole: a crash at any write of a new run leaves either no `run.yaml`
  (debris that `run` overwrites and `resume` refuses naming `run`) or a run that resumes.
- The task snapshot and `run.yaml` change only after the checkpoint was restored; another task
  into an existing run is refused up front (exit 2) naming `--run-dir`.
- A damaged `sessions.json` or `lease.json` is reported and rebuilt, never fatal.
- A torn last row of `logs/metrics.csv` is skipped by readers and cut before the next append.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, TINY_TASK, cli_env, error_lines
from helpers import run_cli_inprocess
from faulty_fs import Fault, FaultPlan, SimulatedCrash, forget, install
from resilient_train.api import resume_run, run_task
from resilient_train.checkpoint.lease import Lease, read_lease
from resilient_train.errors import NotFoundError
from resilient_train.run.metrics import MetricsLogger, read_rows
from resilient_train.plot import read_history
from resilient_train.run.folder import RunFolder
from resilient_train.storage import Storage

SHORT = ["task.n=32", "trainer.max_steps=4", "trainer.log_every_n_steps=2", "checkpoint.every_n_steps=2"]
BIRTH = ("tiny.py", "task.json", "run.json", "run.yaml")  # the files of a new run, in write order


@pytest.fixture
def url() -> Iterator[str]:
    name = f"runfolder-{uuid.uuid4().hex[:8]}"
    yield f"faulty://{name}/run"
    forget(f"memory://{name}")


def _memory(url: str) -> str:
    return url.replace("faulty://", "memory://", 1)


def _run(tmp_path: Path, *extra: str, task: str = TINY_TASK) -> Path:
    run_dir = tmp_path / "run"
    run_cli_inprocess("run", task, "--run-dir", str(run_dir), *SHORT, *extra, check=True)
    return run_dir


# -- born whole ------------------------------------------------------------------------------------
def test_a_new_run_writes_task_snapshot_then_run_id_then_run_yaml_last(url: str) -> None:
    with install(FaultPlan()) as plan:
        run_task(TINY_TASK, run_dir=url, overrides=SHORT)
    assert [w.name for w in plan.writes][: len(BIRTH)] == list(BIRTH)
    folder = RunFolder.at(_memory(url))
    run_id = folder.run_id()
    assert run_id is not None and len(run_id) == 32
    run_task(TINY_TASK, run_dir=_memory(url), overrides=[*SHORT, "trainer.max_steps=6"])
    assert folder.run_id() == run_id  # the id is written once, when the run is born


@pytest.mark.parametrize("nth", range(1, 8))  # the 4 writes of the birth, then run.yaml, lease, sessions
def test_a_crash_at_any_write_of_a_new_run_leaves_no_run_or_a_whole_one(url: str, nth: int) -> None:
    with install(FaultPlan([Fault("crash", lambda path: True, nth=nth)])) as plan:
        with pytest.raises(SimulatedCrash):
            run_task(TINY_TASK, run_dir=url, overrides=SHORT)
    assert [w.name for w in plan.writes][: len(BIRTH)] == list(BIRTH)[:nth]
    folder = RunFolder.at(_memory(url))
    if folder.has_run():
        assert nth > len(BIRTH)
        assert folder.run_id() is not None and folder.task_meta() is not None
        result = resume_run(_memory(url))  # a whole run: resume continues it from step 0
        assert result.step == 4 and result.resumed_from is None
    else:
        assert nth <= len(BIRTH)
        with pytest.raises(NotFoundError, match=r"no run.yaml.*`run TASK --run-dir"):
            resume_run(_memory(url))
        result = run_task(TINY_TASK, run_dir=_memory(url), overrides=SHORT)  # debris: run starts afresh
        assert result.step == 4
        assert folder.has_run() and folder.task_meta()["entry"] == "tiny.py"


def test_run_overwrites_the_debris_of_a_run_that_crashed_before_run_yaml(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "task").mkdir(parents=True)
    (run_dir / "task" / "other.py").write_text("half a file")
    (run_dir / "task" / "task.json").write_text('{"entry": "other.py"')  # torn
    proc = run_cli_inprocess("resume", str(run_dir))
    assert proc.returncode == 3, proc.stderr
    assert error_lines(proc.stderr) == [f"error: no run at '{run_dir}' (no run.yaml); start one with `run TASK --run-dir {run_dir}`"]
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), *SHORT)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run_dir / "task").iterdir()) == ["task.json", "tiny.py"]
    assert run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=6").returncode == 0


def test_the_documented_supervisor_loop_finishes_a_run_whose_first_attempt_crashed_unborn(tmp_path: Path) -> None:
    loop = re.search(r"```bash\n(until python -m resilient_train run .*?)```", (REPO / "docs" / "cli.md").read_text(), re.S)
    assert loop, "docs/cli.md has no supervisor loop that uses `run`"
    run_dir = tmp_path / "run"
    (run_dir / "task").mkdir(parents=True)
    (run_dir / "task" / "tiny.py").write_text("# the first second of a run")  # no run.yaml: unborn
    script = (loop.group(1).replace("python -m", f"'{sys.executable}' -m").replace("examples/char_gpt.py", TINY_TASK)
              .replace("runs/gpt", str(run_dir)).replace("trainer.max_steps=40", " ".join(SHORT)))
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "done: step 4" in proc.stderr


# -- bookkeeping changes only after the restore ----------------------------------------------------
def test_another_task_into_an_existing_run_is_refused_naming_run_dir(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    other = tmp_path / "other.py"
    other.write_text(Path(TINY_TASK).read_text().replace('"hidden": 32', '"hidden": 8'))
    before = {p.name: p.read_bytes() for p in (run_dir / "task").iterdir()}
    run_yaml = (run_dir / "run.yaml").read_bytes()
    proc = run_cli_inprocess("run", str(other), "--run-dir", str(run_dir), "trainer.max_steps=8")
    assert proc.returncode == 2, proc.stderr
    [line] = error_lines(proc.stderr)
    assert "tiny.py" in line and "other.py" in line and "--run-dir" in line
    assert {p.name: p.read_bytes() for p in (run_dir / "task").iterdir()} == before
    assert (run_dir / "run.yaml").read_bytes() == run_yaml
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr


def test_an_edited_task_of_the_same_name_continues_the_run_and_refreshes_the_snapshot(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    edited = tmp_path / "edited" / "tiny.py"
    edited.parent.mkdir()
    edited.write_text(Path(TINY_TASK).read_text() + "\n# edited\n")
    proc = run_cli_inprocess("run", str(edited), "--run-dir", str(run_dir), *SHORT, "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr
    assert (run_dir / "task" / "tiny.py").read_text().endswith("# edited\n")


def test_a_task_that_does_not_fit_the_checkpoint_leaves_snapshot_and_config_as_they_were(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    misfit = tmp_path / "misfit" / "tiny.py"
    misfit.parent.mkdir()
    misfit.write_text(Path(TINY_TASK).read_text().replace('"hidden": 32', '"hidden": 8'))
    snapshot = (run_dir / "task" / "tiny.py").read_bytes()
    run_yaml = (run_dir / "run.yaml").read_bytes()
    steps_before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = run_cli_inprocess("run", str(misfit), "--run-dir", str(run_dir), *SHORT, "trainer.max_steps=6", "--allow-change", "task.hidden")
    assert proc.returncode == 1  # never a silent fresh start over the run's checkpoints
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "does not fit this model" in lines[0], proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == steps_before
    assert (run_dir / "task" / "tiny.py").read_bytes() == snapshot
    assert (run_dir / "run.yaml").read_bytes() == run_yaml
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr


def test_a_resume_does_not_rewrite_an_unchanged_task_snapshot(url: str) -> None:
    run_task(TINY_TASK, run_dir=_memory(url), overrides=SHORT)
    with install(FaultPlan()) as plan:
        resume_run(url, overrides=["trainer.max_steps=6"])
    names = [w.name for w in plan.writes]
    assert "tiny.py" not in names and "task.json" not in names and "run.json" not in names
    assert "run.yaml" in names


# -- damaged sessions.json / lease.json --------------------------------------------------------------
@pytest.mark.parametrize("damage", ['[{"session": 1, "sta', "not json at all", '{"session": 1}', "[1, 2]"])
def test_a_damaged_sessions_json_blocks_neither_resume_nor_inspect_nor_plot(tmp_path: Path, damage: str) -> None:
    run_dir = _run(tmp_path)
    (run_dir / "sessions.json").write_text(damage)
    proc = run_cli_inprocess("inspect", str(run_dir))
    assert proc.returncode == 0 and not error_lines(proc.stderr), proc.stderr
    assert "sessions.json is damaged" in proc.stderr or "damaged record" in proc.stderr
    proc = run_cli_inprocess("inspect", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    proc = run_cli_inprocess("plot", str(run_dir), str(tmp_path / "a.png"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr
    sessions = json.loads((run_dir / "sessions.json").read_text())
    assert sessions[-1]["session"] == 2 and sessions[-1]["start_step"] == 4  # numbered after the logged session 1
    assert (run_dir / "sessions.json.bak").read_text() == damage
    history = read_history(Storage(str(run_dir)))
    assert [s.number for s in history.sessions][-1] == 2


def test_a_damaged_lease_is_read_as_none_with_a_warning_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = Storage(str(tmp_path))
    for damage in ("", '{"incarna', "[]", '{"incarnation": "7"}', "[" * 100_000):
        (tmp_path / "lease.json").write_text(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert read_lease(storage) == {}
        assert [r.message for r in caplog.records if "lease.json is damaged" in r.message], damage
    lease = Lease.acquire(storage)
    assert lease.incarnation == 1 and read_lease(storage)["incarnation"] == 1


def test_resume_rebuilds_a_damaged_lease(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    (run_dir / "lease.json").write_text('{"incarnation": 1, "wri')
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr
    assert "lease.json is damaged" in proc.stderr
    assert json.loads((run_dir / "lease.json").read_text())["incarnation"] == 1


# -- metrics survive a torn last row -----------------------------------------------------------------
def test_a_torn_metrics_row_is_skipped_by_plot_and_cut_before_the_next_session_appends(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    metrics = run_dir / "logs" / "metrics.csv"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole + b"1,6,0,17000")  # a crash mid-append
    proc = run_cli_inprocess("plot", str(run_dir), str(tmp_path / "a.png"))
    assert proc.returncode == 0, proc.stderr
    assert list(read_history(Storage(str(run_dir))).loss) == [2, 4]
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr
    text = metrics.read_bytes()
    assert text.startswith(whole) and b"17000" not in text
    assert [(r["session"], r["step"]) for r in read_rows(Storage(str(run_dir)))] == [(1, 2), (1, 4), (2, 6)]
    proc = run_cli_inprocess("plot", str(run_dir), str(tmp_path / "b.png"))
    assert proc.returncode == 0, proc.stderr


def test_metrics_readers_skip_rows_that_do_not_parse(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_bytes(
        b"session,step,epoch,time,loss,lr,samples_per_sec,val_loss\r\n"
        b"1,2,0,1.0,0.5,0.01,10.0,\r\n"
        b"1,4,0,1.0,0.4,0.01,10.0,\r\n"
        b"1,6,0,12,6,0,1.0,0.3,0.01,10.0,\r\n"  # a row glued onto a torn one
        b"x,8,0,1.0,0.3,0.01,10.0,\r\n"
        b"2,\x00\xff,0,1.0,0.3,0.01,10.0,\r\n"
        b"2,8,0,1.0,0.2,0.01,10.0,\r\n"
        b"2,10,0,1.0,0.1"  # torn
    )
    assert [(r["session"], r["step"]) for r in read_rows(Storage(str(tmp_path)))] == [(1, 2), (1, 4), (2, 8)]
    assert list(read_history(Storage(str(tmp_path))).loss) == [2, 4, 8]


@pytest.mark.parametrize("torn", [b"1,6,0,170", b"sess"])
def test_an_object_store_metrics_file_loses_its_torn_tail_at_the_next_append(url: str, torn: bytes) -> None:
    run = Storage(_memory(url))
    header = b"session,step,epoch,time,loss,lr,samples_per_sec,val_loss\r\n"
    whole = header + b"1,2,0,1.0,0.5,0.01,10.0,\r\n" if torn != b"sess" else b""
    run.write_bytes(whole + torn, "logs", "metrics.csv")
    logger = MetricsLogger(run, session=2)
    logger.log(8, loss=0.25)
    logger.close()
    lines = run.read_bytes("logs", "metrics.csv").split(b"\r\n")
    assert lines[0] + b"\r\n" == header and lines[-1] == b"" and lines[-2].startswith(b"2,8,")
    assert len(lines) == (4 if whole else 3)  # header, [the whole row,] the new row, ""
    assert [(r["session"], r["step"]) for r in read_rows(run)] == ([(1, 2)] if whole else []) + [(2, 8)]


def test_a_local_metrics_file_torn_inside_its_header_is_started_again(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_bytes(b"session,st")
    logger = MetricsLogger(Storage(str(tmp_path)), session=1)
    logger.log(2, loss=0.5)
    logger.close()
    assert [(r["session"], r["step"]) for r in read_rows(Storage(str(tmp_path)))] == [(1, 2)]
