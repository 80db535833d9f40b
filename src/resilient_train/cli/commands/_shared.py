"""Helpers several commands share: finding a run, resolving a checkpoint target, sizes, reports.

Imported by the commands' `run` functions, never at parse time: it pulls in the storage and
checkpoint layers (fsspec), which a usage error should not pay for. Torch-free, so `ls`, `verify`
and `sync` stay torch-free.
"""

from __future__ import annotations

import posixpath
import sys
from typing import Any, Optional

from resilient_train.checkpoint.manager import CheckpointInfo, CheckpointManager
from resilient_train.checkpoint.manifest import MANIFEST, parse_step_dir
from resilient_train.errors import NotFoundError, ResilientTrainError
from resilient_train.storage import Storage


class VerificationFailed(ResilientTrainError):
    """`verify` found files that do not match their manifest (exit 1)."""


def require_run(url: str) -> Storage:
    """The run at `url`; NotFoundError (exit 3) when it holds neither run.yaml nor checkpoints/."""
    storage = Storage(url)
    if not (storage.exists("run.yaml") or storage.exists("checkpoints")):
        raise NotFoundError(f"no run at '{url}' (neither run.yaml nor checkpoints/)")
    return storage


def resolve_checkpoint(target: str) -> tuple[CheckpointManager, Optional[CheckpointInfo]]:
    """TARGET as a checkpoint folder (`.../checkpoints/step-N`) or a run (its newest valid one)."""
    trimmed = target.rstrip("/")
    step = parse_step_dir(posixpath.basename(trimmed))
    if step is not None:
        run_url = posixpath.dirname(posixpath.dirname(trimmed))
        manager = CheckpointManager(Storage(run_url))
        if not manager.root.exists(posixpath.basename(trimmed), MANIFEST):
            raise NotFoundError(f"'{target}' is not a committed checkpoint (no manifest.json)")
        return manager, manager.info(step)
    manager = CheckpointManager(require_run(target))
    return manager, None


def size(n: float) -> str:
    """Bytes as a short human size: 812 B, 3.4 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def report_done(result: Any) -> None:
    """The one `done:` line of `run` and `resume`, said by global rank 0 only."""
    if result.rank != 0:
        return
    loss = f"{result.loss:.4f}" if result.loss is not None else "n/a"
    print(f"done: step {result.step}, loss {loss}, checkpoint {result.checkpoint}", file=sys.stderr)
