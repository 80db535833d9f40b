"""Where an export may write: never over the names a run folder keeps, nor inside a checkpoint.

Above both `run/` and `checkpoint/` (it needs the names of each), used by both export formats.
"""

from __future__ import annotations

import os
import posixpath
from typing import cast

from resilient_train.checkpoint.manifest import MANIFEST
from resilient_train.errors import UsageError
from resilient_train.run.folder import RUN_JSON, RUN_YAML, TASK_DIR
from resilient_train.run.sessions import SESSIONS, SESSIONS_BACKUP
from resilient_train.storage import Storage

# lease.json: checkpoint/lease.py; micro_batch.json: microbatch.py
RUN_OWNED = frozenset({RUN_YAML, RUN_JSON, TASK_DIR, SESSIONS, SESSIONS_BACKUP, "lease.json", "micro_batch.json",
                       "checkpoints", "logs"})


def refuse_run_owned_target(out: str) -> None:
    """Refuse (UsageError, before anything is written) an output path that is a run's own file or
    folder, or lies inside a checkpoint: `export RUN RUN/run.yaml` or into `checkpoints/step-N/`
    would destroy what it exports from. A new name at a run folder's top level
    (`RUN/model.safetensors`, `RUN/hf/`) is fine.

    Walks from `out` up to the filesystem root looking for `manifest.json` (a checkpoint) and
    `run.yaml` (a run), stopping at the first run: two `exists` calls per level. A local path is
    walked as given and as its symlinks resolve (os.path.realpath): `link/task.py`, with `link`
    pointing at `RUN/task`, writes into the run as surely as `RUN/task/task.py`.
    """
    target = Storage(out)
    local = target.local_path()
    if local is not None and os.path.realpath(local) != os.path.abspath(local):
        _refuse_at(Storage(os.path.realpath(local)), out)
    _refuse_at(target, out)


def _refuse_at(target: Storage, out: str) -> None:
    """refuse_run_owned_target's walk from `target`'s root (messages name `out`, as typed)."""
    current, below = target.root, cast(list[str], [])  # folder names from the target up to `current`
    shown = target.url_of
    while True:
        if target.fs.exists(posixpath.join(current, MANIFEST)):
            raise UsageError(f"'{out}' is inside the checkpoint '{shown(current)}'; "
                             "export to a path outside the run's checkpoints")
        if target.fs.exists(posixpath.join(current, RUN_YAML)):
            if not below or below[-1] in RUN_OWNED:
                owned = below[-1] if below else "the run folder itself"
                raise UsageError(f"'{out}' would write into the run's own files ({owned}); export to a new name "
                                 f"in the run folder (e.g. {shown(current)}/export/) or elsewhere")
            return
        parent = posixpath.dirname(current)
        if parent == current or not parent:
            return
        below.append(posixpath.basename(current))
        current = parent
