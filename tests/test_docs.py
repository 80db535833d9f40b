"""The docs stay true: the README quickstart runs as written; every command and config key is documented."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env
from resilient_train.cli import build_parser
from resilient_train.config import CheckpointConfig, LoggingConfig, RunConfig, TrainerConfig


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    script, task = _blocks(readme, "python")[:2]
    (tmp_path / "quick.py").write_text(script)
    (tmp_path / "line_task.py").write_text(task)
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)  # noqa: E731
    proc = run(sys.executable, "quick.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step=200" in proc.stdout
    commands = next(block for block in _blocks(readme, "bash") if "run line_task.py" in block)
    for line in commands.strip().splitlines():
        args = line.split("#")[0].split()
        assert args[:3] == ["python", "-m", "resilient_train"], line
        proc = run(sys.executable, *args[1:])
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert (tmp_path / "runs" / "line" / "model.safetensors").exists()


def test_every_cli_command_is_in_the_cli_reference() -> None:
    reference = (REPO / "docs" / "cli.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [name for name in commands if f"## {name}" not in reference]
    assert not missing, f"commands without a section in docs/cli.md: {missing}"


def test_every_config_key_is_in_the_configuration_reference() -> None:
    reference = (REPO / "docs" / "configuration.md").read_text()
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in ("trainer", "checkpoint", "logging", "task")]
    keys += [f"trainer.{f.name}" for f in dataclasses.fields(TrainerConfig)]
    keys += [f"checkpoint.{f.name}" for f in dataclasses.fields(CheckpointConfig)]
    keys += [f"logging.{f.name}" for f in dataclasses.fields(LoggingConfig)]
    missing = [key for key in keys if f"`{key}`" not in reference]
    assert not missing, f"config keys missing from docs/configuration.md: {missing}"
