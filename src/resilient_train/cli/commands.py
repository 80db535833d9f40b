"""One function per CLI command; each returns an exit code or raises an error with one."""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from typing import Any

from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.manager import COMMITTED
from resilient_train.checkpoint.manifest import MANIFEST, parse_step_dir
from resilient_train.api import resume_run, run_task
from resilient_train.errors import CheckpointError, NotFoundError, ResilientTrainError


class VerificationFailed(ResilientTrainError):
    """`verify` found files that do not match their manifest (exit 1)."""
from resilient_train.run_folder import RunFolder
from resilient_train.storage import Storage


def _report(result: Any) -> None:
    if result.rank != 0:
        return
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    print(f"done: step {result.step}, loss {loss}, checkpoint {result.checkpoint}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    _report(run_task(args.task, run_dir=args.run_dir, config=args.config, overrides=args.overrides))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _report(resume_run(args.run, overrides=args.overrides))
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


def cmd_verify(args: argparse.Namespace) -> int:
    manager, info = _resolve_checkpoint(args.target)
    infos = [info] if info is not None else manager.list()
    if not infos:
        raise NotFoundError(f"no checkpoints in '{args.target}'")
    broken: list[str] = []
    for item in infos:
        if item.status == "incomplete" and info is None:
            print(f"step {item.step}: incomplete, not verified ({item.reason})")
            continue
        problems = manager.verify(item)
        print(f"step {item.step}: " + ("ok" if not problems else "BROKEN"))
        for problem in problems:
            print(f"  {problem}")
        broken += problems
    if broken:
        names = ", ".join(p.split(":")[0] for p in broken)
        raise VerificationFailed(f"{len(broken)} file(s) failed verification: {names}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from resilient_train.checkpoint.transfer import copy_checkpoint, copy_run_files, same_checkpoint

    src, dst = _require_run(args.src), Storage(args.dst)
    source, target = CheckpointManager(src), CheckpointManager(dst)
    present = {i.step: i for i in target.list()}
    todo, skipped, ignored = [], 0, 0
    for info in source.list():
        if info.status != COMMITTED:
            ignored += 1
            print(f"step {info.step}: {info.status}, not copied ({info.reason})", file=sys.stderr)
        elif info.step in present and same_checkpoint(info, present[info.step]):
            skipped += 1
        else:
            todo.append(info)
    files = copy_run_files(src, dst)
    total = sum(r["bytes"] for i in todo for r in (i.manifest or {}).get("files", {}).values())
    copied, done, broken = 0, 0, []
    with tqdm(total=total, unit="B", unit_scale=True, desc="sync", disable=not todo) as bar:
        for info in todo:  # oldest first: an interrupted sync leaves a usable prefix
            try:
                copied += copy_checkpoint(source, target, info, on_bytes=bar.update)
                done += 1
            except CheckpointError as exc:  # a corrupt source checkpoint: say so, copy the rest
                broken.append(info.step)
                print(f"step {info.step}: not copied: {exc}", file=sys.stderr)
    print(
        f"synced {args.src} -> {args.dst}: {done} checkpoint(s) copied ({_size(copied)}) and verified, "
        f"{skipped} already there, {ignored} not committed" + (f", {len(broken)} corrupt at the source" if broken else "")
        + f"; {files} run file(s)",
        file=sys.stderr,
    )
    if broken:
        raise VerificationFailed(f"checkpoint(s) at step(s) {broken} are corrupt at the source and were not copied; the others were")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    manager, info = _resolve_checkpoint(args.target)
    run = manager.run
    folder = RunFolder(run)
    report: dict[str, Any] = {"run": run.url}
    if folder.has_run():
        report["config"] = folder.read_config_layer_dict()
    report["sessions"] = folder.sessions()
    infos = manager.list()
    chosen = info or next((i for i in reversed(infos) if i.status == COMMITTED), None)
    report["checkpoints"] = [{"step": i.step, "status": i.status} for i in infos]
    if chosen is not None:
        report["checkpoint"] = {"path": chosen.path, "status": chosen.status, "reason": chosen.reason, **(chosen.manifest or {})}
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"run: {run.url}")
    for s in report["sessions"]:
        print(f"  session {s.get('session')}: from step {s.get('start_step')}, {s.get('started_at')}, "
              f"world size {s.get('world_size')}, {s.get('precision')}, {_machine(s.get('environment', {}))}")
    ck = report.get("checkpoint")
    if ck is None:
        print("no committed checkpoint")
        return 0
    print(f"checkpoint: {ck['path']} ({ck['status']})")
    for key in ("step", "epoch", "cursor", "samples_seen", "world_size", "precision", "config_hash", "created_at"):
        if key in ck:
            print(f"  {key}: {ck[key]}")
    if ck.get("metrics"):
        print("  metrics: " + " ".join(f"{k}={v:.4g}" for k, v in ck["metrics"].items()))
    if ck.get("environment"):
        print(f"  written on: {_machine(ck['environment'])}, torch {ck['environment'].get('torch')}, python {ck['environment'].get('python')}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from resilient_train.plot import plot_run

    _require_run(args.run)
    history = plot_run(args.run, args.out)
    print(f"wrote {args.out}: {len(history.loss)} steps, {len(history.sessions)} session(s)", file=sys.stderr)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from resilient_train.env import fingerprint
    from resilient_train.runtime import auto_precision

    info = {**fingerprint(), "precision_auto": auto_precision()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "gpus":
            value = "; ".join(f"{g['name']} ({g['memory_gib']} GiB, capability {g['capability']})" for g in value) or "none"
        print(f"{key:>16}: {value}")
    return 0


def _machine(env: dict[str, Any]) -> str:
    gpus = env.get("gpus") or []
    device = ", ".join(g.get("name", "?") for g in gpus) if gpus else "CPU"
    return f"{device} ({env.get('host', '?')})"
