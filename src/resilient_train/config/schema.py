"""The config schemas: one small dataclass per section, and `RunConfig`, the whole of a run's config.

Each section validates itself in `__post_init__` and names the key it rejects, so a typo on the
command line costs one clear line instead of a crash an hour later.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf import _utils as omegaconf_utils

from resilient_train.errors import ConfigError

PRECISIONS = frozenset(
    {
        "auto", "64", "32", "16", "bf16",
        "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
        "transformer-engine", "transformer-engine-float16",
    }
)
ACCELERATORS = frozenset({"auto", "cpu", "cuda", "gpu", "mps", "tpu"})


def _positive(key: str, value: Optional[float], allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(key, "must be set")
        return
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


@dataclass
class TrainerConfig:
    """How to train: steps, batch, hardware, precision and the loop's optional extras."""

    max_steps: int = 1000
    max_epochs: Optional[int] = None  # also stop at the end of this epoch (whichever of the two comes first)
    batch_size: int = 32  # per device (micro-batch)
    # samples per forward/backward on the device: None = batch_size; N splits each batch into chunks
    # of N (same samples, less memory); auto halves it whenever a step runs out of memory
    micro_batch_size: Any = None
    accelerator: str = "auto"
    devices: Any = "auto"  # int, "auto", or a list of device indices
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    accumulate_grad_batches: int = 1
    global_batch_size: Optional[int] = None  # samples per optimizer step; derives accumulation from world size
    gradient_clip_val: Optional[float] = None
    gradient_checkpointing: bool = False
    checkpoint_modules: list = field(default_factory=list)  # class names to wrap, besides ModuleList children
    val_every_n_steps: Optional[int] = None
    val_batches: Optional[int] = None  # cap on validation batches per evaluation
    log_every_n_steps: int = 10
    num_workers: int = 0
    progress_bar: bool = True
    gpu_stats: bool = True  # per log window: peak memory (CUDA), utilisation/temperature (NVML), process memory

    def __post_init__(self) -> None:
        _positive("trainer.max_steps", self.max_steps, allow_none=False)
        _positive("trainer.max_epochs", self.max_epochs)
        _positive("trainer.batch_size", self.batch_size, allow_none=False)
        if isinstance(self.micro_batch_size, str) and self.micro_batch_size.strip().lower() == "auto":
            self.micro_batch_size = "auto"
        elif self.micro_batch_size is not None and (
            isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1
        ):
            raise ConfigError("trainer.micro_batch_size", f"must be a positive int, auto or null, got {self.micro_batch_size!r}")
        _positive("trainer.num_nodes", self.num_nodes, allow_none=False)
        _positive("trainer.accumulate_grad_batches", self.accumulate_grad_batches, allow_none=False)
        _positive("trainer.global_batch_size", self.global_batch_size)
        _positive("trainer.gradient_clip_val", self.gradient_clip_val)
        _positive("trainer.val_every_n_steps", self.val_every_n_steps)
        _positive("trainer.val_batches", self.val_batches)
        _positive("trainer.log_every_n_steps", self.log_every_n_steps, allow_none=False)
        if self.num_workers < 0:
            raise ConfigError("trainer.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                "trainer.precision",
                f"unknown precision '{self.precision}'; use one of {', '.join(sorted(PRECISIONS))}",
            )
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(
                "trainer.accelerator",
                f"unknown accelerator '{self.accelerator}'; use one of {', '.join(sorted(ACCELERATORS))}",
            )
        devices = self.devices
        if isinstance(devices, bool) or not (
            devices == "auto"
            or (isinstance(devices, int) and (devices > 0 or devices == -1))
            or (
                isinstance(devices, (list, tuple))
                and len(devices) > 0
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
            )
        ):
            raise ConfigError("trainer.devices", f"must be a positive int, -1, 'auto' or a list of ints, got {devices!r}")


