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
