"""Experiment trackers (TensorBoard, MLflow, Weights & Biases) that every session of a run continues.

A run outlives its sessions (a Colab VM, then another, then a local box), so its tracker run must
too: the tracker's run id lives in the run folder (`logs/trackers.json`, written through the run's
`Storage`, so a `gs://` run folder works), and each session reopens that same tracker run.

A session resumes from its checkpoint and logs again the steps that the dead session logged after
that checkpoint. What each tracker can do about those steps differs, and is said plainly:

- TensorBoard: the writer opens with `purge_step = resumed step + 1`; TensorBoard then hides the
  older events from that step on, so every step shows once, with the newest session's value.
- MLflow: a metric's history is append-only (no API deletes an entry), so a re-logged step has one
  entry per session that logged it. Every row also logs a `session` metric at its step, the run's
  latest values are the newest session's, and the run carries `resilient_train.session` tags.
- W&B: `wandb.init(id=..., resume="allow")`. Online, W&B itself refuses steps below the run's last
  step; those few steps keep the dead session's values (skipped here with one line, instead of a
  W&B warning per row). Offline, each session writes its own segment; `wandb sync` uploads them in
  order into the same run, where re-logged steps may appear once per session (the `session`
  metric tells them apart). W&B's run rewind (`resume_from`) would supersede them, but it is a
  private preview that needs the server, so it is not used.

Trackers must never stop training: a missing package is a `UsageError` at the start (nothing is
lost yet), while a tracker that fails to start or to log is reported in one warning line and
dropped for the rest of the session; `logs/metrics.csv` keeps every row regardless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Protocol, cast

from resilient_train.errors import UsageError
from resilient_train.storage import Storage

if TYPE_CHECKING:
    from resilient_train.config import LoggingConfig, RunConfig

log = logging.getLogger(__name__)

LOGS, TRACKERS_JSON = "logs", "trackers.json"
# how a session ended, as `close` is told: finished (or stopped cleanly, to be resumed) or failed
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"
_MLFLOW_STATUS = {FINISHED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}
_MLFLOW_BATCH = 100  # params / tags per log_batch call (the REST API's limit)
_MLFLOW_NAME = re.compile(r"[^\w\-. :/]")  # characters MLflow refuses in param, tag and metric names


class Tracker(Protocol):
    """One experiment tracker of a session (global rank 0 only)."""

    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self, outcome: str = FINISHED) -> None: ...


@dataclass(frozen=True)
class RunParams:
    """What trackers record besides metrics: the run's config and this session's machine, flat."""

    config: Mapping[str, Any] = field(default_factory=dict)  # "trainer.max_steps" -> 40
    environment: Mapping[str, Any] = field(default_factory=dict)  # "torch" -> "2.6.0", "device" -> "1x NVIDIA L4"

    @classmethod
    def of(cls, cfg: RunConfig) -> RunParams:
        """The flattened config and the environment fingerprint of the process calling it."""
        from omegaconf import OmegaConf

        from resilient_train.env import fingerprint
        from resilient_train.portability import device_kind

        env = fingerprint()
        environment = {key: value for key, value in env.items() if key != "gpus"}
        environment["device"] = device_kind(env)
        return cls(config=flatten(OmegaConf.to_container(cfg.to_dictconfig(), resolve=True)), environment=flatten(environment))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; lists as JSON text; scalars as they are."""
    if isinstance(data, Mapping):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    key = prefix[:-1]
    if isinstance(data, (list, tuple)):
        return {key: json.dumps(list(data), default=str)}
    return {key: data if data is None or isinstance(data, (str, int, float, bool)) else str(data)}


# -- the ids in the run folder ---------------------------------------------------------------------
class TrackerIds:
    """`logs/trackers.json`: per tracker, the id of its run, so every session continues it."""

    def __init__(self, run: Storage) -> None:
        self.run = run
        self.readable = True  # False: the file exists but could not be read (a new id would fork the run)
        self.records: dict[str, dict[str, Any]] = {}
        try:
            raw = run.read_bytes(LOGS, TRACKERS_JSON)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - storage gave up after its retries
            log.warning("could not read %s (%s: %s); trackers that need a run id are off this session",
                        run.display(LOGS, TRACKERS_JSON), type(exc).__name__, exc)
            self.readable = False
            return
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            log.warning("%s is damaged; trackers start new runs (written there again)", run.display(LOGS, TRACKERS_JSON))
            return
        self.records = data

    def get(self, name: str) -> dict[str, Any]:
        return dict(self.records.get(name) or {})

    def remember(self, name: str, record: dict[str, Any]) -> None:
        """Store `record` for `name`; a failed write warns (the next session starts a new tracker run)."""
        self.records[name] = record
        try:
            self.run.write_text(json.dumps(self.records, indent=2, sort_keys=True) + "\n", LOGS, TRACKERS_JSON)
        except Exception as exc:  # noqa: BLE001 - metrics are not worth stopping a run for
            log.warning("could not write %s (%s: %s); the next session starts a new %s run",
                        self.run.display(LOGS, TRACKERS_JSON), type(exc).__name__, exc, name)


