"""What every tracker shares: the `Tracker` protocol, the session it opens for, the run ids kept in
the run folder (`logs/trackers.json`), and the run's params as flat keys.

A tracker is a class with `name`, `package` (what must import for it to work) and `needs_run_id`
(whether it continues its run by an id from `logs/trackers.json`, so an unreadable file turns it
off rather than forking the run), constructed with a `SessionInfo`; see `resilient_train.trackers`
for the registry that lists them.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol

if TYPE_CHECKING:
    from resilient_train.storage import Storage

log = logging.getLogger("resilient_train.trackers")


class TrackerSettings(Protocol):
    """The `logging` section as trackers read it (`config.LoggingConfig` is one); a protocol, so the
    trackers need not import the config package, whose validation asks the registry for names."""

    trackers: Any
    project: Optional[str]
    tensorboard_dir: Optional[str]
    mlflow_tracking_uri: Optional[str]
    wandb_mode: Optional[str]


class ConfigSource(Protocol):
    """A run config as trackers record it (`config.RunConfig` is one)."""

    def to_container(self) -> dict[str, Any]: ...

LOGS, TRACKERS_JSON = "logs", "trackers.json"
# how a session ended, as `close` is told: finished (or stopped cleanly, to be resumed) or failed
FINISHED, STOPPED, FAILED = "finished", "stopped", "failed"


class Tracker(Protocol):
    """One experiment tracker of a session (global rank 0 only)."""

    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self, outcome: str = FINISHED) -> None: ...


class TrackerClass(Protocol):
    """A tracker as the registry holds it: what it needs, and how to open it for a session."""

    name: str
    package: str  # imported to check the tracker can run: "mlflow"
    needs_run_id: bool

    def __call__(self, info: SessionInfo) -> Tracker: ...


@dataclass(frozen=True)
class RunParams:
    """What trackers record besides metrics: the run's config and this session's machine, flat."""

    config: Mapping[str, Any] = field(default_factory=dict)  # "trainer.max_steps" -> 40
    environment: Mapping[str, Any] = field(default_factory=dict)  # "torch" -> "2.6.0", "device" -> "1x NVIDIA L4"

    @classmethod
    def of(cls, cfg: ConfigSource) -> RunParams:
        """The flattened config and the environment fingerprint of the process calling it."""
        from resilient_train.env import fingerprint
        from resilient_train.portability import device_kind

        env = fingerprint()
        environment = {key: value for key, value in env.items() if key != "gpus"}
        environment["device"] = device_kind(env)
        return cls(config=flatten(cfg.to_container()), environment=flatten(environment))


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
        self.records = {name: record for name, record in data.items() if self._sound(name, record)}

    def _sound(self, name: str, record: dict[str, Any]) -> bool:
        """Every field a tracker records (run ids, projects, URIs, folders) is a string: a record
        with another type (`{"run_id": 5}`) would fail the tracker in every later session, so it
        is dropped with one warning and the tracker starts a new run, whose id replaces it."""
        wrong = sorted(key for key, value in record.items() if not isinstance(value, str))
        if wrong:
            log.warning("%s: the %s record is damaged (%s not a string); %s starts a new run (recorded there again)",
                        self.run.display(LOGS, TRACKERS_JSON), name, ", ".join(wrong), name)
        return not wrong

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
    logging: TrackerSettings
    params: RunParams
    ids: TrackerIds

    @property
    def run_name(self) -> str:
        return posixpath.basename(self.run.url.rstrip("/")) or "run"

    @property
    def project(self) -> str:
        return self.logging.project or self.run_name


class StartError(Exception):
    """A tracker that cannot start, with what to do about it (said as it is)."""


def why(exc: BaseException) -> str:
    """A tracker's failure in one short line for the warning that drops it."""
    if isinstance(exc, StartError):
        return str(exc)
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text[0] if len(text[0]) <= 200 else text[0][:200] + '...'}"


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a row (None, text and other types are left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
