"""The run folder: `run.yaml`, the task snapshot, the session record, the checkpoints.

    RUN/
      run.yaml          resolved config (no secrets)
      task/             snapshot of the task source (+ ASSETS) and task.json naming the entry file
      sessions.json     one record per session (start step, environment): the run's history
      checkpoints/      see checkpoint/
      logs/             metrics.csv (+ tensorboard/)
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

from resilient_train.config import RunConfig, load_run_yaml, resolve
from resilient_train.errors import NotFoundError, UsageError
from resilient_train.storage import Storage
from resilient_train.task import Task

RUN_YAML = "run.yaml"
TASK_DIR = "task"
TASK_JSON = "task.json"
SESSIONS = "sessions.json"


class RunFolder:
    """Reads and writes the bookkeeping files of one run."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @classmethod
    def at(cls, url: str) -> "RunFolder":
        return cls(Storage(url))

    def has_run(self) -> bool:
        return self.storage.exists(RUN_YAML)

    # -- config --------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        self.storage.write_text(cfg.to_yaml(), RUN_YAML)

    def read_config_layer(self) -> Any:
        if not self.has_run():
            raise NotFoundError(f"no run at '{self.storage.url}' (no run.yaml); start one with `run TASK --run-dir {self.storage.url}`")
        return load_run_yaml(self.storage.read_text(RUN_YAML))

    def read_config_layer_dict(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(self.read_config_layer(), resolve=False)

    def read_config(self) -> RunConfig:
        return resolve(self.read_config_layer())

    # -- task snapshot -------------------------------------------------------------------------
    def snapshot_task(self, task: Task) -> None:
        """Copy the task file and its ASSETS so `resume` needs nothing but this folder."""
        if task.source is None:
            return
        folder = os.path.dirname(task.source)
        entry = os.path.basename(task.source)
        with open(task.source, "rb") as f:
            self.storage.write_bytes(f.read(), TASK_DIR, entry)
        for asset in task.assets:
            src = os.path.join(folder, asset)
            if not os.path.isfile(src):
                raise UsageError(f"task asset '{asset}' not found next to {task.source}")
            with open(src, "rb") as f:
                self.storage.write_bytes(f.read(), TASK_DIR, *asset.split("/"))
        meta = {"entry": entry, "origin": task.name, "assets": task.assets}
        self.storage.write_text(json.dumps(meta, indent=2), TASK_DIR, TASK_JSON)

    def task_entry(self, local_dir: Optional[str] = None) -> str:
        """Path of the snapshotted task file, copied to `local_dir` first when the run is remote."""
        if not self.storage.exists(TASK_DIR, TASK_JSON):
            raise NotFoundError(f"run '{self.storage.url}' has no task snapshot (task/task.json); run it with `run TASK` instead")
        meta = json.loads(self.storage.read_text(TASK_DIR, TASK_JSON))
        if self.storage.is_local:
            return self.storage.path(TASK_DIR, meta["entry"])
        if local_dir is None:
            raise UsageError("a remote run's task must be copied to a local folder first")
        for name in [meta["entry"], *meta.get("assets", [])]:
            dst = os.path.join(local_dir, *name.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(self.storage.read_bytes(TASK_DIR, *name.split("/")))
        return os.path.join(local_dir, meta["entry"])

    # -- sessions ------------------------------------------------------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        if not self.storage.exists(SESSIONS):
            return []
        return json.loads(self.storage.read_text(SESSIONS))

    def start_session(self, start_step: int, info: dict[str, Any]) -> int:
        """Record a new session of this run; returns its number (1 for the first)."""
        sessions = self.sessions()
        number = len(sessions) + 1
        sessions.append({"session": number, "start_step": start_step, "started_at": _now(), **info})
        self.storage.write_text(json.dumps(sessions, indent=2), SESSIONS)
        return number


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
