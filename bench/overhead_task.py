"""The work both sides of bench/overhead.py do: a 3-layer MLP regressing a sum, AdamW, CPU.

Shared by the task file that `python -m resilient_train run` trains and by the hand-written
Fabric loop (bench/fabric_loop.py), so the two differ only in the loop around the step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

CONFIG = {"task": {"hidden": 256, "samples": 8192, "dim": 64, "lr": 1e-4}}


def make_problem(hidden: int, samples: int, dim: int) -> tuple[nn.Module, TensorDataset]:
    """The model and data, drawn from torch's global generator (seeded by the caller)."""
    model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
    x = torch.randn(samples, dim)
    return model, TensorDataset(x, x.sum(dim=1, keepdim=True))


def training_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def build(cfg):
    model, data = make_problem(cfg.task.hidden, cfg.task.samples, cfg.task.dim)
    lr = cfg.task.lr
    return {"model": model, "optimizer": lambda params: torch.optim.AdamW(params, lr=lr),
            "train_data": data, "training_step": training_step}
