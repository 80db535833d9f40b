"""What a resume keeps: the model's mode, the run's config, the task's imports, mapping batches.

Config changes go through the real CLI (a user meets them there): keys that change what the run
computes are refused in one line naming `--allow-change KEY`; let through, the resume says
"approximate" and the session record keeps the change. Harmless keys pass and stay bit-exact.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import UserDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY_TASK, error_lines
from helpers import run_cli_inprocess
from resilient_train import Trainer, seed_everything
from resilient_train.config import check_config_changes, config_changes, resolve
from resilient_train.errors import UsageError
from resilient_train.portability import resume_report
from resilient_train.task import load_task
from resilient_train.trainer import default_training_step

BASE = ["task.n=64", "trainer.max_steps=4", "checkpoint.every_n_steps=2"]


def _one_error_line(proc, code: int, *fragments: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _sessions(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "sessions.json").read_text())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run of the tiny task; tests that change it work on a copy."""
    run_dir = tmp_path_factory.mktemp("guards") / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), *BASE, check=True)
    return run_dir


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


# -- config changes on resume --------------------------------------------------------------------

def test_resume_with_another_seed_or_task_key_is_refused_in_one_line_naming_the_flag(base_run: Path) -> None:
    stored, sessions = (base_run / "run.yaml").read_bytes(), len(_sessions(base_run))
    proc = run_cli_inprocess("resume", str(base_run), "seed=7", "task.lr=0.02", "trainer.max_steps=6")
    _one_error_line(proc, 2, "seed (0 -> 7)", "task.lr (0.01 -> 0.02)", "--allow-change seed", "--allow-change task.lr")
    assert "trainer.max_steps" not in error_lines(proc.stderr)[0]  # a harmless change is not named
    assert (base_run / "run.yaml").read_bytes() == stored and len(_sessions(base_run)) == sessions


def test_run_into_an_existing_run_with_another_task_key_or_batch_size_is_refused(base_run: Path) -> None:
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(base_run), *BASE, "task.hidden=64", "trainer.batch_size=4")
    _one_error_line(proc, 2, "task.hidden (32 -> 64)", "trainer.batch_size (8 -> 4)",
                    "--allow-change task.hidden --allow-change trainer.batch_size")


def test_allowed_changes_resume_labelled_approximate_and_are_recorded_in_the_session(run_copy: Path) -> None:
    proc = run_cli_inprocess("resume", str(run_copy), "seed=7", "task.lr=0.02", "trainer.max_steps=6",
                   "--allow-change", "seed", "--allow-change", "task.lr")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume is approximate (config changed with --allow-change: seed, task.lr)" in proc.stderr, proc.stderr[-2000:]
    changes = {c["key"]: c for c in _sessions(run_copy)[-1]["config_changes"]}
    assert changes["seed"] == {"key": "seed", "old": 0, "new": 7, "guarded": True}
    assert changes["task.lr"]["guarded"] and changes["task.lr"]["new"] == 0.02
    assert changes["trainer.max_steps"] == {"key": "trainer.max_steps", "old": 4, "new": 6, "guarded": False}
    assert "seed: 7" in (run_copy / "run.yaml").read_text()  # the next resume continues the changed run
    again = run_cli_inprocess("resume", str(run_copy), "trainer.max_steps=7")
    assert again.returncode == 0 and "resume is bit-exact" in again.stderr, again.stderr[-2000:]


def test_harmless_changes_pass_and_the_resume_stays_bit_exact(run_copy: Path, tmp_path: Path) -> None:
    proc = run_cli_inprocess("resume", str(run_copy), "trainer.max_steps=6", "checkpoint.keep_last=5", "checkpoint.every_n_steps=3",
                   "trainer.log_every_n_steps=1", "trainer.progress_bar=false", "trainer.val_every_n_steps=2",
                   "trainer.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume is bit-exact" in proc.stderr and not error_lines(proc.stderr), proc.stderr[-2000:]
    straight = tmp_path / "straight"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(straight), "task.n=64", "trainer.max_steps=6", check=True)
    for run_dir in (run_copy, straight):
        run_cli_inprocess("export", str(run_dir), str(run_dir / "weights.safetensors"), check=True)
    assert (run_copy / "weights.safetensors").read_bytes() == (straight / "weights.safetensors").read_bytes()


def test_max_steps_below_the_runs_step_is_a_usage_error(base_run: Path) -> None:
    stored = (base_run / "run.yaml").read_bytes()
    proc = run_cli_inprocess("resume", str(base_run), "trainer.max_steps=2")
    _one_error_line(proc, 2, "trainer.max_steps=2", "step 4")
    assert (base_run / "run.yaml").read_bytes() == stored


