"""resilient_train: training that survives a vanishing GPU.

Importing the package does no work: no device probing, no signal handlers, no file access.
"""

from resilient_train.config import CheckpointConfig, RunConfig, TrainerConfig
from resilient_train.errors import NotFoundError, ResilientTrainError, TrainingStopped, UsageError
from resilient_train.seeding import seed_everything
from resilient_train.trainer import FitResult, Trainer

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "FitResult",
    "NotFoundError",
    "ResilientTrainError",
    "RunConfig",
    "Trainer",
    "TrainerConfig",
    "TrainingStopped",
    "UsageError",
    "__version__",
    "seed_everything",
]
