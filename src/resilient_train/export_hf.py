"""`export RUN OUT_DIR --format hf`: a checkpoint as a folder Hugging Face's `from_pretrained` loads.

Our checkpoints hold the weights alone, under the user's key names. What `from_pretrained` needs
besides (the model's config, which weights are tied, the PEFT adapter config, the tokenizer) lives
only in the objects the task builds, so the export rebuilds the model the way `resume` does (the
run's stored config and task snapshot, every RNG seeded from `cfg.seed`, then `build`), loads the
checkpoint's weights into it, and lets the library write its own format with `save_pretrained`:
its key names, its handling of tied weights, its adapter files. Nothing is trained and the run
folder is only read.

A model that wraps a Hugging Face model (`self.backbone = AutoModel...`) is exported as that
inner model. transformers and peft are imported only here, and only when installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from resilient_train.errors import UsageError
from resilient_train.storage import Storage

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'resilient_train[hf]'"
_NOT_A_TARGET = ("manifest.json", "run.yaml")  # a checkpoint or a run: never written into


@dataclass
class HFExport:
    """What was written: the class exported, whether it is a PEFT adapter, the files."""

    model_class: str
    adapter: bool
    tokenizer: bool
    files: list[str]


def require_transformers() -> None:
    """Fail fast, before any checkpoint is read, when the `hf` extra is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise UsageError(f"export --format hf needs the transformers package; install it with {INSTALL_HINT}")


def check_target(out: str) -> Storage:
    """OUT_DIR, refused when it is a run or a checkpoint folder (`model.safetensors` there is ours)."""
    from resilient_train.export_target import refuse_run_owned_target

    target = Storage(out)
    for name in _NOT_A_TARGET:
        if target.exists(name):
            raise UsageError(f"'{out}' holds a run or checkpoint ({name}); export into another folder")
    refuse_run_owned_target(out)  # nor anywhere inside a checkpoint or a run's own files
    return target


def export_hf(run: Storage, weights: dict[str, torch.Tensor], out: str) -> HFExport:
    """Rebuild the task's model from `run`, load `weights` into it and `save_pretrained` it to `out`.

    `weights` are a checkpoint's model weights as `export` decodes them (user key names, tied
    keys as one tensor). Raises UsageError (exit 2) when the model is not a Hugging Face one or
    `out` is a run or checkpoint folder, CheckpointError when the weights do not fit the rebuilt
    model (the task snapshot was edited since).
    """
    require_transformers()
    target = check_target(out)
    with tempfile.TemporaryDirectory(prefix="resilient_train_export_") as tmp:
        parts = _rebuild(run, os.path.join(tmp, "task"))
        model = parts["model"]
        hf_model = _hf_model(model)
        from resilient_train.state import load_model_state

        load_model_state(model, weights)  # the whole model: the checkpoint's keys are its keys
        hf_model.eval()
        tokenizer = parts.get("tokenizer")
        if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
            log.warning("the task's tokenizer (%s) has no save_pretrained(); not exported", type(tokenizer).__name__)
            tokenizer = None
        local = os.path.join(tmp, "out")  # save_pretrained writes local files: here first, then each one whole
        files = _save(hf_model, tokenizer, local)
        for name in files:
            _copy_whole(os.path.join(local, *name.split("/")), target, name)
    return HFExport(model_class=type(_unwrapped(hf_model)).__name__, adapter=_is_peft(hf_model),
                    tokenizer=tokenizer is not None, files=files)


def _rebuild(run: Storage, task_dir: str) -> dict[str, Any]:
    """The task's parts as `resume` builds them: stored config, task snapshot, seeded RNGs."""
    from resilient_train.config import resolve
    from resilient_train.run.folder import RunFolder
    from resilient_train.seeding import seed_everything
    from resilient_train.task import load_task

    folder = RunFolder(run)
    cfg = resolve(folder.read_config_layer(), {"run_dir": run.url})
    os.makedirs(task_dir, exist_ok=True)
    task = load_task(folder.task_entry(local_dir=task_dir))
    seed_everything(cfg.seed)
    try:
        with warnings.catch_warnings():
            # peft asks transformers 5.x for the deprecated `is_gradient_checkpointing`: noise here
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
            return task.build(cfg.to_dictconfig())
    except ModuleNotFoundError as exc:
        hint = f" ({INSTALL_HINT} installs transformers and peft)" if exc.name in ("transformers", "peft") else ""
        raise UsageError(f"rebuilding the run's model for export needs the {exc.name} package{hint}") from None


def _hf_classes() -> tuple[type, ...]:
    """PreTrainedModel, and PeftModel when the task imported peft (it must have, to build one)."""
    from transformers import PreTrainedModel

    classes: list[type] = [PreTrainedModel]
    peft = sys.modules.get("peft")
    if peft is not None and hasattr(peft, "PeftModel"):
        classes.insert(0, peft.PeftModel)
    return tuple(classes)


def _hf_model(model: Any) -> Any:
    """The outermost Hugging Face (or PEFT) model in `model`: the model itself or one it wraps."""
    classes = _hf_classes()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"export --format hf: the task's model is a {type(model).__name__}, not a torch module")
    found: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, classes) and not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            found.append((name, module))
    if not found:
        raise UsageError(
            f"export --format hf: the task's model ({type(model).__name__}) is not a Hugging Face model "
            "(a transformers PreTrainedModel or a peft PeftModel) and holds none; export its weights with --format safetensors"
        )
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise UsageError(f"export --format hf: the task's model holds {len(found)} Hugging Face models ({names}); "
                         "export needs exactly one (or use --format safetensors)")
    return found[0][1]


def _is_peft(model: Any) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _unwrapped(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (for the message), the model itself otherwise."""
    if _is_peft(model):
        return model.get_base_model()
    return model


def _save(model: Any, tokenizer: Optional[Any], folder: str) -> list[str]:
    """`save_pretrained` the model (a PEFT model writes its adapter alone) and the tokenizer.

    Returns the files written, as slash-separated names relative to `folder`.
    """
    os.makedirs(folder, exist_ok=True)
    with _quiet_progress_bars():
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    names = []
    for root, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/") for f in files]
    return sorted(names)


def _copy_whole(src: str, target: Storage, name: str) -> None:
    """One exported file into `target`, readers seeing all of it or none of it.

    A local target gets a copy under a temporary name then `os.replace` (no file read into
    memory: model weights may be large); a remote one a single whole-object write.
    """
    parts = name.split("/")
    dst = target.local_path(*parts)
    if dst is None:
        with open(src, "rb") as f:
            target.write_bytes(f.read(), *parts)
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    staging = f"{dst}.export-{os.getpid()}.tmp"
    try:
        shutil.copyfile(src, staging)
        os.replace(staging, dst)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """transformers draws a bar per shard written; a one-line command does not need them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