@dataclass
class SessionInfo:
    """What every tracker needs to open: where, which session, from which step, with what."""

    run: Storage
    session: int
    start_step: int
    logging: LoggingConfig
    params: RunParams
    ids: TrackerIds

    @property
    def run_name(self) -> str:
        return posixpath.basename(self.run.url.rstrip("/")) or "run"

    @property
    def project(self) -> str:
        return self.logging.project or self.run_name


# -- choosing and opening ----------------------------------------------------------------------------
def chosen(logging_cfg: LoggingConfig, run: Storage) -> tuple[list[str], bool]:
    """(tracker names, whether the user named them).

    `logging.trackers: null` (the default) keeps what the package always did: TensorBoard when it
    is installed and the run folder is on local disk (the Docker image's TensorBoard watches
    `runs/*/logs/tensorboard`); a list means exactly those, `[]` none.
    """
    if logging_cfg.trackers is not None:
        return list(logging_cfg.trackers), True
    return (["tensorboard"] if run.backend.local_paths else []), False


def open_trackers(run: Storage, session: int, logging_cfg: LoggingConfig, start_step: int, params: RunParams) -> list[Tracker]:
    """Open the session's trackers, continuing the runs recorded in `logs/trackers.json`."""
    names, explicit = chosen(logging_cfg, run)
    openers: list[tuple[str, Callable[[SessionInfo], Tracker]]] = []
    for name in names:  # every package first: a missing one stops the session before any tracker run exists
        if _installed(name, explicit):
            openers.append((name, _OPENERS[name]))
    if not openers:
        return []
    info = SessionInfo(run, session, start_step, logging_cfg, params, TrackerIds(run))
    trackers: list[Tracker] = []
    for name, opener in openers:
        if name != "tensorboard" and not info.ids.readable:
            continue
        try:
            trackers.append(opener(info))
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a tracker outage must not stop the training
            log.warning("%s: could not start (%s); this session's metrics go to logs/metrics.csv only", name, _why(exc))
    return trackers


