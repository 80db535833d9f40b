"""One function per CLI command; each returns an exit code or raises an error with one."""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import tempfile
from typing import Any

from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.manager import COMMITTED
from resilient_train.checkpoint.manifest import MANIFEST, parse_step_dir
from resilient_train.config import RunConfig, load_yaml_layer, parse_overrides, resolve
from resilient_train.errors import NotFoundError
from resilient_train.run_folder import RunFolder
from resilient_train.seeding import seed_everything
from resilient_train.storage import Storage
from resilient_train.task import Task, load_task


def train_task(task: Task, cfg: RunConfig) -> Any:
    """Run a task: launch, snapshot, seed every RNG from cfg.seed, build, fit."""
    from resilient_train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.prepare_run(task)
    seed_everything(cfg.seed)
    parts = task.build(cfg.to_dictconfig())
    return trainer.fit(**parts)


def _report(result: Any) -> None:
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    print(f"done: step {result.step}, loss {loss}, checkpoint {result.checkpoint}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    task = load_task(args.task)
    layers: list[Any] = [task.defaults]
    if args.config:
        layers.append(load_yaml_layer(args.config))
    layers.append(parse_overrides(args.overrides))
    if args.run_dir:
        layers.append({"run_dir": args.run_dir})
    cfg = resolve(*layers)
    _report(train_task(task, cfg))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    folder = RunFolder.at(args.run)
    stored = folder.read_config_layer()
    cfg = resolve(stored, parse_overrides(args.overrides), {"run_dir": args.run})
    with tempfile.TemporaryDirectory(prefix="resilient_train_task_") as tmp:
        task = load_task(folder.task_entry(local_dir=tmp))
        _report(train_task(task, cfg))
    return 0


def _require_run(url: str) -> Storage:
    storage = Storage(url)
    if not (storage.exists("run.yaml") or storage.exists("checkpoints")):
        raise NotFoundError(f"no run at '{url}' (neither run.yaml nor checkpoints/)")
    return storage


def cmd_ls(args: argparse.Namespace) -> int:
    infos = CheckpointManager(_require_run(args.run)).list()
    if args.json:
        print(json.dumps([info.to_json() for info in infos], indent=2))
        return 0
    if not infos:
        print(f"no checkpoints in {args.run}")
        return 0
    print(f"{'STEP':>10}  {'STATUS':<10}  {'SIZE':>10}  {'CREATED':<20}  METRICS")
    for info in infos:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in info.metrics.items() if isinstance(v, (int, float)))
        extra = metrics if info.status == COMMITTED else (info.reason or "")
        print(f"{info.step:>10}  {info.status:<10}  {_size(info.bytes):>10}  {info.created_at or '-':<20}  {extra}")
    return 0


def _resolve_checkpoint(target: str) -> tuple[CheckpointManager, Any]:
    """TARGET as a checkpoint folder (`.../checkpoints/step-N`) or a run (its newest valid one)."""
    trimmed = target.rstrip("/")
    step = parse_step_dir(posixpath.basename(trimmed))
    if step is not None:
        run_url = posixpath.dirname(posixpath.dirname(trimmed))
        manager = CheckpointManager(Storage(run_url))
        if not manager.root.exists(posixpath.basename(trimmed), MANIFEST):
            raise NotFoundError(f"'{target}' is not a committed checkpoint (no manifest.json)")
        return manager, manager.info(step)
    manager = CheckpointManager(_require_run(target))
    return manager, None


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import save as st_save

    manager, info = _resolve_checkpoint(args.target)
    wanted = {fmt.MODEL_FILE, fmt.STATE_JSON}
    loaded = manager.load(info, wanted) if info is not None else manager.load_latest(wanted)
    if loaded is None:
        raise NotFoundError(f"no valid checkpoint in '{args.target}'")
    model = fmt.decode_model(loaded.files)
    seen: dict[int, str] = {}
    tensors = {}
    for key, tensor in model.items():  # tied weights become independent copies, as safetensors requires
        tensors[key] = tensor.clone() if id(tensor) in seen else tensor
        seen[id(tensor)] = key
    out_dir, out_name = posixpath.split(args.out)
    Storage(out_dir or ".").write_bytes(st_save(tensors, metadata={"step": str(loaded.info.step)}), out_name)
    print(f"exported {len(tensors)} tensors from step {loaded.info.step} to {args.out}", file=sys.stderr)
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
