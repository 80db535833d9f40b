"""Building Lightning Fabric from the trainer config and the hardware actually present."""

from __future__ import annotations

import atexit
from typing import Optional

import torch
from lightning_fabric import Fabric
from lightning_fabric.utilities.exceptions import MisconfigurationException

from resilient_train.config import TrainerConfig
from resilient_train.errors import UsageError


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
    try:
        return Fabric(
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            strategy=cfg.strategy,
            num_nodes=cfg.num_nodes,
            precision=precision or resolve_precision(cfg.precision, cfg.accelerator),  # type: ignore[arg-type]  # Fabric checks it
        )
    except (MisconfigurationException, ValueError, TypeError) as exc:  # devices/strategy/precision this machine cannot do
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"trainer settings do not fit this machine: {first}") from None


def release_process_groups_at_exit() -> None:
    """Destroy the process groups before the interpreter starts tearing itself down.

    A gloo process group left alive at exit is destroyed during interpreter finalization, when its
    worker threads may still hold tensors whose release needs the GIL: the process then aborts
    ("terminate called without an active exception", SIGABRT) after the run already ended well,
    and a stopped run exits -6 instead of 75. An `atexit` hook runs while the interpreter is whole.
    Registered once per process; a no-op when the groups are already gone.
    """
    global _RELEASE_REGISTERED
    if _RELEASE_REGISTERED:
        return
    _RELEASE_REGISTERED = True
    atexit.register(_destroy_process_groups)


_RELEASE_REGISTERED = False


def _destroy_process_groups() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; a peer that is gone cannot be waited for
            pass
