"""The run folder: `run.yaml`, the task snapshot, the run's id, the session record, the checkpoints.

    RUN/
      run.yaml          resolved config (no secrets); written LAST when a run is born: its commit
      run.json          {"run_id": uuid hex, "created_at": ...}: which run this is (sync and the
                        mirror use it to refuse merging two different runs); written once, when
                        the run is born (runs older than run ids get none: a copy made before
                        an id was added would otherwise get another id than its source)
      task/             snapshot of the task source (+ ASSETS) and task.json naming the entry file,
                        its origin and the sha256 of each snapshotted file
      sessions.json     one record per session (start step, environment): the run's history
      lease.json        who may write the run now (checkpoint/lease.py)
      checkpoints/      see checkpoint/
      logs/             metrics.csv (+ tensorboard/)

Why the order matters. A run exists when `run.yaml` exists. A new run is written task snapshot
first, then `run.json`, then `run.yaml`, each file whole (storage.py), so a crash at any moment
leaves either a complete run or a folder without `run.yaml`: debris that `run TASK --run-dir`
overwrites as a fresh run and that `resume` refuses (exit 3) naming that command.

Bookkeeping never blocks a resume. For an existing run, `run` refuses up front (exit 2, before
anything is written) a task whose entry file name (or module name) differs from the recorded one;
the same task edited is accepted. Its snapshot and `run.yaml` are replaced only by `refresh`, which
the trainer calls after the checkpoint was restored, so a task or config that does not fit the
checkpoint leaves the stored ones as they were. A damaged `sessions.json` is reported in one line
and rebuilt (the damaged bytes kept in `sessions.json.bak`); a damaged `task/task.json` is treated
as no record (and replaced at the next refresh).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid
from typing import Any, Optional, cast

from resilient_train.config import RunConfig, load_run_yaml, resolve
from resilient_train.errors import NotFoundError, UsageError
from resilient_train.run.integrity import check_snapshot, half_copied_snapshot, refuse_half_copy_without_run_yaml
from resilient_train.run.jsonfiles import DAMAGED, read_json, utc_now
from resilient_train.run.sessions import SessionLog, SessionRecord
from resilient_train.storage import Storage
from resilient_train.task import Task

log = logging.getLogger(__name__)

RUN_YAML = "run.yaml"
RUN_JSON = "run.json"
TASK_DIR = "task"
TASK_JSON = "task.json"


class RunFolder:
    """Reads and writes the bookkeeping files of one run."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.session_log = SessionLog(storage)

    @classmethod
    def at(cls, url: str) -> "RunFolder":
        return cls(Storage(url))

    def has_run(self) -> bool:
        """Whether a run was born here (`run.yaml` is its commit marker)."""
        return self.storage.exists(RUN_YAML)

    # -- birth and refresh ---------------------------------------------------------------------
    def prepare(self, cfg: RunConfig, task: Optional[Task]) -> bool:
        """Before training: create the run whole if there is none; returns True when it did.

        An existing run is only checked (another task is refused with a UsageError); nothing of
        it is written until `refresh`, after its checkpoint was restored.
        """
        if self.has_run():
            self.check_task(task)
            return False
        self.create(cfg, task)
        return True

    def create(self, cfg: RunConfig, task: Optional[Task]) -> None:
        """Write a new run: debris of an unborn one removed, task snapshot, run.json, run.yaml last."""
        if task is not None and task.source is not None:
            self.storage.remove(TASK_DIR, recursive=True)  # no run.yaml: whatever is there is debris
            self.snapshot_task(task)
        self._write_run_id()
        self.write_config(cfg)

    def refresh(self, cfg: RunConfig, task: Optional[Task]) -> None:
        """After the checkpoint was restored: the task snapshot (when it changed), then `run.yaml`."""
        if task is not None and task.source is not None and self._task_changed(task):
            self.snapshot_task(task)
        self.write_config(cfg)

    def run_id(self) -> Optional[str]:
        """The id written when the run was born (None for runs older than run ids, or unreadable)."""
        record = self._read_json(RUN_JSON)
        run_id = record.get("run_id") if isinstance(record, dict) else None
        if record is not None and record is not DAMAGED and run_id is None:
            log.warning("%s is damaged (no run_id); ignoring it", self.storage.display(RUN_JSON))
        return run_id if isinstance(run_id, str) and run_id else None

    def _write_run_id(self) -> None:
        record = {"run_id": uuid.uuid4().hex, "created_at": utc_now()}
        self.storage.write_text(json.dumps(record, indent=2), RUN_JSON)

    # -- config --------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        self.storage.write_text(cfg.to_yaml(), RUN_YAML)

    def read_config_layer(self) -> Any:
        if not self.has_run():
            refuse_half_copy_without_run_yaml(self.storage)
            raise NotFoundError(f"no run at '{self.storage.url}' (no run.yaml); start one with `run TASK --run-dir {self.storage.url}`")
        return load_run_yaml(self.storage.read_text(RUN_YAML))

    def read_config_layer_dict(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        return cast("dict[str, Any]", OmegaConf.to_container(self.read_config_layer(), resolve=False))  # a DictConfig gives a dict

    def read_config(self) -> RunConfig:
        return resolve(self.read_config_layer())

    # -- task snapshot -------------------------------------------------------------------------
    def snapshot_task(self, task: Task) -> None:
        """Copy the task file and its ASSETS so `resume` needs nothing but this folder.

        task.json is written after the files it names, so it never points at a missing file.
        """
        if task.source is None:
            return
        files = _task_files(task)
        for name, data in files.items():
            self.storage.write_bytes(data, TASK_DIR, *name.split("/"))
        meta = {
            "entry": os.path.basename(task.source),
            "origin": task.name,
            "assets": task.assets,
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        }
        self.storage.write_text(json.dumps(meta, indent=2), TASK_DIR, TASK_JSON)

    def task_meta(self) -> Optional[dict[str, Any]]:
        """task/task.json, or None when absent or damaged (said in one warning line)."""
        meta = self._read_json(TASK_DIR, TASK_JSON)
        if meta is None or meta is DAMAGED:
            return None
        entry = meta.get("entry") if isinstance(meta, dict) else None
        assets = meta.get("assets", []) if isinstance(meta, dict) else None
        if not (isinstance(entry, str) and _safe_name(entry) and isinstance(assets, list)
                and all(isinstance(a, str) and _safe_name(a) for a in assets)):
            log.warning("%s is damaged (not a task record); ignoring it", self.storage.display(TASK_DIR, TASK_JSON))
            return None
        return meta

    def check_task(self, task: Optional[Task]) -> None:
        """Refuse to train `task` here when the run holds another task (UsageError, exit 2).

        Same entry file name (and, for tasks given as modules, the same module) is the same task:
        an edited task file is accepted and its snapshot refreshed after the restore.
        """
        if task is None or task.source is None:
            return
        recorded = self.task_meta()
        if recorded is None:
            return
        entry = os.path.basename(task.source)
        origin = recorded.get("origin")
        same = recorded["entry"] == entry
        if same and isinstance(origin, str) and _is_module_name(origin) and _is_module_name(task.name):
            same = origin == task.name
        if not same:
            held = origin if isinstance(origin, str) and _is_module_name(origin) else recorded["entry"]
            new = task.name if _is_module_name(task.name) else entry
            url = self.storage.url
            raise UsageError(
                f"run folder '{url}' holds a run of task {held}, not {new}; pass --run-dir with another folder "
                f"to start a run of {new} (or `resume {url}` to continue {held})"
            )

    def _task_changed(self, task: Task) -> bool:
        recorded = self.task_meta()
        if recorded is None or not isinstance(recorded.get("sha256"), dict):
            return True
        if recorded["entry"] != os.path.basename(task.source or ""):
            return True
        now = {name: hashlib.sha256(data).hexdigest() for name, data in _task_files(task).items()}
        return now != recorded["sha256"]

    def task_entry(self, local_dir: Optional[str] = None) -> str:
        """Path of the snapshotted task file, copied to `local_dir` first when the run is remote."""
        if not self.storage.exists(TASK_DIR, TASK_JSON):
            if half_copied_snapshot(self.storage):
                raise NotFoundError(f"run '{self.storage.url}' has task files but no task/task.json: a copy (sync or the "
                                    f"mirror) into it was cut short; run `sync SRC {self.storage.url}` again")
            raise NotFoundError(f"run '{self.storage.url}' has no task snapshot (task/task.json): a script that calls "
                                "Trainer made it; run the same script again (Trainer.fit resumes by itself)")
        meta = self.task_meta()
        if meta is None:
            raise NotFoundError(f"run '{self.storage.url}' has a damaged task snapshot (task/task.json); "
                                f"run it with `run TASK --run-dir {self.storage.url}` instead")
        check_snapshot(self.storage, meta)  # missing (a half copy) or modified: refused in one line
        local = self.storage.local_path(TASK_DIR, meta["entry"])
        if local is not None:
            return local
        if local_dir is None:
            raise UsageError("a remote run's task must be copied to a local folder first")
        for name in [meta["entry"], *meta.get("assets", [])]:
            dst = os.path.join(local_dir, *name.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(self.storage.read_bytes(TASK_DIR, *name.split("/")))
        return os.path.join(local_dir, meta["entry"])

    # -- sessions (run/sessions.py) ------------------------------------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        return self.session_log.records_json()

    def session_records(self) -> list[SessionRecord]:
        return self.session_log.records()

    def start_session(self, start_step: int, info: dict[str, Any]) -> int:
        return self.session_log.start(start_step, info)

    def _read_json(self, *parts: str) -> Any:
        return read_json(self.storage, *parts)


def _task_files(task: Task) -> dict[str, bytes]:
    """The entry file and the ASSETS of a task, by snapshot name, read from the task's folder."""
    if task.source is None:
        raise UsageError("this task has no source file to snapshot; give `run` a task file (see docs/cli.md#run)")
    folder = os.path.dirname(task.source)
    with open(task.source, "rb") as f:
        files = {os.path.basename(task.source): f.read()}
    for asset in task.assets:
        src = os.path.join(folder, asset)
        if not os.path.isfile(src):
            raise UsageError(f"task asset '{asset}' not found next to {task.source}")
        with open(src, "rb") as f:
            files[asset] = f.read()
    return files


def _is_module_name(name: str) -> bool:
    """A task given as `package.module` (not a path to a .py file)."""
    return not name.endswith(".py") and "/" not in name and os.sep not in name


def _safe_name(name: str) -> bool:
    """A relative path inside task/ (task.json may come from a shared folder)."""
    norm = posixpath.normpath(name)
    return bool(name) and not name.startswith("/") and not norm.startswith("..") and "\\" not in name and "\x00" not in name
