"""Collecting and restoring the whole training state.

What makes a resume bit-exact is everything that influences the next step: weights, optimizer
moments, scheduler position, GradScaler scale, every RNG (Python, NumPy, torch CPU, each CUDA
device), the data cursor and the step/epoch counters, and, for an iterable train_data, each
rank's position in it. Each RNG is restored independently and a failure is reported, never
allowed to silently skip the others.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Optional, cast

import torch

from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.format import Snapshot
from resilient_train.checkpoint.frozen import ModelInfo, group_name, version_of
from resilient_train.checkpoint.info import LoadedCheckpoint
from resilient_train.checkpoint.jsonio import describe
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


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], in_place: Iterable[str] = ()) -> None:
    """Load normalised weights into `model`, whatever wrapper prefixes it has now.

    Everything is checked before the first weight is copied (`load_state_dict` copies the
    tensors that fit before it reports those that do not), so a checkpoint that does not fit
    leaves the model as it was.
    """
    check_model_state(model, state)
    live = model.state_dict()
    target = {normalize_key(k): k for k in live}
    # what the model already holds (`in_place`: a frozen base that build() reproduced, proven by
    # resolve_shared) is not copied onto itself: besides the time, some layers cannot take their own
    # state back through load_state_dict (bitsandbytes 4-bit weights: absmax, quant_map, quant_state)
    skip = set(in_place)
    load = {target[k]: v for k, v in state.items() if k not in skip and not _is_live(v, live[target[k]])}
    try:
        result = model.load_state_dict(load, strict=False)
        if result.unexpected_keys:  # every key is the model's (checked above): the layer would not take it
            raise RuntimeError(f"Error(s) in loading state_dict: not taken: {', '.join(result.unexpected_keys[:3])}")
    except RuntimeError as exc:  # shapes differ: the model was built with other settings
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise CheckpointError(
            f"the checkpoint does not fit this model ({detail}); resume with the model settings the run was trained with"
        ) from None


def _is_live(saved: torch.Tensor, live: torch.Tensor) -> bool:
    """Whether `saved` is a view of exactly the live tensor's memory (copying it would change nothing)."""
    return (saved.device == live.device and saved.dtype == live.dtype and saved.shape == live.shape
            and saved.stride() == live.stride() and saved.numel() > 0 and saved.data_ptr() == live.data_ptr())


def check_model_state(model: torch.nn.Module, state: Any) -> None:
    """Raise CheckpointError unless `state` has exactly the model's keys, shapes and kinds of dtype.

    A floating dtype may differ (a run resumed in another precision); float vs integer vs bool
    may not: such a tensor cannot be the weight the model has in that slot.
    """
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError("the checkpoint's model weights are not a map of tensors; the checkpoint is corrupt or not ours")
    live = {normalize_key(k): v for k, v in model.state_dict().items()}
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    if missing or unexpected:
        raise CheckpointError(
            "the checkpoint does not fit this model "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
            "resume with the same model definition"
        )
    for key, value in state.items():
        want = live[key]
        if not isinstance(want, torch.Tensor):
            continue  # extra state a module keeps itself
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(
                f"the checkpoint does not fit this model (size mismatch for {key}: checkpoint {list(value.shape)}, "
                f"model {list(want.shape)}); resume with the model settings the run was trained with"
            )
        if _dtype_kind(value) != _dtype_kind(want):
            raise CheckpointError(
                f"the checkpoint does not fit this model ({key} is {value.dtype} in the checkpoint, {want.dtype} in the "
                "model); the checkpoint is corrupt or not ours"
            )


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain Python values and bytes (no ndarrays, no tensors)."""
    rng: dict[str, Any] = {"python": random.getstate(), "torch": _tensor_bytes(torch.get_rng_state())}
    try:
        import numpy as np
    except ImportError:
        rng["numpy"] = None
    else:
        # the global RandomState is MT19937: its legacy state is this 5-tuple, never the dict form
        name, keys, pos, has_gauss, cached = cast("tuple[str, Any, int, int, float]", np.random.get_state())
        rng["numpy"] = {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = [_tensor_bytes(s) for s in torch.cuda.get_rng_state_all()]
    else:
        rng["cuda"] = []
    return rng


def restore_rng(rng: Optional[dict[str, Any]]) -> list[str]:
    """Restore what can be restored; returns one line per state that could not be.

    The states come from a checkpoint file that may be damaged or foreign: whatever they hold,
    each RNG is tried on its own and a failure is a line, never an exception.
    """
    if rng is None:
        return ["no RNG state for this rank in the checkpoint (world size changed?); RNG streams start fresh"]
    if not isinstance(rng, dict):
        return [f"RNG states not restored: the checkpoint holds {_describe(rng)}, not a map; RNG streams start fresh"]
    problems = []
    try:
        random.setstate(rng["python"])
    except Exception as exc:  # noqa: BLE001 - any malformed state: report, restore the others
        problems.append(f"Python RNG not restored: {_why(exc)}")
    try:
        torch.set_rng_state(_bytes_tensor(rng["torch"]))
    except Exception as exc:  # noqa: BLE001
        problems.append(f"torch CPU RNG not restored: {_why(exc)}")
    if rng.get("numpy") is not None:
        try:
            import numpy as np

            s = rng["numpy"]
            np.random.set_state((s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"]))
        except ImportError:
            problems.append("NumPy RNG not restored: numpy is not installed here")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"NumPy RNG not restored: {_why(exc)}")
    cuda_states = rng.get("cuda") or []
    if not isinstance(cuda_states, list) or not all(isinstance(state, bytes) for state in cuda_states):
        problems.append("CUDA RNG states not restored: the checkpoint's CUDA states are not byte strings")
    elif cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available >= len(cuda_states):
            for index, state in enumerate(cuda_states):
                try:
                    torch.cuda.set_rng_state(_bytes_tensor(state), index)
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"CUDA RNG of device {index} not restored: {_why(exc)}")
        else:
            problems.append(
                f"CUDA RNG states of {len(cuda_states)} device(s) not restored: {available} CUDA device(s) here"
            )
    return problems


def _why(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if isinstance(exc, KeyError) or not text else text


def capture(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    progress: Progress,
    data: Optional[dict[str, Any]] = None,
) -> Snapshot:
    """The training state at a step boundary.

    Parameter and optimizer tensors alias the live state: encode or copy the snapshot before the
    next optimizer step changes them (CheckpointSaver.before_update waits for that). `data` is
    this rank's position in an iterable train_data (the stream's `state_dict()`, a copy), written
    to its own per-rank file; the trainer hands it back to the stream on resume.
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
    live = model_state(model)
    weights = {k: v if v.data_ptr() in parameters else v.clone() for k, v in live.items()}
    return Snapshot(model=weights, train=train, rng=capture_rng(), data=data, model_info=model_info(model, live))


def model_info(model: torch.nn.Module, live: dict[str, torch.Tensor]) -> ModelInfo:
    """Which state-dict keys are trainable and each live tensor's version: what tells a save which
    tensors changed since the last one (checkpoint/frozen.py) without hashing the model."""
    storage = {p.untyped_storage().data_ptr(): p.requires_grad for p in model.parameters()}
    trainable = frozenset(k for k, v in live.items() if storage.get(v.untyped_storage().data_ptr()) is True)
    parameters = frozenset(k for k, v in live.items() if v.untyped_storage().data_ptr() in storage)
    return ModelInfo(trainable=trainable, parameters=parameters, versions={k: version_of(v) for k, v in live.items()})


