"""One function per CLI command; each returns an exit code or raises an error with one."""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from typing import Any

from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
from resilient_train.checkpoint.manifest import MANIFEST, parse_step_dir
from resilient_train.errors import NotFoundError, ResilientTrainError
from resilient_train.storage import Storage

# torch is imported only by the commands that need it (run, resume, export, inspect's config,
# env, plot): `ls`, `verify` and `sync` answer without paying for it.


class VerificationFailed(ResilientTrainError):
    """`verify` found files that do not match their manifest (exit 1)."""


def _report(result: Any) -> None:
    if result.rank != 0:
        return
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    print(f"done: step {result.step}, loss {loss}, checkpoint {result.checkpoint}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from resilient_train.api import run_task

    _report(run_task(args.task, run_dir=args.run_dir, config=args.config, overrides=args.overrides,
                     allow_change=args.allow_change))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from resilient_train.api import resume_run

    _report(resume_run(args.run, overrides=args.overrides, allow_change=args.allow_change))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from resilient_train.config import load_yaml_layer, parse_overrides
    from resilient_train.config_report import render, sourced_values
    from resilient_train.task import load_task

    layers: list[tuple[str, Any]] = [("task CONFIG", load_task(args.task).defaults)]
    if args.config:
        layers.append((f"--config {args.config}", load_yaml_layer(args.config)))
    layers.append(("KEY=VALUE", parse_overrides(args.overrides)))
    if args.run_dir:
        layers.append(("--run-dir", {"run_dir": args.run_dir}))
    print(render(sourced_values(layers)))
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
    if args.format == "hf":
        return _export_hf(args)
    from resilient_train.checkpoint import tensorfile
    from resilient_train.run_folder import refuse_run_owned_target

    refuse_run_owned_target(args.out)  # never over run.yaml or into a checkpoint it exports from
    _, step, model = _load_weights(args.target)
    seen: dict[int, str] = {}
    tensors = {}
    for key, tensor in model.items():  # tied weights become independent copies, as safetensors requires
        tensors[key] = tensor.clone() if id(tensor) in seen else tensor
        seen[id(tensor)] = key
    out_dir, out_name = posixpath.split(args.out)
    # our own safetensors writer: the safetensors package imports numpy to save, and a plain
    # install (a minimal image, a CI container) may have no numpy
    chunks = tensorfile.serialize(tensors, metadata={"step": str(step)})
    Storage(out_dir or ".").write_bytes(list(chunks.chunks), out_name)
    print(f"exported {len(tensors)} tensors from step {step} to {args.out}", file=sys.stderr)
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from resilient_train.export_hf import check_target, export_hf, require_transformers

    require_transformers()  # before any checkpoint is read
    check_target(args.out)
    manager, step, model = _load_weights(args.target)
    done = export_hf(manager.run, model, args.out)
    what = f"{done.model_class} adapter (PEFT)" if done.adapter else done.model_class
    print(f"exported {what} from step {step} to {args.out}: {', '.join(done.files)}", file=sys.stderr)
    return 0


def _load_weights(target: str) -> tuple[CheckpointManager, int, Any]:
    """The model weights of TARGET (a checkpoint folder, or a run's newest valid checkpoint) and their step."""
    from resilient_train.checkpoint import format as fmt
    from resilient_train.checkpoint.manager import load_newest_valid

    manager, info = _resolve_checkpoint(target)
    wanted = {fmt.MODEL_FILE, fmt.STATE_JSON}
    if info is not None:  # one checkpoint named: its defects are the answer
        loaded = manager.load(info, wanted)
        model = fmt.decode_model(loaded.files)
    else:  # a run: the newest checkpoint whose weights decode
        found = load_newest_valid([manager], wanted, decode=lambda c: fmt.decode_model(c.files))
        if found is None:
            raise NotFoundError(f"no valid checkpoint in '{target}'")
        _, loaded, model = found
    return manager, loaded.info.step, model


def _size(n: float) -> str:
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

    from resilient_train.checkpoint.transfer import sync_run

    src, dst = _require_run(args.src), Storage(args.dst)
    bars: list[Any] = []

    def on_total(total: int) -> Any:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="sync", disable=total == 0, file=sys.stderr)
        bars.append(bar)
        return bar.update

    try:
        report = sync_run(src, dst, force=args.force, on_total=on_total)
    finally:
        for bar in bars:
            bar.close()
    for step, why in report.not_committed:
        print(f"step {step}: {why}", file=sys.stderr)
    for step in report.vanished:
        print(f"step {step}: pruned at the source during the copy, skipped", file=sys.stderr)
    for step, why in report.conflicts:
        print(f"step {step}: not copied: {why}", file=sys.stderr)
    for step, why in report.corrupt:
        print(f"step {step}: not copied: {why}", file=sys.stderr)
    if report.older:
        print(f"steps {report.older}: older than the destination's newest checkpoint, not copied (its retention decides)", file=sys.stderr)
    print(
        f"synced {args.src} -> {args.dst}: {len(report.copied)} checkpoint(s) copied ({_size(report.bytes)}) and verified, "
        f"{report.present} already there, {len(report.not_committed)} not committed"
        + (f", {len(report.corrupt)} corrupt at the source" if report.corrupt else "")
        + (f", {len(report.vanished)} pruned during the copy" if report.vanished else "")
        + (f", {len(report.conflicts)} conflicting" if report.conflicts else "")
        + f"; {report.run_files} run file(s)",
        file=sys.stderr,
    )
    if report.corrupt:
        steps = [step for step, _ in report.corrupt]
        raise VerificationFailed(f"checkpoint(s) at step(s) {steps} are corrupt at the source and were not copied; the others were")
    if report.conflicts:
        steps = [step for step, _ in report.conflicts]
        raise VerificationFailed(f"the destination holds different checkpoint(s) at step(s) {steps}; they were left as they are")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from resilient_train.run_folder import RunFolder

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
        print(f"  written on: {_machine(ck['environment'])}, torch {ck['environment'].get('torch')}, "
              f"python {ck['environment'].get('python')}")
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


def _machine(env: Any) -> str:
    """"NVIDIA L4 (host)" from an environment record; tolerant of damaged or foreign records."""
    env = env if isinstance(env, dict) else {}
    gpus = env.get("gpus") if isinstance(env.get("gpus"), list) else []
    names = [str(g.get("name", "?")) if isinstance(g, dict) else "?" for g in gpus]
    return f"{', '.join(names) if names else 'CPU'} ({env.get('host', '?')})"


def cmd_check_resume(args: argparse.Namespace) -> int:
    from resilient_train.check_resume import check_resume

    return check_resume(args.task, overrides=args.overrides, steps=args.steps, config=args.config, keep=args.keep,
                        debug=args.debug)
