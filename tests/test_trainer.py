"""`Trainer.fit` used directly from Python, as in a script or notebook."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from resilient_train import Trainer, UsageError, seed_everything
from resilient_train.runtime import auto_precision


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


class LossModel(nn.Module):
    """Returns the loss from forward, as the contract allows when no training_step is given."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(x), y)


@dataclass
class HFOutput:
    loss: torch.Tensor


class HFStyleModel(LossModel):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> HFOutput:  # type: ignore[override]
        return HFOutput(loss=super().forward(x, y))


def _fit(run_dir: Path, model: nn.Module, data, **kwargs):
    trainer = Trainer(run_dir=str(run_dir), max_steps=kwargs.pop("max_steps", 6), batch_size=8, every_n_steps=3,
                      progress_bar=False, accelerator="cpu", devices=1, **kwargs)
    return trainer.fit(model, lambda p: torch.optim.SGD(p, lr=0.01), data)


@pytest.mark.parametrize("model_cls", [LossModel, HFStyleModel])
def test_forward_output_is_the_loss_without_training_step(tmp_path: Path, model_cls) -> None:
    seed_everything(0)
    result = _fit(tmp_path / "run", model_cls(), _data())
    assert result.step == 6 and result.loss is not None and result.resumed_from is None


def test_a_dataloader_keeps_its_batch_size_and_collate_fn(tmp_path: Path) -> None:
    seen: list[int] = []

    def collate(items):
        seen.append(len(items))
        x = torch.stack([i[0] for i in items])
        return x, torch.stack([i[1] for i in items])

    loader = DataLoader(_data(), batch_size=5, collate_fn=collate)
    _fit(tmp_path / "run", LossModel(), loader)
    assert seen and set(seen) == {5}


def test_fit_resumes_automatically_and_continues_to_new_max_steps(tmp_path: Path) -> None:
    seed_everything(0)
    _fit(tmp_path / "run", LossModel(), _data(), max_steps=6)
    seed_everything(1)  # a different init: the checkpoint must win
    result = _fit(tmp_path / "run", LossModel(), _data(), max_steps=9)
    assert result.resumed_from == 6 and result.step == 9


def test_a_finished_run_fitted_again_reports_the_losses_of_its_last_checkpoint(tmp_path: Path) -> None:
    """A notebook's "run all" after the run finished: nothing is trained, and the loss is not None."""
    seed_everything(0)
    first = _fit(tmp_path / "run", LossModel(), _data(), max_steps=6)
    again = _fit(tmp_path / "run", LossModel(), _data(), max_steps=6)
    assert again.resumed_from == 6 and again.step == 6
    assert first.loss is not None and again.loss == first.loss


def test_validation_and_metrics_are_logged_as_csv(tmp_path: Path) -> None:
    trainer = Trainer(run_dir=str(tmp_path / "run"), max_steps=8, batch_size=8, every_n_steps=4, log_every_n_steps=2,
                      val_every_n_steps=4, progress_bar=False, accelerator="cpu")
    result = trainer.fit(LossModel(), lambda p: torch.optim.SGD(p, lr=0.01), _data(), val_data=_data(16))
    assert result.val_loss is not None
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    losses = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in losses] == [2, 4, 6, 8]
    assert all(float(r["samples_per_sec"]) > 0 and float(r["lr"]) == 0.01 for r in losses)
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [4, 8]
    assert (tmp_path / "run" / "run.yaml").exists()


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """Two micro-batches of 8 with accumulation give the gradient of one batch of 16 (up to float order)."""
    results = {}
    for name, batch, accum in (("accum", 8, 2), ("big", 16, 1)):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        trainer = Trainer(run_dir=str(tmp_path / name), max_steps=3, batch_size=batch, accumulate_grad_batches=accum,
                          every_n_steps=None, progress_bar=False, accelerator="cpu")
        trainer.fit(model, lambda p: torch.optim.SGD(p, lr=0.1), _data(),
                    training_step=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        results[name] = model.weight.detach().clone()
    torch.testing.assert_close(results["accum"], results["big"], rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown argument 'max_stepz'"):
        Trainer(run_dir=str(tmp_path), max_stepz=3)
    trainer = Trainer(run_dir=str(tmp_path / "r"), max_steps=2, progress_bar=False, accelerator="cpu")
    with pytest.raises(UsageError, match="optimizer"):
        trainer.fit(LossModel(), "adam", _data())


def test_auto_precision_is_fp32_on_cpu() -> None:
    assert auto_precision("cpu") == "32-true"
    if not torch.cuda.is_available():
        assert auto_precision("auto") == "32-true"


@pytest.mark.gpu
def test_auto_precision_follows_compute_capability_not_bf16_emulation() -> None:
    major, _ = torch.cuda.get_device_capability()
    assert auto_precision("auto") == ("bf16-mixed" if major >= 8 else "16-mixed")