@contextlib.contextmanager
def _quick_http(timeout: str = "10", retries: str = "0") -> Iterator[None]:
    """MLflow's HTTP timeout and retries, shortened for the start-up probe (a user's own settings win)."""
    names = {"MLFLOW_HTTP_REQUEST_TIMEOUT": timeout, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": retries}
    changed = [name for name in names if name not in os.environ]
    for name in changed:
        os.environ[name] = names[name]
    try:
        yield
    finally:
        for name in changed:
            os.environ.pop(name, None)


def require_trackers(logging_cfg: LoggingConfig, run: Storage) -> None:
    """UsageError naming the extra when a tracker `logging.trackers` lists cannot be imported.

    Called on global rank 0 before the run starts (Trainer.prepare_run), whose refusal every rank
    shares: found later, inside the loop, it would leave the other DDP ranks in a collective.
    """
    names, explicit = chosen(logging_cfg, run)
    for name in names:
        _installed(name, explicit)


def _installed(name: str, explicit: bool) -> bool:
    """Whether the tracker's package imports; UsageError naming the extra when it was asked for."""
    module = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[name]
    try:
        __import__(module)
    except ImportError as exc:
        if not explicit:
            return False
        raise UsageError(f"logging.trackers has {name}, which cannot be imported ({exc}); "
                         f"pip install 'resilient_train[{name}]'") from None
    return True


class _StartError(Exception):
    """A tracker that cannot start, with what to do about it (said as it is)."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, _StartError):
        return str(exc)
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text[0] if len(text[0]) <= 200 else text[0][:200] + '...'}"


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a row (None, text and other types are left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- TensorBoard ------------------------------------------------------------------------------------
class TensorBoardTracker:
    """Event files under `logging.tensorboard_dir` (default `RUN/logs/tensorboard`)."""

    name = "tensorboard"

    def __init__(self, info: SessionInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = tensorboard_dir(info)
        # purge_step: TensorBoard hides older events at and after it, i.e. what the dead session
        # logged after the checkpoint this session resumed from (`start_step` itself stays)
        self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=info.start_step + 1, flush_secs=30)
        if info.ids.get(self.name).get("dir") != self.log_dir:
            info.ids.remember(self.name, {"dir": self.log_dir})
        self._writer.add_text("resilient_train/session", _session_markdown(info), global_step=info.start_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key != "epoch":
                self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, outcome: str = FINISHED) -> None:
        self._writer.close()


def tensorboard_dir(info: SessionInfo) -> str:
    """`logging.tensorboard_dir`, else `RUN/logs/tensorboard` (local) or `./tb/<run name>` (remote).

    TensorBoard without TensorFlow writes local files only, so a gs:// run keeps its events here.
    """
    if info.logging.tensorboard_dir:
        return info.logging.tensorboard_dir
    if info.run.backend.local_paths:
        return info.run.path(LOGS, "tensorboard")
    return os.path.join("tb", info.run_name)


def _session_markdown(info: SessionInfo) -> str:
    lines = [f"session {info.session}, from step {info.start_step}", "", "| key | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in {**info.params.environment, **info.params.config}.items()]
    return "\n".join(lines)


# -- MLflow -----------------------------------------------------------------------------------------
class MlflowTracker:
    """One MLflow run for the whole resilient run; each session continues it by id."""

    name = "mlflow"

    def __init__(self, info: SessionInfo) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        uri = info.logging.mlflow_tracking_uri
        if uri and _is_file_store(uri):
            # MLflow 3 refuses a file store unless told otherwise; the user chose one here
            # (on Colab, a folder on Drive is the store that outlives the VM)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self._client = client = MlflowClient(tracking_uri=uri)
            with _quick_http():  # an unreachable server: one short try, not minutes of retries before step 1
                client.search_experiments(max_results=1)  # the store opens lazily: fail here, with a hint
        except Exception as exc:
            if uri:
                raise
            raise _StartError(f"{_why(exc)}; set logging.mlflow_tracking_uri (file:///a/folder, a server URL, "
                               "or sqlite:///mlflow.db with the full mlflow package)") from None
        self._session = info.session
        self._ops: list[Any] = []
        record = info.ids.get(self.name)
        existing = None
        if record.get("run_id"):
            try:
                existing = client.get_run(record["run_id"])
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("mlflow: run %s is not in %s (an earlier session's store?); starting a new MLflow run",
                            record["run_id"], client.tracking_uri)
        if existing is None:
            experiment = client.get_experiment_by_name(info.project)
            experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(info.project)
            created = client.create_run(experiment_id, run_name=info.run_name, tags={"resilient_train.run_dir": info.run.url})
            self.run_id = created.info.run_id
            info.ids.remember(self.name, {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": client.tracking_uri})
            logged: dict[str, str] = {}
        else:
            self.run_id = existing.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            logged = dict(existing.data.params)
        this_session = json.dumps({"start_step": info.start_step, **info.params.environment}, default=str)[:5000]
        params, tags = [], {"resilient_train.session": str(info.session), f"resilient_train.session.{info.session}": this_session}
        tags.update({_mlflow_name(f"env.{key}"): str(value)[:5000] for key, value in info.params.environment.items()})
        for key, value in info.params.config.items():
            name, text = _mlflow_name(key), str(value)[:500]
            if name not in logged:
                params.append(Param(name, text))
            elif logged[name] != text:  # params cannot change in MLflow: the newest value is a tag
                tags[f"config.{name}"] = text
        tag_list = [RunTag(key, value) for key, value in tags.items()]
        for start in range(0, max(len(params), len(tag_list)), _MLFLOW_BATCH):
            client.log_batch(self.run_id, params=params[start:start + _MLFLOW_BATCH], tags=tag_list[start:start + _MLFLOW_BATCH])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(key), value, now, step) for key, value in values.items()]
        metrics.append(Metric("session", float(self._session), now, step))  # tells re-logged steps apart
        # asynchronous: a slow or unreachable server must not hold up training steps
        self._ops.append(self._client.log_batch(self.run_id, metrics=metrics, synchronous=False))

    def flush(self) -> None:
        pass

    def close(self, outcome: str = FINISHED) -> None:
        ops, self._ops = self._ops, []
        try:
            for op in ops:
                if op is not None:
                    op.wait()
        finally:
            self._client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(outcome, "FINISHED"))


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and not uri.startswith(("sqlite:", "databricks", "postgresql", "mysql"))


def _mlflow_name(key: str) -> str:
    return _MLFLOW_NAME.sub("_", key)[:250]


# -- Weights & Biases -------------------------------------------------------------------------------
class WandbTracker:
    """One W&B run (id kept in the run folder), resumed with `resume="allow"` by every session."""

    name = "wandb"

    def __init__(self, info: SessionInfo) -> None:
        import wandb

        record = info.ids.get(self.name)
        self.run_id = record.get("id") or uuid.uuid4().hex[:12]
        if not record.get("id"):  # recorded before init: a session killed during init still left its id
            info.ids.remember(self.name, {"id": self.run_id, "project": info.project})
        self._session = info.session
        self._run = wandb.init(
            project=info.project, id=self.run_id, name=info.run_name, resume="allow", mode=cast(Any, info.logging.wandb_mode),
            config={**info.params.config, "env": dict(info.params.environment),
                    "resilient_train": {"session": info.session, "start_step": info.start_step}},
            allow_val_change=True,  # a resumed run may change e.g. trainer.max_steps, and the machine
            reinit="create_new",  # never finish a W&B run the user's own code has open
        )
        # online, W&B knows the run's last step and drops rows below it; offline it knows nothing (0)
        self._floor = int(getattr(self._run, "starting_step", 0) or 0)
        self._skipped: Optional[int] = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if step < self._floor:
            if self._skipped is None:
                self._skipped = step
                log.info("wandb: steps %d..%d were logged by the session before; W&B keeps those rows", step, self._floor - 1)
            return
        self._run.log({**values, "session": self._session}, step=step)

    def flush(self) -> None:
        pass

    def close(self, outcome: str = FINISHED) -> None:
        self._run.finish(exit_code=1 if outcome == FAILED else 0)


_OPENERS: dict[str, Callable[[SessionInfo], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "wandb": WandbTracker,
}
