"""Collecting and restoring the whole training state.

What makes a resume bit-exact is everything that influences the next step: weights, optimizer
moments, scheduler position, GradScaler scale, every RNG (Python, NumPy, torch CPU, each CUDA
device), the data cursor and the step/epoch counters. Each RNG is restored independently and a
failure is reported, never allowed to silently skip the others.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from resilient_train.checkpoint.format import Snapshot
from resilient_train.errors import CheckpointError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Progress:
    """Counters that place the run in time: optimizer steps, data position, best metrics."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0  # samples of the current epoch consumed by all ranks together
    samples_seen: int = 0
    best: dict = field(default_factory=dict)


def normalize_key(key: str) -> str:
    """A state-dict key without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the user's own key names."""
    return {normalize_key(k): v for k, v in model.state_dict().items()}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load normalised weights into `model`, whatever wrapper prefixes it has now."""
    target = {normalize_key(k): k for k in model.state_dict()}
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint does not fit this model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
            "resume with the same model definition"
        )
    try:
        model.load_state_dict({target[k]: v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:  # shapes differ: the model was built with other settings
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise CheckpointError(
            f"the checkpoint does not fit this model ({detail}); resume with the model settings the run was trained with"
        ) from None


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain Python values and bytes (no ndarrays, no tensors)."""
    rng: dict[str, Any] = {"python": random.getstate(), "torch": _tensor_bytes(torch.get_rng_state())}
    try:
        import numpy as np
    except ImportError:
        rng["numpy"] = None
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [_tensor_bytes(s) for s in torch.cuda.get_rng_state_all()]
    else:
        rng["cuda"] = []
    return rng


def restore_rng(rng: Optional[dict[str, Any]]) -> list[str]:
    """Restore what can be restored; returns one line per state that could not be."""
    if rng is None:
        return ["no RNG state for this rank in the checkpoint (world size changed?); RNG streams start fresh"]
    problems = []
    try:
        random.setstate(rng["python"])
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"Python RNG not restored: {exc}")
    try:
        torch.set_rng_state(_bytes_tensor(rng["torch"]))
    except (KeyError, TypeError, RuntimeError) as exc:
        problems.append(f"torch CPU RNG not restored: {exc}")
    if rng.get("numpy") is not None:
        try:
            import numpy as np

            s = rng["numpy"]
            np.random.set_state((s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"]))
        except ImportError:
            problems.append("NumPy RNG not restored: numpy is not installed here")
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"NumPy RNG not restored: {exc}")
    cuda_states = rng.get("cuda") or []
    if cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available >= len(cuda_states):
            for index, state in enumerate(cuda_states):
                torch.cuda.set_rng_state(_bytes_tensor(state), index)
        else:
            problems.append(
                f"CUDA RNG states of {len(cuda_states)} device(s) not restored: {available} CUDA device(s) here"
            )
    return problems


def capture(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    progress: Progress,
) -> Snapshot:
    """The training state at a step boundary.

    Parameter and optimizer tensors alias the live state: encode or copy the snapshot before the
    next optimizer step changes them (CheckpointSaver.before_update waits for that).
    """
    train = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": asdict(progress),
    }
    # buffers (BatchNorm statistics) change during forward, so an async save must not read them
    # later: copy them now; parameters only change in optimizer.step(), which waits for the save
    parameters = {p.data_ptr() for p in model.parameters()}
    weights = {k: v if v.data_ptr() in parameters else v.clone() for k, v in model_state(model).items()}
    return Snapshot(model=weights, train=train, rng=capture_rng())


def restore(
    snapshot: Snapshot,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> tuple[Progress, list[str]]:
    """Apply a snapshot; returns the progress counters and one line per thing not restored."""
    load_model_state(model, snapshot.model)
    train = snapshot.train
    try:
        optimizer.load_state_dict(train["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"optimizer state does not fit this optimizer ({exc}); resume with the same optimizer") from None
    problems = []
    if scheduler is not None:
        if train.get("scheduler") is None:
            problems.append("the checkpoint has no scheduler state; the scheduler starts fresh")
        else:
            scheduler.load_state_dict(train["scheduler"])
    saved_scaler = train.get("scaler") or {}
    live_scaler = scaler.state_dict() if scaler is not None else {}
    if saved_scaler and live_scaler:
        scaler.load_state_dict(saved_scaler)
    elif saved_scaler or live_scaler:
        problems.append("GradScaler state not carried over: precision changed between scaled and unscaled")
    problems += restore_rng(snapshot.rng)
    return Progress(**train["progress"]), problems


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.cpu().tolist())  # RNG states are small uint8 tensors


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

