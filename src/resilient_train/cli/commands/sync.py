"""`sync SRC DST`: copy a run between storages, each file verified where it arrives. Torch-free."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resilient_train.checkpoint.transfer import SyncReport

NAME = "sync"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="copy a run between storages, verifying what arrives",
                       description="Copy run SRC to DST (e.g. Drive to local disk, local disk to gs://): config, task snapshot, logs and "
                                   "every committed checkpoint, each file verified at DST and committed there with the manifest last. A "
                                   "checkpoint DST already holds is never overwritten; a DST that has moved past SRC, or holds a different "
                                   "run, is refused.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--force", action="store_true",
                   help="replace DST's config, sessions and logs even when DST has moved past SRC "
                        "(committed checkpoints are never overwritten)")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from resilient_train.checkpoint.transfer import sync_run
    from resilient_train.cli.commands._shared import VerificationFailed, require_run
    from resilient_train.storage import Storage

    src, dst = require_run(args.src), Storage(args.dst)
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
    _tell(args, report)
    if report.corrupt:
        steps = [step for step, _ in report.corrupt]
        raise VerificationFailed(f"checkpoint(s) at step(s) {steps} are corrupt at the source and were not copied; the others were")
    if report.conflicts:
        steps = [step for step, _ in report.conflicts]
        raise VerificationFailed(f"the destination holds different checkpoint(s) at step(s) {steps}; they were left as they are")
    return 0


def _tell(args: argparse.Namespace, report: SyncReport) -> None:
    """One line per checkpoint not copied, then the summary line, all on stderr."""
    from resilient_train.cli.commands._shared import size

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
        f"synced {args.src} -> {args.dst}: {len(report.copied)} checkpoint(s) copied ({size(report.bytes)}) and verified, "
        f"{report.present} already there, {len(report.not_committed)} not committed"
        + (f", {len(report.corrupt)} corrupt at the source" if report.corrupt else "")
        + (f", {len(report.vanished)} pruned during the copy" if report.vanished else "")
        + (f", {len(report.conflicts)} conflicting" if report.conflicts else "")
        + f"; {report.run_files} run file(s)",
        file=sys.stderr,
    )