def _cfg(**trainer) -> object:
    return resolve({"trainer": trainer, "task": {"lr": 0.01}})


@pytest.mark.parametrize("key, value", [("batch_size", 4), ("accumulate_grad_batches", 2), ("devices", 2), ("num_nodes", 2)])
def test_batch_layout_changes_are_guarded_unless_global_batch_size_keeps_the_layout(key: str, value: int) -> None:
    [plain] = config_changes(_cfg(), _cfg(**{key: value}))
    assert plain.key == f"trainer.{key}" and plain.guarded
    [kept] = config_changes(_cfg(global_batch_size=64), _cfg(global_batch_size=64, **{key: value}))
    assert not kept.guarded
    changed = {c.key: c.guarded for c in config_changes(_cfg(global_batch_size=64), _cfg(global_batch_size=32, **{key: value}))}
    assert changed == {"trainer.global_batch_size": True, f"trainer.{key}": True}


def test_hardware_cadence_and_checkpoint_keys_are_free_and_clipping_is_guarded() -> None:
    new = _cfg(max_steps=5000, precision="bf16-mixed", accelerator="cpu", strategy="ddp", num_workers=4,
               gradient_checkpointing=True, val_every_n_steps=10, log_every_n_steps=1, progress_bar=False)
    new.checkpoint.every_minutes = 30.0
    assert [c.key for c in check_config_changes(_cfg(), new) if c.guarded] == []
    [clip] = config_changes(_cfg(), _cfg(gradient_clip_val=1.0))
    assert clip.guarded


def test_allow_change_of_a_section_lets_every_key_under_it_through() -> None:
    stored, new = resolve({"task": {"lr": 0.01, "depth": 2}}), resolve({"task": {"lr": 0.02, "depth": 3, "extra": 1}})
    with pytest.raises(UsageError) as refused:
        check_config_changes(stored, new, ["task.lr"])
    assert "task.depth" in str(refused.value) and "task.lr (" not in str(refused.value) and "\n" not in str(refused.value)
    assert {c.key for c in check_config_changes(stored, new, ["task"])} == {"task.lr", "task.depth", "task.extra"}


# -- what a world-size change does to RNG --------------------------------------------------------

def _report(saved_world: int, now_world: int, **now) -> list[str]:
    manifest = {"world_size": saved_world, "precision": "32-true", "environment": {}, "micro_batch": 8, "global_batch": 16}
    return resume_report(manifest, {"world_size": now_world, "precision": "32-true", "environment": {},
                                    "micro_batch": 8, "global_batch": 16, **now})


def test_a_smaller_world_says_which_rng_streams_are_dropped() -> None:
    lines = _report(2, 1)
    assert lines[0] == "resume is sample-exact (world size 2 -> 1)"
    assert "rank 1's RNG stream is dropped (dropout" in lines[1] and "rank 0 continues its own" in lines[1]
    assert "ranks 2, 3 are dropped" in _report(4, 2)[1]


def test_a_larger_world_says_which_ranks_start_fresh_rng_streams() -> None:
    assert "rank 1 starts a fresh RNG stream" in _report(1, 2)[1]
    assert "ranks 2-7 start fresh RNG streams" in _report(2, 8)[1]


def test_same_world_size_has_no_rng_line_and_allowed_changes_are_approximate() -> None:
    assert _report(2, 2) == ["resume is bit-exact (same world size, device, precision and batch)"]
    assert _report(1, 1, config_changes=["seed"]) == ["resume is approximate (config changed with --allow-change: seed)"]


# -- model mode ----------------------------------------------------------------------------------

def _eval_mode_model() -> nn.Module:
    seed_everything(3)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))
    return model.eval()  # as from_pretrained hands models over


