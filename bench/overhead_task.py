"""The work both sides of bench/overhead.py do: a 3-layer MLP regressing a sum, AdamW, CPU.

Shared by the task file that `python -m resilient_train run` trains and by the hand-written
Fabric loop (bench/fabric_loop.py), so the two differ only in the loop around the step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

# per_sample: the data as a Dataset of its own (fetched sample by sample on both sides) instead of
# a TensorDataset (which `run` gathers in one op per tensor, see data/tensor_rows.py)
CONFIG = {"task": {"hidden": 256, "samples": 8192, "dim": 64, "lr": 1e-4, "per_sample": False}}


class Rows(Dataset):
    """The same rows as the TensorDataset, as a user's own Dataset would hand them out."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_problem(hidden: int, samples: int, dim: int, per_sample: bool = False) -> tuple[nn.Module, Dataset]:
    """The model and data, drawn from torch's global generator (seeded by the caller)."""
    model = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
    x = torch.randn(samples, dim)
    y = x.sum(dim=1, keepdim=True)
    return model, (Rows(x, y) if per_sample else TensorDataset(x, y))


def training_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def build(cfg):
    model, data = make_problem(cfg.task.hidden, cfg.task.samples, cfg.task.dim, cfg.task.per_sample)
    lr = cfg.task.lr
    return {"model": model, "optimizer": lambda params: torch.optim.AdamW(params, lr=lr),
            "train_data": data, "training_step": training_step}
