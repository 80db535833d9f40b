"""`ls RUN`: a run's checkpoints (step, status, size, time, metrics), as a table or JSON. Torch-free."""

from __future__ import annotations

import argparse
import json

NAME = "ls"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="list a run's checkpoints",
                       description="List RUN's checkpoints: step, status (committed / incomplete / corrupt), size, time, metrics. "
                                   "SIZE is what each checkpoint wrote; tensors that did not change are stored once per run "
                                   "(checkpoints/shared/) and summed on the last line.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")


def run(args: argparse.Namespace) -> int:
    from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
    from resilient_train.cli.commands._shared import require_run, size

    infos = CheckpointManager(require_run(args.run)).list()
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
        print(f"{info.step:>10}  {info.status:<10}  {size(info.bytes):>10}  {info.created_at or '-':<20}  {extra}")
    shared = {name: record.get("bytes", 0) for info in infos for name, record in (info.manifest or {}).get("shared", {}).items()}
    if shared:  # SIZE above is what each checkpoint wrote; what did not change is stored once, here
        print(f"shared: {len(shared)} file(s), {size(sum(shared.values()))}, stored once and referenced by the checkpoints above")
    return 0
