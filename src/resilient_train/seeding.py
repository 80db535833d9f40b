"""Seeding every RNG the training state depends on."""

from __future__ import annotations

import os
import random

import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (when installed) and torch (CPU and every CUDA device).

    Called before the task's `build` so model initialisation is reproducible from `cfg.seed`.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
