"""Is a run folder whole enough to resume? The task snapshot against task.json, and half copies.

A resume runs the task file the run folder holds, so that file must be the one the run recorded:
`task/task.json` keeps the sha256 of each snapshotted file, and a file that no longer matches
(overwritten by an export through a symlink, edited by hand) is refused in one line saying how to
restore it, instead of running something else or failing somewhere inside the import.

A copy made by `sync` or the mirror is written like a new run (task snapshot first, `run.yaml`
last), but copies made by older versions, or a folder whose copy was cut short, can lack the
snapshot's files or `run.yaml`: those are told apart here, so resume says to run `sync` again.

This module imports no torch.
"""

from __future__ import annotations

import hashlib
from typing import Any

from resilient_train.errors import NotFoundError, UsageError
from resilient_train.storage import Storage

TASK_DIR = "task"
CHECKPOINTS = "checkpoints"


def _sync_again(url: str) -> str:
    return f"a copy (sync or the mirror) into it was cut short; run `sync SRC {url}` again from the run's other copy"


def check_snapshot(storage: Storage, meta: dict[str, Any]) -> None:
    """NotFoundError when a file task.json names is missing (a half copy), UsageError (exit 2) when
    one differs from the sha256 task.json records."""
    sha = meta.get("sha256")
    recorded: dict[str, Any] = sha if isinstance(sha, dict) else {}
    for name in [meta["entry"], *meta.get("assets", [])]:
        try:
            data = storage.read_bytes(TASK_DIR, *name.split("/"))
        except FileNotFoundError:
            raise NotFoundError(f"run '{storage.url}' has an incomplete task snapshot (task/{name} is missing): "
                                f"{_sync_again(storage.url)}") from None
        want = recorded.get(name)
        if isinstance(want, str) and hashlib.sha256(data).hexdigest() != want:
            raise UsageError(f"run '{storage.url}': its task snapshot task/{name} was modified (its sha256 is not the one "
                             f"task/task.json records); restore it by copying the original task file there, or run "
                             f"`run TASK --run-dir {storage.url}` with it (that resumes and snapshots it again)")


def half_copied_snapshot(storage: Storage) -> bool:
    """task/ holds files but no task.json: a snapshot whose copy stopped before task.json."""
    try:
        return bool(storage.list_dir(TASK_DIR))
    except FileNotFoundError:
        return False


def refuse_half_copy_without_run_yaml(storage: Storage) -> None:
    """A folder with checkpoints but no run.yaml: a run is born with run.yaml before any checkpoint,
    so this is a copy cut short (NotFoundError saying to sync again); otherwise nothing."""
    try:
        entries = storage.list_dir(CHECKPOINTS)
    except FileNotFoundError:
        return
    if any(entry.get("basename", "").startswith("step-") for entry in entries):
        raise NotFoundError(f"'{storage.url}' holds checkpoints but no run.yaml: {_sync_again(storage.url)}")
