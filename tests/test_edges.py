"""Issue 18's edges that a user meets through the CLI: merge errors that name the key, a model
that computed no loss, custom metrics in validation, the script-versus-task messages and plot."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import run_cli_inprocess

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "tasks" / "tiny.py")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("override, key", [
    ("checkpoint.stop_signals={a: 1}", "checkpoint.stop_signals"),
    ("trainer=5", "trainer"),
    ("checkpoint=[1, 2]", "checkpoint"),
])
def test_a_value_of_the_wrong_container_type_names_its_key(override: str, key: str) -> None:
    proc = run_cli_inprocess("config", TINY, override)
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc.stderr) == [line for line in proc.stderr.splitlines() if line.strip()]
    assert f"config key '{key}'" in proc.stderr and "Traceback" not in proc.stderr


NO_LOSS_TASK = '''
import torch
from torch import nn

CONFIG = {"trainer": {"max_steps": 2, "batch_size": 4, "progress_bar": False}}


class Output(dict):
    """Shaped like a Hugging Face ModelOutput: .loss is None when no labels came."""

    def __getattr__(self, name):
        return self.get(name)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x, labels=None, label=None):
        logits = self.lin(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits=logits) if loss is None else Output(loss=loss, logits=logits)


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": torch.ones(4) * i, "label": i % 2}


def build(cfg):
    return {"model": Model(), "optimizer": lambda p: torch.optim.SGD(p, lr=0.1), "train_data": Data()}
'''


def test_a_model_that_computed_no_loss_says_the_batch_lacks_labels(tmp_path: Path) -> None:
    task = tmp_path / "noloss.py"
    task.write_text(NO_LOSS_TASK)
    proc = run_cli_inprocess("run", str(task), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "computed no loss" in lines[0] and "'labels'" in lines[0], proc.stderr
    assert "rename it to 'labels'" in lines[0]


SCRIPT = '''
import pathlib
pathlib.Path(__file__).with_name("trained").write_text("the script ran")
from resilient_train import Trainer
raise SystemExit("a script that trains at import must not be run by `run` or `check-resume`")
'''


@pytest.mark.parametrize("command", ["run", "check-resume"])
def test_a_script_without_build_is_refused_before_it_runs(tmp_path: Path, command: str) -> None:
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    args = ["--run-dir", str(tmp_path / "run")] if command == "run" else []
    proc = run_cli_inprocess(command, str(script), *args)
    assert proc.returncode == 2, proc.stderr
    assert "defines no build(cfg)" in proc.stderr, proc.stderr
    assert not (tmp_path / "trained").exists(), "the script was executed"


def test_resume_of_a_run_made_by_a_script_says_run_the_script_again(tmp_path: Path) -> None:
    import torch

    from resilient_train import Trainer

    run = tmp_path / "run"
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    model = torch.nn.Linear(4, 1)
    Trainer(run_dir=str(run), max_steps=2, batch_size=8, progress_bar=False).fit(
        model, lambda p: torch.optim.SGD(p, lr=0.1), data, training_step=lambda m, b: m(b[0]).square().mean())
    proc = run_cli_inprocess("resume", str(run))
    assert proc.returncode == 3, proc.stderr
    assert "run the same script again" in proc.stderr and "run TASK" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_check_resume_stops_the_run_with_its_configured_stop_signal() -> None:
    """With stop_signals=[SIGUSR1] (a SLURM setting), a SIGTERM would kill the run (-15) and the
    check would report a failed resume; it sends SIGUSR1, which the run takes as a stop."""
    from conftest import run_cli  # check_resume binds sys.stderr at import: a process captures it

    proc = run_cli("check-resume", TINY, "--steps", "10", "checkpoint.stop_signals=[SIGUSR1]")
    assert proc.returncode == 0, proc.stderr
    assert "SIGUSR1 as the save of step" in proc.stderr and "SIGTERM" not in proc.stderr, proc.stderr
    assert "exited 75" in proc.stderr


ONE_CYCLE_TASK = '''
import torch

CONFIG = {"trainer": {"max_steps": 8, "batch_size": 4, "progress_bar": False}, "checkpoint": {"every_n_steps": 4}}


def build(cfg):
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    return {"model": torch.nn.Linear(4, 1), "optimizer": lambda p: torch.optim.SGD(p, lr=0.1),
            "scheduler": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=cfg.trainer.max_steps),
            "train_data": data, "training_step": lambda m, b: m(b[0]).square().mean()}
'''


def test_extending_a_one_cycle_run_is_refused_before_training_and_not_kept(tmp_path: Path) -> None:
    task = tmp_path / "one_cycle.py"
    task.write_text(ONE_CYCLE_TASK)
    run = tmp_path / "run"
    run_cli_inprocess("run", str(task), "--run-dir", str(run), check=True)
    proc = run_cli_inprocess("resume", str(run), "trainer.max_steps=10")
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "OneCycleLR" in lines[0] and "trainer.max_steps=8" in lines[0], proc.stderr
    assert "bit-exact" not in proc.stderr and "Traceback" not in proc.stderr
    assert "max_steps: 8" in (run / "run.yaml").read_text()
    again = run_cli_inprocess("resume", str(run))  # the refused change did not stick
    assert again.returncode == 0, again.stderr


def test_a_config_change_is_written_to_run_yaml_only_once_training_started(tmp_path: Path, trained_runs) -> None:
    run = trained_runs.copy(tmp_path / "run")
    failed = run_cli_inprocess("resume", str(run), "trainer.max_steps=45", "task.fail_at=1", "--allow-change", "task.fail_at")
    assert failed.returncode == 1, failed.stderr
    stored = (run / "run.yaml").read_text()
    assert "max_steps: 40" in stored and "fail_at: 0" in stored
    done = run_cli_inprocess("resume", str(run), "trainer.max_steps=45")
    assert done.returncode == 0, done.stderr
    assert "max_steps: 45" in (run / "run.yaml").read_text()


def test_a_one_cycle_schedule_shorter_than_max_steps_is_refused_at_the_start(tmp_path: Path) -> None:
    task = tmp_path / "one_cycle.py"
    task.write_text(ONE_CYCLE_TASK.replace("total_steps=cfg.trainer.max_steps", "total_steps=5"))
    proc = run_cli_inprocess("run", str(task), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "OneCycleLR" in proc.stderr and "trainer.max_steps=5" in proc.stderr


METRICS_TASK = '''
import torch

CONFIG = {"task": {"metric": "accuracy"},
          "trainer": {"max_steps": 4, "batch_size": 4, "log_every_n_steps": 2, "val_every_n_steps": 2, "progress_bar": False},
          "checkpoint": {"every_n_steps": 2}}


def build(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, (x.sum(1) > 0).float())
    name = cfg.task.metric

    def step(model, batch):
        out = model(batch[0]).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, batch[1])
        return {"loss": loss, name: ((out > 0).float() == batch[1]).float().mean()}

    return {"model": torch.nn.Linear(4, 1), "optimizer": lambda p: torch.optim.SGD(p, lr=0.1),
            "train_data": data, "val_data": torch.utils.data.Subset(data, range(16)), "training_step": step}
'''


def test_validation_averages_the_custom_metrics_and_check_resume_compares_them(tmp_path: Path) -> None:
    from resilient_train.run.metrics import read_rows
    from resilient_train.storage import Storage
    from resilient_train.tools.check_resume.compare import _metrics

    task = tmp_path / "metrics_task.py"
    task.write_text(METRICS_TASK)
    run = tmp_path / "run"
    proc = run_cli_inprocess("run", str(task), "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(Storage(str(run)))
    val_rows = [row for row in rows if row.get("val_loss")]
    assert val_rows and all(0.0 <= float(row["val_accuracy"]) <= 1.0 for row in val_rows), rows
    assert "val_accuracy" in proc.stderr
    compared = {column for column, _ in _metrics(Storage(str(run)))}
    assert {"loss", "val_loss", "accuracy", "val_accuracy"} <= compared
    assert not any(column.startswith(("gpu_", "cpu_")) or column in ("lr", "samples_per_sec") for column in compared)


@pytest.mark.parametrize("name", ["cpu_mem_gb", "gpu_util", "val_accuracy"])
def test_a_metric_named_like_a_device_statistic_is_refused(tmp_path: Path, name: str) -> None:
    task = tmp_path / "metrics_task.py"
    task.write_text(METRICS_TASK)
    proc = run_cli_inprocess("run", str(task), "--run-dir", str(tmp_path / "run"), f"task.metric={name}")
    assert proc.returncode == 2, proc.stderr
    assert f"the metric '{name}', a name the trainer logs itself" in proc.stderr


def _killed_and_resumed_run(root: Path) -> Path:
    """Session 1 logs steps 2-8 and is killed after its checkpoint of step 4; sessions 2 (killed
    at once) and 3 both resume from step 4, session 3 re-logs 6 and 8 at another speed."""
    import json

    run = root / "run"
    (run / "logs").mkdir(parents=True)
    rows = ["session,step,epoch,time,loss,lr,samples_per_sec,val_loss"]
    rows += [f"1,{step},0,{step},0.5,0.01,10.0," for step in (2, 4, 6, 8)]
    rows += [f"3,{step},0,{100 + step},0.4,0.01,20.0," for step in (6, 8)]
    (run / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    env = {"device": "cpu"}
    sessions = [{"session": 1, "start_step": 0, "precision": "32-true", "environment": env},
                {"session": 2, "start_step": 4, "precision": "32-true", "environment": env},
                {"session": 3, "start_step": 4, "precision": "bf16-mixed", "environment": env}]
    (run / "sessions.json").write_text(json.dumps(sessions))
    return run


def test_plot_the_newest_session_wins_the_throughput_panel_too(tmp_path: Path) -> None:
    from resilient_train.plot import read_history
    from resilient_train.storage import Storage

    history = read_history(Storage(str(_killed_and_resumed_run(tmp_path))))
    by_number = {session.number: session for session in history.sessions}
    assert by_number[1].steps == [2, 4] and by_number[1].throughput == [10.0, 10.0]
    assert by_number[3].steps == [6, 8] and by_number[3].throughput == [20.0, 20.0]
    assert history.loss == {2: 0.5, 4: 0.5, 6: 0.4, 8: 0.4}


def test_plot_session_labels_do_not_overlap(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from resilient_train.plot import draw, read_history
    from resilient_train.storage import Storage

    fig = draw(read_history(Storage(str(_killed_and_resumed_run(tmp_path)))), "run", plt)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labels = [t for t in fig.findobj(Text) if "session" in t.get_text() and t.get_visible()]
        assert {n for n in (1, 2, 3) if any(f"session {n}" in t.get_text() for t in labels)} == {1, 2, 3}
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), [t.get_text() for t in labels]
    finally:
        plt.close(fig)


def test_the_readme_example_shows_what_a_converted_loop_needs() -> None:
    """README's 30-second example (tests/test_docs.py runs it): seeding before the model and data,
    a scheduler, gradient clipping, the trained model after fit, and what drop_last does."""
    readme = (REPO / "README.md").read_text()
    script = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert script.index("seed_everything(0)") < script.index("model = ") and script.index("seed_everything(0)") < script.index("loader = ")
    assert "scheduler=" in script and "gradient_clip_val=" in script and "drop_last=" in script
    assert "model(torch.tensor" in script.split("trainer.fit(", 1)[1]
    assert "`drop_last=True` drops each epoch's incomplete last batch" in readme


def test_a_module_without_build_is_refused_before_it_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "scripts_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train_at_import.py").write_text(SCRIPT)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    proc = run_cli_inprocess("run", "scripts_pkg.train_at_import", "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "defines no build(cfg)" in proc.stderr
    assert not (package / "trained").exists(), "the module was imported"