def _fit_eval_mode_model(run_dir: Path, max_steps: int, dropout_on: list[bool]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))

    def step(model: nn.Module, batch) -> torch.Tensor:
        inputs, target = batch
        if torch.is_grad_enabled():  # training, not validation: two passes differ when dropout is on
            dropout_on.append(not torch.equal(model(inputs), model(inputs)))
        return nn.functional.mse_loss(model(inputs), target)

    model = _eval_mode_model()
    trainer = Trainer(run_dir=str(run_dir), max_steps=max_steps, batch_size=8, every_n_steps=100, val_every_n_steps=3,
                      progress_bar=False, accelerator="cpu", devices=1)
    trainer.fit(model, lambda p: torch.optim.AdamW(p, lr=0.01), data, training_step=step, val_data=data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_model_handed_over_in_eval_mode_trains_with_dropout_and_resumes_bit_exact(tmp_path: Path) -> None:
    dropout_on: list[bool] = []
    straight = _fit_eval_mode_model(tmp_path / "straight", 12, dropout_on)
    _fit_eval_mode_model(tmp_path / "interrupted", 6, dropout_on)  # validation at 3 and 6, then stopped
    resumed = _fit_eval_mode_model(tmp_path / "interrupted", 12, dropout_on)  # a fresh eval-mode model resumes
    assert len(dropout_on) == 24 and all(dropout_on), dropout_on
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_validation_gives_every_submodule_its_own_mode_back(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    modes: list[tuple[bool, bool]] = []

    def step(model: nn.Module, batch) -> torch.Tensor:
        net = model.module if hasattr(model, "module") else model
        if torch.is_grad_enabled():
            modes.append((net[0].training, net[1].training))
            net[1].eval()  # the user freezes a part during training
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    Trainer(run_dir=str(tmp_path / "run"), max_steps=4, batch_size=8, every_n_steps=100, val_every_n_steps=1,
            progress_bar=False, accelerator="cpu", devices=1).fit(model, lambda p: torch.optim.SGD(p, lr=0.1), data,
                                                                  training_step=step, val_data=data)
    # validation after each step put back train for [0] and eval for [1], not one flag for all
    assert modes == [(True, True), (True, False), (True, False), (True, False)]
    assert model[0].training and not model[1].training


# -- imports of sibling modules ------------------------------------------------------------------

SIBLING_TASK = '''
import torch
from torch import nn

from rg_sibling_model import make_model  # a sibling module, listed in ASSETS

ASSETS = ["rg_sibling_model.py"]
CONFIG = {"trainer": {"max_steps": 2, "batch_size": 8, "progress_bar": False}, "checkpoint": {"every_n_steps": 2}}


def build(cfg):
    from rg_sibling_model import DIM  # imported while build runs, too
    x = torch.randn(32, DIM)
    return {
        "model": make_model(),
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.1),
        "train_data": torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True)),
        "training_step": lambda model, batch: nn.functional.mse_loss(model(batch[0]), batch[1]),
    }
'''
SIBLING_MODEL = "from torch import nn\nDIM = 4\n\ndef make_model():\n    return nn.Linear(DIM, 1)\n"


def _sibling_task(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "rg_sibling_model.py").write_text(SIBLING_MODEL)
    task = folder / "rg_sibling_task.py"
    task.write_text(SIBLING_TASK)
    return task


def test_a_task_importing_a_sibling_module_runs_and_resumes_from_another_folder(tmp_path: Path) -> None:
    task, run_dir = _sibling_task(tmp_path / "project"), tmp_path / "run"
    proc = run_cli_inprocess("run", str(task), "--run-dir", str(run_dir))  # the CLI's working folder is the repository
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(tmp_path / "project")  # resume has only the run folder's snapshot
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 4" in proc.stderr


def test_loading_and_building_a_task_leave_sys_path_as_it_was(tmp_path: Path) -> None:
    task_file = _sibling_task(tmp_path / "project")
    before = list(sys.path)
    try:
        task = load_task(str(task_file))
        assert sys.path == before
        parts = task.build(resolve(task.defaults).to_dictconfig())
        assert sys.path == before and isinstance(parts["model"], nn.Linear)
    finally:
        sys.modules.pop("rg_sibling_model", None)
        sys.modules.pop("resilient_train_task_rg_sibling_task", None)


# -- mapping batches -----------------------------------------------------------------------------

class KeywordLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(x), y)


def test_a_userdict_batch_becomes_keyword_arguments() -> None:
    batch = UserDict(x=torch.randn(3, 4), y=torch.randn(3, 1))  # as transformers' BatchEncoding
    assert default_training_step(KeywordLoss(), batch).dim() == 0


def test_fit_trains_on_userdict_batches_without_a_training_step(tmp_path: Path) -> None:
    data = TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    loader = DataLoader(data, batch_size=8, collate_fn=lambda items: UserDict(
        x=torch.stack([i[0] for i in items]), y=torch.stack([i[1] for i in items])))
    result = Trainer(run_dir=str(tmp_path / "run"), max_steps=3, every_n_steps=100, progress_bar=False,
                     accelerator="cpu", devices=1).fit(KeywordLoss(), lambda p: torch.optim.SGD(p, lr=0.1), loader)
    assert result.step == 3 and result.loss is not None
