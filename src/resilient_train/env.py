"""The environment fingerprint recorded in every checkpoint (and shown by `env`)."""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata
from typing import Any


@functools.cache
def _version(dist: str) -> str | None:
    """An installed distribution's version, looked up once per process: the lookup scans every
    entry of sys.path (~0.75 ms), and a run records the fingerprint at start and at each resume."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def host_kind() -> str:
    """`colab` on a Colab VM, `kaggle` on Kaggle (it also sets COLAB_RELEASE_TAG), else `local`."""
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    if os.environ.get("COLAB_RELEASE_TAG") and os.path.exists("/var/colab/hostname"):
        return "colab"
    return "local"


def gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
        })
    return found


def training_fingerprint(device_type: str) -> dict[str, Any]:
    """The fingerprint plus the kind of device the run trains on (`cpu`, `cuda`): GPUs that are
    present but unused (`trainer.accelerator=cpu` on a GPU machine) must not count as the device."""
    return {**fingerprint(), "device": device_type}


def fingerprint() -> dict[str, Any]:
    """Versions and hardware that can change the numbers a resumed run produces."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning_fabric": _version("lightning-fabric") or _version("lightning"),
        "resilient_train": _version("resilient_train"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpus": gpus(),
        "host": host_kind(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }
