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
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, cast

from resilient_train.checkpoint.manifest import MANIFEST
from resilient_train.config import RunConfig, load_run_yaml, resolve
from resilient_train.errors import NotFoundError, UsageError
from resilient_train.run_integrity import check_snapshot, half_copied_snapshot, refuse_half_copy_without_run_yaml
from resilient_train.storage import Storage
from resilient_train.task import Task

log = logging.getLogger(__name__)

RUN_YAML = "run.yaml"
RUN_JSON = "run.json"
TASK_DIR = "task"
TASK_JSON = "task.json"
SESSIONS = "sessions.json"
SESSIONS_BACKUP = "sessions.json.bak"
_DAMAGED = object()  # what _read_json returns for a file that is there but does not parse


class RunFolder:
    """Reads and writes the bookkeeping files of one run."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

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
        if record is not None and record is not _DAMAGED and run_id is None:
            log.warning("%s is damaged (no run_id); ignoring it", self.storage.display(RUN_JSON))
        return run_id if isinstance(run_id, str) and run_id else None

    def _write_run_id(self) -> None:
        record = {"run_id": uuid.uuid4().hex, "created_at": _now()}
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
        if meta is None or meta is _DAMAGED:
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

    # -- sessions ------------------------------------------------------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        """The session records; a damaged file is reported in one warning line, never fatal."""
        return self._load_sessions()[0]

    def session_records(self) -> list["SessionRecord"]:
        """The session records, typed: what tools read instead of the log lines a session printed."""
        return [SessionRecord.from_json(record) for record in self.sessions()]

    def start_session(self, start_step: int, info: dict[str, Any]) -> int:
        """Record a new session of this run; returns its number (1 for the first).

        A damaged sessions.json is kept as sessions.json.bak and a fresh list started; the new
        session's number then continues after the highest one in logs/metrics.csv, so plots still
        tell the sessions apart.
        """
        sessions, damaged = self._load_sessions()
        highest = max((s["session"] for s in sessions), default=0)
        if damaged is not None:
            try:
                self.storage.write_bytes(damaged, SESSIONS_BACKUP)
            except Exception as exc:  # the backup is a courtesy; the rebuilt record matters
                log.warning("could not keep the damaged %s as %s (%s: %s)", SESSIONS, SESSIONS_BACKUP, type(exc).__name__, exc)
            highest = max(highest, _highest_logged_session(self.storage))
        number = highest + 1
        sessions.append({"session": number, "start_step": start_step, "started_at": _now(), **info})
        self.storage.write_text(json.dumps(sessions, indent=2), SESSIONS)
        return number

    def _load_sessions(self) -> tuple[list[dict[str, Any]], Optional[bytes]]:
        """(usable records, the raw bytes when the file was damaged)."""
        try:
            raw = self.storage.read_bytes(SESSIONS)
        except FileNotFoundError:
            return [], None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("%s is damaged (%s); ignoring it (rebuilt at the next session)", self.storage.display(SESSIONS), _why(exc))
            return [], raw
        if not isinstance(data, list):
            log.warning("%s is damaged (a %s, not a list); ignoring it (rebuilt at the next session)",
                        self.storage.display(SESSIONS), type(data).__name__)
            return [], raw
        records = [r for r in (_clean_session(item) for item in data) if r is not None]
        if len(records) != len(data):
            log.warning("%s: ignoring %d damaged record(s)", self.storage.display(SESSIONS), len(data) - len(records))
            return records, raw
        return records, None

    # -- helpers -------------------------------------------------------------------------------
    def _read_json(self, *parts: str) -> Any:
        """A small JSON file, None when absent, `_DAMAGED` (said in one warning line) when unreadable."""
        try:
            raw = self.storage.read_bytes(*parts)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("%s is damaged (%s); ignoring it", self.storage.display(*parts), _why(exc))
            return _DAMAGED


@dataclass(frozen=True)
class ResumeLabel:
    """What a resume promised, as the trainer recorded it (portability.ResumeAssessment)."""

    level: str  # bit-exact | sample-exact | approximate
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        """"sample-exact (world size 2 -> 1)": the level with the reasons that say what changed."""
        return f"{self.level} ({'; '.join(self.reasons)})" if self.reasons else self.level


@dataclass(frozen=True)
class SessionRecord:
    """One record of sessions.json with the types its readers rely on.

    `resumed_from` and `resume` are None for a session that started fresh, and also in records
    written before sessions recorded them (`labelled` False): there the exactness is unknown, which
    is not the same as bit-exact.
    """

    session: int
    start_step: Optional[int]
    resumed_from: Optional[int]
    resume: Optional[ResumeLabel]
    labelled: bool  # the record has the `resume` field (None there: no resume happened)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "SessionRecord":
        """From a record `_clean_session` accepted; fields of a wrong type read as absent."""
        resume = record.get("resume")
        return cls(session=record["session"], start_step=_int_or_none(record.get("start_step")),
                   resumed_from=_int_or_none(record.get("resumed_from")), resume=_resume_label(resume),
                   labelled="resume" in record and (resume is None or _resume_label(resume) is not None))


def _int_or_none(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _resume_label(value: Any) -> Optional[ResumeLabel]:
    if not isinstance(value, dict) or not isinstance(value.get("level"), str):
        return None
    reasons = value.get("reasons")
    reasons = reasons if isinstance(reasons, list) else []
    return ResumeLabel(value["level"], tuple(str(r) for r in reasons))


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


def _clean_session(item: Any) -> Optional[dict[str, Any]]:
    """A session record with the types readers rely on, or None when it is not one."""
    if not isinstance(item, dict):
        return None
    number = item.get("session")
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        return None
    record = dict(item)
    start = record.get("start_step")
    if start is not None and (not isinstance(start, int) or isinstance(start, bool)):
        record.pop("start_step")
    if "environment" in record and not isinstance(record["environment"], dict):
        record.pop("environment")
    return record


def _highest_logged_session(storage: Storage) -> int:
    from resilient_train.metrics import read_rows

    try:
        rows = read_rows(storage)
    except Exception:  # no metrics, or unreadable: numbering restarts after the records we have
        return 0
    return max((row["session"] for row in rows), default=0)


def _is_module_name(name: str) -> bool:
    """A task given as `package.module` (not a path to a .py file)."""
    return not name.endswith(".py") and "/" not in name and os.sep not in name


def _safe_name(name: str) -> bool:
    """A relative path inside task/ (task.json may come from a shared folder)."""
    norm = posixpath.normpath(name)
    return bool(name) and not name.startswith("/") and not norm.startswith("..") and "\\" not in name and "\x00" not in name


def _why(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# names a run folder keeps at its top level (lease.json: checkpoint/lease.py; micro_batch.json:
# microbatch.py): what an export must never write into or over
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

