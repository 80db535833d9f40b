"""What a new user meets in the first hour: one clear line for each mistake, and the truth in records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_TASK, error_lines
from helpers import run_cli_inprocess

QUICK = ["trainer.max_steps=2", "checkpoint.every_n_steps=2", "task.n=32"]


def _one_error(proc, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_bare_run_says_what_it_needs_with_an_example() -> None:
    line = _one_error(run_cli_inprocess("run"), 2)
    assert "run needs TASK" in line and "python -m resilient_train run " in line and "KEY=VALUE" not in line.split(",")[0]


def test_a_bare_resume_says_it_needs_a_run_folder() -> None:
    assert "resume needs RUN" in _one_error(run_cli_inprocess("resume"), 2)


def test_a_mistyped_key_suggests_the_nearest_valid_one(tmp_path: Path) -> None:
    line = _one_error(run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "r"), "trainer.precison=32-true"), 2)
    assert "did you mean trainer.precision?" in line
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_a_key_in_the_wrong_section_names_the_right_one(tmp_path: Path) -> None:
    line = _one_error(run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "r"), "trainer.every_n_steps=5"), 2)
    assert "did you mean checkpoint.every_n_steps?" in line


def test_cuda_asked_for_on_a_machine_without_it_exits_2_saying_what_to_do(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _one_error(run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "r"), "trainer.accelerator=cuda", *QUICK), 2)
    assert "trainer.accelerator=cuda" in line and "trainer.accelerator=auto" in line


@pytest.mark.slow
def test_the_precision_recorded_is_the_one_that_ran(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("16-mixed runs as such on a GPU")
    run_dir = tmp_path / "r"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), "trainer.precision=16-mixed", *QUICK, check=True)
    shown = json.loads(run_cli_inprocess("inspect", str(run_dir), "--json", check=True).stdout)
    assert shown["checkpoint"]["precision"] == "bf16-mixed"  # Fabric runs fp16 AMP as bf16 on CPU
    assert shown["sessions"][0]["precision"] == "bf16-mixed"


def test_config_prints_every_value_with_the_layer_that_set_it(tmp_path: Path) -> None:
    layer = tmp_path / "layer.yaml"
    layer.write_text("trainer:\n  batch_size: 4\n")
    proc = run_cli_inprocess("config", TINY_TASK, "--config", str(layer), "trainer.max_steps=7", check=True)
    lines = {line.split(":")[0]: line for line in proc.stdout.splitlines()}
    assert lines["trainer.max_steps"].endswith("# KEY=VALUE") and ": 7 " in lines["trainer.max_steps"]
    assert lines["trainer.batch_size"].endswith(f"# --config {layer}")
    assert lines["checkpoint.keep_last"].endswith("# task CONFIG")  # tiny.py's CONFIG sets it
    assert lines["checkpoint.mode"].endswith("# default")


def test_config_refuses_an_unknown_key_like_run_does(tmp_path: Path) -> None:
    assert "did you mean trainer.max_steps?" in _one_error(run_cli_inprocess("config", TINY_TASK, "trainer.max_step=3"), 2)