@dataclass
class CheckpointConfig:
    """When to save, how (sync or in the background), where else to copy, what to keep."""

    every_n_steps: Optional[int] = 100
    every_minutes: Optional[float] = None
    keep_last: Optional[int] = 3  # None keeps every checkpoint
    keep_best: Optional[int] = None  # also keep the N best by `monitor`
    monitor: Optional[str] = None  # a metric name, e.g. val_loss
    mode: str = "min"  # whether lower (min) or higher (max) `monitor` is better
    keep_every_n_steps: Optional[int] = None  # permanent milestones
    async_save: Any = "auto"  # auto | true | false
    when_busy: str = "wait"  # a save due while one is in flight: wait for it, or skip this one
    max_consecutive_failures: int = 3
    mirror: Optional[str] = None  # a second storage each checkpoint is copied to in the background
    session_budget: str = "auto"  # e.g. 11h30m: save and exit 75 before it runs out; auto = Colab's limit on Colab
    # signals that mean "save and exit 75": SLURM's `--signal=USR1@300` needs SIGUSR1 here
    stop_signals: Any = field(default_factory=lambda: ["SIGTERM", "SIGINT"])  # a list, or one name
    # tensors that did not change since the last save (a frozen base) are stored once per run in
    # checkpoints/shared/; false stores every tensor in every checkpoint, as before format 3
    share_unchanged: bool = True

    def __post_init__(self) -> None:
        _positive("checkpoint.every_n_steps", self.every_n_steps)
        _positive("checkpoint.every_minutes", self.every_minutes)
        _positive("checkpoint.keep_last", self.keep_last)
        _positive("checkpoint.keep_best", self.keep_best)
        _positive("checkpoint.keep_every_n_steps", self.keep_every_n_steps)
        _positive("checkpoint.max_consecutive_failures", self.max_consecutive_failures, allow_none=False)
        if self.mode not in ("min", "max"):
            raise ConfigError("checkpoint.mode", f"must be 'min' or 'max', got {self.mode!r}")
        if self.keep_best is not None and not self.monitor:
            raise ConfigError("checkpoint.monitor", "must name a metric (e.g. val_loss) when checkpoint.keep_best is set")
        if self.when_busy not in ("wait", "skip"):
            raise ConfigError("checkpoint.when_busy", f"must be 'wait' or 'skip', got {self.when_busy!r}")
        value = str(self.async_save).lower()
        if value not in ("auto", "true", "false"):
            raise ConfigError("checkpoint.async_save", f"must be auto, true or false, got {self.async_save!r}")
        self.async_save = value
        if str(self.session_budget).strip().lower() not in ("auto", "off"):
            from resilient_train.deadline import parse_duration

            parse_duration(self.session_budget)
        if self.mirror is not None and not str(self.mirror).strip():
            self.mirror = None
        self.stop_signals = _signal_names(self.stop_signals)


def _signal_names(value: Any) -> list:
    """Canonical names (SIGUSR1) of `checkpoint.stop_signals`; a bad or empty list is refused."""
    from resilient_train.preemption import parse_signal

    items = [value] if isinstance(value, (str, int)) else list(value or [])
    if not items:
        raise ConfigError("checkpoint.stop_signals", "must name at least one signal, e.g. [SIGTERM, SIGINT]")
    try:
        return list(dict.fromkeys(parse_signal(item).name for item in items))
    except ValueError as exc:
        raise ConfigError("checkpoint.stop_signals", str(exc)) from None


def _tracker_names() -> list[str]:
    """The trackers `logging.trackers` may name: the registry's, so a new tracker needs no change here."""
    from resilient_train.trackers import TRACKERS

    return list(TRACKERS)


@dataclass
class LoggingConfig:
    """Where metrics go besides `logs/metrics.csv`: experiment trackers that every session of the
    run (on any machine) continues, because their run ids live in the run folder."""

    # any of tensorboard, mlflow, wandb (a list, or one name); null: TensorBoard when it is installed
    # and the run folder is local (what the Docker image's TensorBoard watches); []: none
    trackers: Any = None
    project: Optional[str] = None  # MLflow experiment / W&B project; default: the run folder's name
    tensorboard_dir: Optional[str] = None  # default: <run_dir>/logs/tensorboard (local run folders only)
    mlflow_tracking_uri: Optional[str] = None  # default: MLflow's own (MLFLOW_TRACKING_URI or ./mlruns)
    wandb_mode: Optional[str] = None  # online | offline | disabled; default: W&B's own (WANDB_MODE)

    def __post_init__(self) -> None:
        if self.trackers is None:
            return self._check_wandb_mode()
        items = [self.trackers] if isinstance(self.trackers, str) else list(self.trackers)
        names = [str(item).strip().lower() for item in items if str(item).strip()]
        known = _tracker_names()
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ConfigError("logging.trackers", f"unknown tracker {unknown[0]!r}; use any of {', '.join(known)}")
        self.trackers = list(dict.fromkeys(names))
        self._check_wandb_mode()

    def _check_wandb_mode(self) -> None:
        if self.wandb_mode is not None and self.wandb_mode not in ("online", "offline", "disabled"):
            raise ConfigError("logging.wandb_mode", f"must be online, offline or disabled, got {self.wandb_mode!r}")


