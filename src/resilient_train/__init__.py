"""resilient_train: training that survives a vanishing GPU.

Importing the package does no work: no device probing, no signal handlers, no file access, and
not even `import torch` until a public name is first used (so `python -m resilient_train --help`
and usage errors answer at once).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Trainer": "resilient_train.trainer",
    "FitResult": "resilient_train.trainer",
    "RunConfig": "resilient_train.config",
    "TrainerConfig": "resilient_train.config",
    "CheckpointConfig": "resilient_train.config",
    "ResilientTrainError": "resilient_train.errors",
    "UsageError": "resilient_train.errors",
    "NotFoundError": "resilient_train.errors",
    "TrainingStopped": "resilient_train.errors",
    "seed_everything": "resilient_train.seeding",
    "run_task": "resilient_train.api",
    "resume_run": "resilient_train.api",
}

__all__ = [
    "CheckpointConfig", "FitResult", "NotFoundError", "ResilientTrainError", "RunConfig", "Trainer",
    "TrainerConfig", "TrainingStopped", "UsageError", "__version__", "resume_run", "run_task", "seed_everything",
]

if TYPE_CHECKING:  # pragma: no cover
    from resilient_train.api import resume_run, run_task
    from resilient_train.config import CheckpointConfig, RunConfig, TrainerConfig
    from resilient_train.errors import NotFoundError, ResilientTrainError, TrainingStopped, UsageError
    from resilient_train.seeding import seed_everything
    from resilient_train.trainer import FitResult, Trainer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'resilient_train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
