"""Building Lightning Fabric from the trainer config and the hardware actually present."""

from __future__ import annotations

from typing import Optional

import torch
from lightning_fabric import Fabric

from resilient_train.config import TrainerConfig


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed from compute capability 8.0, 16-mixed (with GradScaler) below, 32-true on CPU.

    `torch.cuda.is_bf16_supported()` answers True on a T4 (capability 7.5) through emulation, which
    is slow and not what users want, so the choice reads the capability itself.
    """
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return "bf16-mixed" if major >= 8 else "16-mixed"
    return "32-true"


def resolve_precision(requested: str, accelerator: str) -> str:
    return auto_precision(accelerator) if requested == "auto" else requested


def build_fabric(cfg: TrainerConfig, precision: Optional[str] = None) -> Fabric:
    """A Fabric for this config; `launch()` is left to the caller (it may spawn processes)."""
    return Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=precision or resolve_precision(cfg.precision, cfg.accelerator),
    )