def restore(
    snapshot: Snapshot,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> tuple[Progress, list[str]]:
    """Apply a snapshot; returns the progress counters and one line per thing not restored.

    The snapshot comes from a checkpoint that may be damaged or foreign, so its every part is
    checked against the live objects before the first one is changed: a snapshot that does not
    fit (or holds the wrong types) is a one-line CheckpointError and leaves them as they were.
    """
    progress, problems = _check(snapshot, model, optimizer, scheduler, scaler)
    train = snapshot.train
    saved_scheduler, saved_scaler = train.get("scheduler"), train.get("scaler") or {}
    live_scaler = scaler.state_dict() if scaler is not None else {}

    load_model_state(model, snapshot.model, snapshot.from_live)
    _apply(optimizer.load_state_dict, train["optimizer"], "optimizer state does not fit this optimizer", "resume with the same optimizer")
    if scheduler is not None:
        if saved_scheduler is None:
            problems.append("the checkpoint has no scheduler state; the scheduler starts fresh")
        else:
            _apply(scheduler.load_state_dict, saved_scheduler,
                   "scheduler state does not fit this scheduler", "resume with the same scheduler")
    if saved_scaler and live_scaler:
        _apply(scaler.load_state_dict, saved_scaler, "GradScaler state does not fit this GradScaler", "resume with the same precision")
    elif saved_scaler or live_scaler:
        problems.append("GradScaler state not carried over: precision changed between scaled and unscaled")
    problems += restore_rng(snapshot.rng)
    return progress, problems


def check(snapshot: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
    """Raise CheckpointError unless `restore` would apply `snapshot` cleanly; changes nothing.

    Resume can call it while choosing a checkpoint, so one that decodes but does not fit (or is
    foreign) is skipped like a corrupt one and the next older checkpoint is tried.
    """
    _check(snapshot, model, optimizer, scheduler, scaler)


def _check(snapshot: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
           scaler: Any) -> tuple[Progress, list[str]]:
    train = snapshot.train
    if not isinstance(train, dict):
        raise CheckpointError(f"the checkpoint's training state is {_describe(train)}, not a map; the checkpoint is corrupt or not ours")
    check_model_state(model, snapshot.model)
    _check_optimizer(train.get("optimizer"), optimizer)
    progress, problems = _progress(train.get("progress"))
    saved_scheduler = train.get("scheduler")
    if scheduler is not None and saved_scheduler is not None:
        _check_like(saved_scheduler, scheduler.state_dict(), "scheduler state", "scheduler")
    saved_scaler = train.get("scaler") or {}
    live_scaler = scaler.state_dict() if scaler is not None else {}
    if saved_scaler and live_scaler:
        _check_like(saved_scaler, live_scaler, "GradScaler state", "GradScaler")
    return progress, problems


# optimizers whose per-parameter state tensors (moments, buffers) have the parameter's shape;
# others (Adafactor's factored moments, LBFGS's history, 8-bit states) are not shape-checked
_ELEMENTWISE = tuple(
    getattr(torch.optim, name) for name in
    ("Adam", "AdamW", "SGD", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop", "SparseAdam")
    if hasattr(torch.optim, name)
)


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Raise CheckpointError unless `saved` is an optimizer state that fits `optimizer`."""

    def unfit(detail: str) -> CheckpointError:
        return CheckpointError(f"optimizer state does not fit this optimizer ({detail}); resume with the same optimizer")

    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(saved.get("param_groups"), list):
        raise unfit("it is not a map of state and param_groups")
    groups, live_groups = saved["param_groups"], optimizer.param_groups
    if len(groups) != len(live_groups):
        raise unfit(f"{len(groups)} parameter group(s) in the checkpoint, {len(live_groups)} here")
    params: dict[Any, torch.Tensor] = {}
    for index, (group, live) in enumerate(zip(groups, live_groups, strict=True)):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise unfit(f"parameter group {index} is malformed")
        if len(group["params"]) != len(live["params"]):
            raise unfit(f"parameter group {index} has {len(group['params'])} parameter(s) in the checkpoint, {len(live['params'])} here")
        for key, value in live.items():
            if key != "params" and key in group and not _fits(group[key], value):
                raise unfit(f"'{key}' of parameter group {index} is {_describe(group[key])}")
        for ident, param in zip(group["params"], live["params"], strict=True):
            try:
                params[ident] = param
            except TypeError:  # an unhashable id
                raise unfit(f"parameter group {index} has a malformed parameter id") from None
    elementwise = isinstance(optimizer, _ELEMENTWISE)
    for ident, entry in saved["state"].items():
        if ident not in params or not isinstance(entry, dict):
            raise unfit("its state names a parameter it does not have")
        for key, value in entry.items():
            param = params[ident]
            if elementwise and isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise unfit(f"'{key}' of a parameter of shape {list(param.shape)} has shape {list(value.shape)}")


def _progress(saved: Any) -> tuple[Progress, list[str]]:
    """The progress counters of a checkpoint, checked; unknown fields are reported and ignored."""
    if not isinstance(saved, dict):
        raise CheckpointError("the checkpoint's progress counters are missing or not a map; the checkpoint is corrupt or not ours")
    known = {f.name for f in fields(Progress)}
    absent = [key for key in ("step", "epoch", "cursor", "samples_seen") if key not in saved]
    if absent:
        raise CheckpointError(f"the checkpoint's progress lacks {', '.join(absent)}; the checkpoint is corrupt or not ours")
    values = {}
    for key in sorted(known & set(saved)):
        value = saved[key]
        ok = (isinstance(value, dict) and all(isinstance(k, str) and _is_number(v) for k, v in value.items())) if key == "best" \
            else (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        if not ok:
            want = "an object of numbers" if key == "best" else "a whole number >= 0"
            raise CheckpointError(
                f"the checkpoint's progress '{key}' is {_describe(value)}, not {want}; the checkpoint is corrupt or not ours"
            )
        values[key] = value
    problems = [f"progress field '{str(key)[:40]}' in the checkpoint is not known here; ignored" for key in saved if key not in known]
    return Progress(**values), problems


def _check_like(saved: Any, live: dict[str, Any], what: str, thing: str) -> None:
    """Raise CheckpointError unless `saved` is a map whose numbers and lists are where `live` has them.

    Only what the live object would trip over later is compared: a number must stay a number, a
    list (one entry per parameter group) must keep its length. Other fields may differ between
    torch versions and are left to the object's own `load_state_dict`.
    """
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise CheckpointError(f"the checkpoint's {what} is not a map; resume with the same {thing}")
    for key, value in live.items():
        if key in saved and not _fits(saved[key], value):
            raise CheckpointError(f"{what} does not fit this {thing} ('{key}' is {_describe(saved[key])}); resume with the same {thing}")


def _fits(saved: Any, live: Any) -> bool:
    if isinstance(live, bool) or live is None or isinstance(live, str):
        return True  # flags and names: their own load_state_dict copes, or they differ by version
    if isinstance(live, (int, float)):
        return _is_number(saved) or (isinstance(saved, torch.Tensor) and saved.dim() == 0)
    if isinstance(live, torch.Tensor):
        return isinstance(saved, torch.Tensor) or (live.dim() == 0 and _is_number(saved))
    if isinstance(live, (list, tuple)):
        return isinstance(saved, (list, tuple)) and len(saved) == len(live) and all(_fits(s, v) for s, v in zip(saved, live, strict=True))
    return True


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return describe(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _apply(load: Any, state: Any, unfit: str, fix: str) -> None:
    """`load(state)`; whatever it raises on a state that passed the checks is a CheckpointError."""
    try:
        load(state)
    except Exception as exc:  # noqa: BLE001 - a foreign state can make it fail in any way
        raise CheckpointError(f"{unfit} ({_why(exc)}); {fix}") from None


def _dtype_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "integer"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.cpu().tolist())  # RNG states are small uint8 tensors


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def resolve_shared(snapshot: Snapshot, model: torch.nn.Module, loaded: LoadedCheckpoint) -> list[str]:
    """Fill the shared tensors a checkpoint was loaded without; returns the shared files read.

    A base that `build()` loads again is already in the live model: when the live tensors of a
    shared file serialise to its content name, they are taken and the file is not read (a resume
    from Drive downloads only what changed). Otherwise the file is read and checked (size, crc32c,
    its tensors against its name); a missing or damaged one fails the checkpoint in one line
    naming it, and resume falls back to an older one as for any other defect.
    """
    live = model_state(model)
    by_file: dict[str, list[str]] = {}
    for key, name in snapshot.unresolved.items():
        by_file.setdefault(name, []).append(key)
    resolved: dict[str, torch.Tensor] = {}
    read: list[str] = []
    for name, keys in by_file.items():
        mine = {key: live[key] for key in keys if key in live}
        if len(mine) == len(keys) and group_name(mine) == name:
            resolved.update(mine)
            snapshot.from_live.update(keys)
            continue
        if loaded.read_shared is None:
            raise CheckpointError(f"{loaded.info.path}: shared file {name} was not read")
        try:  # checked: size and crc32c against the manifest, its tensors against its name
            resolved.update(fmt.shared_tensors(loaded.read_shared(name), name, keys))
        except CheckpointError as exc:
            raise CheckpointError(f"{loaded.info.path}: {exc}, and the model build() made does not hold its tensors") from None
        read.append(name)
    fmt.complete_model(snapshot, resolved)
    return read
