"""What a run reports while it trains: custom metrics, device statistics, max_epochs, console lines."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from resilient_train import Trainer, UsageError, seed_everything
from resilient_train.run.metrics import read_rows
from resilient_train.step_metrics import MetricWindow, split_output
from resilient_train.storage import Storage


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def _trainer(run_dir: Path, **kwargs) -> Trainer:
    settings = dict(run_dir=str(run_dir), max_steps=6, batch_size=8, every_n_steps=3, progress_bar=False,
                    accelerator="cpu", devices=1, log_every_n_steps=2)
    settings.update(kwargs)
    return Trainer(**settings)


def _step_with_metrics(model: nn.Module, batch) -> dict:
    x, y = batch
    error = model(x) - y
    return {"loss": error.pow(2).mean(), "mae": error.abs().mean(), "batch_rows": float(len(x))}


def test_metrics_returned_by_training_step_are_window_means_in_the_csv(tmp_path: Path) -> None:
    seed_everything(0)
    model = nn.Linear(4, 1)
    maes: list[float] = []

    def step(m: nn.Module, batch) -> dict:
        out = _step_with_metrics(m, batch)
        maes.append(out["mae"].item())
        return out

    _trainer(tmp_path / "run").fit(model, lambda p: torch.optim.SGD(p, lr=0.01), _data(), training_step=step)
    rows = [row for row in read_rows(Storage(str(tmp_path / "run"))) if row.get("mae")]
    assert [row["step"] for row in rows] == [2, 4, 6]
    for row, window in zip(rows, (maes[0:2], maes[2:4], maes[4:6]), strict=True):
        assert float(row["mae"]) == pytest.approx(sum(window) / 2, rel=1e-5)
        assert float(row["batch_rows"]) == 8.0


def test_metrics_are_weighted_by_chunk_when_micro_batches_split(tmp_path: Path) -> None:
    seed_everything(0)
    _trainer(tmp_path / "run", micro_batch_size=3).fit(nn.Linear(4, 1), lambda p: torch.optim.SGD(p, lr=0.01), _data(),
                                                       training_step=_step_with_metrics)
    rows = [row for row in read_rows(Storage(str(tmp_path / "run"))) if row.get("batch_rows")]
    # chunks of 3, 3 and 2 rows, each weighted by its share of the batch of 8: (9 + 9 + 4) / 8
    assert float(rows[0]["batch_rows"]) == pytest.approx((3 * 3 + 3 * 3 + 2 * 2) / 8)


def test_a_metric_named_like_a_trainer_column_is_refused_in_one_line() -> None:
    with pytest.raises(UsageError, match="'lr', a name the trainer logs itself"):
        split_output({"loss": torch.tensor(1.0), "lr": 0.1})
    with pytest.raises(UsageError, match="without 'loss'"):
        split_output({"mae": torch.tensor(1.0)})
    with pytest.raises(UsageError, match="shape"):
        split_output({"loss": torch.tensor(1.0), "per_sample": torch.ones(3)})


def test_metric_window_resets_after_each_read() -> None:
    window = MetricWindow()
    window.add({"a": torch.tensor(2.0)})
    window.add({"a": 4.0})
    assert window.read(None, torch.device("cpu")) == {"a": 3.0}
    assert window.read(None, torch.device("cpu")) == {}


def test_process_memory_is_logged_each_window_on_cpu(tmp_path: Path) -> None:
    seed_everything(0)
    _trainer(tmp_path / "run").fit(nn.Linear(4, 1), lambda p: torch.optim.SGD(p, lr=0.01), _data(),
                                   training_step=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    rows = [row for row in read_rows(Storage(str(tmp_path / "run"))) if row.get("loss")]
    assert rows and all(float(row["cpu_mem_gb"]) > 0 for row in rows)


def test_gpu_stats_off_logs_no_memory_columns(tmp_path: Path) -> None:
    seed_everything(0)
    _trainer(tmp_path / "run", gpu_stats=False).fit(nn.Linear(4, 1), lambda p: torch.optim.SGD(p, lr=0.01), _data(),
                                                    training_step=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    rows = read_rows(Storage(str(tmp_path / "run")))
    assert rows and not any(row.get("cpu_mem_gb") for row in rows)


def test_max_epochs_stops_at_the_end_of_the_epoch_before_max_steps(tmp_path: Path) -> None:
    seed_everything(0)
    # 64 samples / 8 per batch = 8 steps per epoch; 2 epochs end at step 16, long before 1000
    result = _trainer(tmp_path / "run", max_steps=1000, max_epochs=2).fit(
        nn.Linear(4, 1), lambda p: torch.optim.SGD(p, lr=0.01), _data(),
        training_step=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    assert result.step == 16
    assert result.checkpoint is not None and result.checkpoint.rstrip("/").endswith("16")


def test_without_a_progress_bar_each_log_window_prints_a_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seed_everything(0)
    with caplog.at_level(logging.INFO, logger="resilient_train"):
        _trainer(tmp_path / "run").fit(nn.Linear(4, 1), lambda p: torch.optim.SGD(p, lr=0.01), _data(),
                                       training_step=_step_with_metrics)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert "mae" in lines[0] and "loss" in lines[0]


def test_a_metric_present_on_some_micro_batches_is_their_mean_not_diluted() -> None:
    window = MetricWindow()
    window.add({"late": 2.0})
    window.add({})
    window.add({"late": 4.0})
    assert window.read(None, torch.device("cpu")) == {"late": 3.0}


def test_a_metric_name_with_control_characters_is_refused() -> None:
    with pytest.raises(UsageError, match="without control characters"):
        split_output({"loss": torch.tensor(1.0), "a\nb": 1.0})


RANK_METRICS_TASK = '''
import os
import torch
from torch import nn

CONFIG = {"task": {}, "trainer": {"max_steps": 6, "batch_size": 4, "log_every_n_steps": 2, "progress_bar": False},
          "checkpoint": {"every_n_steps": 3}}


def build(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))

    def step(model, batch):
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        # rank 0 returns no extra metric, rank 1 one of its own: names differ between the ranks
        return {"loss": loss} if rank == 0 else {"loss": loss, "only_rank1": 5.0}

    return {"model": nn.Linear(4, 1), "optimizer": lambda p: torch.optim.SGD(p, lr=0.01),
            "train_data": torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), "training_step": step}
'''


@pytest.mark.slow
def test_ddp_ranks_returning_different_metric_names_neither_hang_nor_mix(tmp_path: Path) -> None:
    from conftest import run_cli

    task = tmp_path / "rank_metrics.py"
    task.write_text(RANK_METRICS_TASK)
    run_dir = tmp_path / "run"
    run_cli("run", str(task), "--run-dir", str(run_dir), "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", timeout=240, check=True)
    rows = [row for row in read_rows(Storage(str(run_dir))) if row.get("loss")]
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert all(float(row["only_rank1"]) == 5.0 for row in rows)  # the mean over the micro-batches that had it
