"""`inspect TARGET`: a run's or checkpoint's metadata: step, config, sessions, environment, precision."""

from __future__ import annotations

import argparse
import json
from typing import Any

NAME = "inspect"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="show a run's or checkpoint's metadata",
                       description="Show TARGET's metadata: step, config, sessions, the environment each checkpoint was written in, "
                                   "precision, world size.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    report = _gather(args.target)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"run: {report['run']}")
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
    if "bytes" in ck:
        print(f"  bytes: {ck['bytes']} written by this checkpoint, {ck.get('shared_bytes', 0)} in shared files it references")
    if ck.get("metrics"):
        print("  metrics: " + " ".join(f"{k}={v:.4g}" for k, v in ck["metrics"].items()))
    if ck.get("environment"):
        print(f"  written on: {_machine(ck['environment'])}, torch {ck['environment'].get('torch')}, "
              f"python {ck['environment'].get('python')}")
    return 0


def _gather(target: str) -> dict[str, Any]:
    """TARGET's report: run URL, stored config, sessions, checkpoints, and the chosen checkpoint's manifest."""
    from resilient_train.checkpoint.manager import COMMITTED
    from resilient_train.cli.commands._shared import resolve_checkpoint
    from resilient_train.run.folder import RunFolder

    manager, info = resolve_checkpoint(target)
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
        report["checkpoint"] = {"path": chosen.path, "status": chosen.status, "reason": chosen.reason, **(chosen.manifest or {}),
                                "bytes": chosen.bytes, "shared_bytes": chosen.shared_bytes}
    return report


def _machine(env: Any) -> str:
    """"NVIDIA L4 (host)" from an environment record; tolerant of damaged or foreign records."""
    env = env if isinstance(env, dict) else {}
    gpus = env.get("gpus") if isinstance(env.get("gpus"), list) else []
    names = [str(g.get("name", "?")) if isinstance(g, dict) else "?" for g in gpus]
    return f"{', '.join(names) if names else 'CPU'} ({env.get('host', '?')})"