@dataclass
class RunConfig:
    """The whole resolved config of a run, as stored in `run.yaml`."""

    run_dir: str = "runs/default"
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    task: dict = field(default_factory=dict)  # the user's own keys, free-form

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, str) or not self.run_dir.strip():
            raise ConfigError("run_dir", "must be a non-empty path or URL")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")

    def to_dictconfig(self) -> DictConfig:
        """The OmegaConf view handed to a task's `build(cfg)` (attribute access: `cfg.task.lr`).

        A copy of the view the derived forms read: `OmegaConf.structured` costs ~7 ms, a copy
        ~1.5 ms, and the task may change its copy without touching them.
        """
        return copy.deepcopy(self._view())

    def to_container(self) -> dict[str, Any]:
        """The config as plain nested dicts and lists (a fresh copy: callers may change it)."""
        return copy.deepcopy(self._derived("container", lambda: OmegaConf.to_container(self._view(), resolve=True)))

    def to_yaml(self) -> str:
        return cast(str, self._derived("yaml", lambda: OmegaConf.to_yaml(self._view())))

    def _view(self) -> DictConfig:
        """A DictConfig of the current values that only the derived forms read (never handed out)."""
        return cast(DictConfig, self._derived("view", lambda: OmegaConf.structured(self)))

    def hash(self) -> str:
        """A short digest of everything that shapes the training result (run_dir and logging excluded)."""
        return cast(str, self._derived("hash", self._hash))

    def _hash(self) -> str:
        data = self.to_container()
        data.pop("run_dir", None)
        data.pop("logging", None)  # where metrics go does not shape the result
        return hashlib.sha256(_omegaconf_yaml(data).encode()).hexdigest()[:16]

    def mark_resolved(self, merged: Optional[DictConfig] = None) -> None:
        """Record that `config.resolve` validated and normalised exactly these values.

        `merged`, the structured config `resolve` built them from, becomes the OmegaConf view when
        it holds exactly these values with their types (no interpolation left, nothing that
        `__post_init__` normalised): building the view again from the object costs ~7 ms a start.
        """
        key = self.fields_key()
        self.__dict__["_resolved_key"] = key
        if merged is not None and _typed_text(OmegaConf.to_container(merged, resolve=False)) == key:
            self.__dict__.setdefault("_memo", {})["view"] = (key, merged)

    def is_resolved(self) -> bool:
        """True while the values are still the ones `mark_resolved` saw."""
        return self.__dict__.get("_resolved_key") == self.fields_key()

    def fields_key(self) -> str:
        """Every field's value and type, as text that differs whenever one does (1, 1.0, True and
        a NumPy integer included)."""
        return _typed_text(dataclasses.asdict(self))

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the derived forms (they are recomputed on demand)."""
        state = dict(self.__dict__)
        state.pop("_memo", None)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> "RunConfig":
        """A deep copy with copies of the derived forms: `Trainer(cfg)` copies the config `run`
        resolved, and building the view again would cost ~7 ms (copying it ~1.5 ms). Each form is
        checked against the copy's own fields on use; nothing is shared between the two configs
        (copying an OmegaConf view briefly rewires it, so a shared one would not be thread-safe)."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in self.__getstate__().items()})
        if "_memo" in self.__dict__:
            clone.__dict__["_memo"] = copy.deepcopy(self.__dict__["_memo"], memo)
        return clone

    def _derived(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, kept until a field of this config changes.

        Going through OmegaConf costs ~6 ms per call and a run asks for the YAML, the hash and the
        plain form several times during start-up; the key is checked on every call, so a config
        changed in place is never answered with what its old values gave.
        """
        memo: dict[str, tuple[str, Any]] = self.__dict__.setdefault("_memo", {})
        key = self.fields_key()
        held = memo.get(name)
        if held is None or held[0] != key:
            held = memo[name] = (key, compute())
        return held[1]


def _omegaconf_yaml(data: dict[str, Any]) -> str:
    """`OmegaConf.to_yaml(OmegaConf.create(data))`, the text the config hash has always digested.

    For plain data (str keys; str, int, float, bool, None, lists and dicts) creating the config
    only to turn it back into the same data costs ~4 ms per start, so plain data goes straight to
    the YAML dump OmegaConf itself ends with; anything else (an Enum, a Path) takes OmegaConf's road.
    """
    dumper = _dumper()
    if dumper is None or not plain_data(data):
        return OmegaConf.to_yaml(OmegaConf.create(data))
    return cast(str, yaml.dump(data, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=dumper))


@functools.cache
def _dumper() -> Optional[type]:
    """OmegaConf's YAML dumper, never writing anchors: the data OmegaConf dumps is its own copy, in
    which a list or mapping met twice is two objects, so its text never has `&id001`/`*id001`."""
    omega = getattr(omegaconf_utils, "get_omega_conf_dumper", None)
    if omega is None:
        return None

    class _NoAliases(omega()):  # type: ignore[misc]
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return _NoAliases


def plain_data(value: Any) -> bool:
    """Only str-keyed dicts, lists, str, int, float, bool and None (no OmegaConf node, no object)."""
    if type(value) is dict:
        return all(type(key) is str and plain_data(item) for key, item in value.items())
    if type(value) is list:
        return all(plain_data(item) for item in value)
    return value is None or type(value) in (str, int, float, bool)


def _typed_text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {_typed_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[" + ", ".join(_typed_text(item) for item in value) + "]"
    return f"{type(value).__module__}.{type(value).__qualname__}:{value!r}"


# the sections whose field names are config keys (`task` is the user's own, free-form)
SECTIONS = {"trainer": TrainerConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}
