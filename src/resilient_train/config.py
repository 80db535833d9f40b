"""Config schemas and their loading: defaults < task CONFIG < --config YAML < KEY=VALUE.

Each section is a small dataclass that validates itself in `__post_init__` and names the key it
rejects, so a typo on the command line costs one clear line instead of a crash an hour later.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resilient_train.errors import ConfigError, UsageError

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


TRACKERS = ("tensorboard", "mlflow", "wandb")


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
        unknown = [name for name in names if name not in TRACKERS]
        if unknown:
            raise ConfigError("logging.trackers", f"unknown tracker {unknown[0]!r}; use any of {', '.join(TRACKERS)}")
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
        """The OmegaConf view handed to a task's `build(cfg)` (attribute access: `cfg.task.lr`)."""
        return OmegaConf.structured(self)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.to_dictconfig())

    def hash(self) -> str:
        """A short digest of everything that shapes the training result (run_dir and logging excluded)."""
        data = cast(dict[str, Any], OmegaConf.to_container(self.to_dictconfig(), resolve=True))
        data.pop("run_dir", None)
        data.pop("logging", None)  # where metrics go does not shape the result
        text = OmegaConf.to_yaml(OmegaConf.create(data))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_SECTIONS = {"trainer": TrainerConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _translate(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = _first_line(exc)
    if "Key '" in msg and "not in" in msg:
        near = nearest_key(key)
        msg = f"unknown key; did you mean {near}?" if near else "unknown key; see docs/configuration.md for the keys that exist"
    return ConfigError(key, msg)


def known_keys() -> list[str]:
    """Every dotted config key (`task.*` is free-form and not listed)."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS and f.name != "task"]
    for section, schema in _SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(schema)]
    return keys


def nearest_key(key: str) -> Optional[str]:
    """The valid key a typo most likely meant (`trainer.max_step` -> `trainer.max_steps`), if any is close."""
    import difflib

    keys = known_keys()
    names = {k.rsplit(".", 1)[-1]: k for k in keys}  # field names are unique across sections
    name = key.rsplit(".", 1)[-1]
    if name in names:  # the right name in the wrong section (or without one)
        return names[name]
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if not match:
        near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.8)
        match = [names[near[0]]] if near else []
    return match[0] if match else None


def parse_overrides(items: Iterable[str]) -> DictConfig:
    """Turn `KEY=VALUE` strings into a config layer (values parsed as YAML: 3, 1e-3, true, [1,2])."""
    items = list(items)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"override '{item}' is not KEY=VALUE (for example trainer.max_steps=500)")
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as exc:
        raise UsageError(f"cannot parse overrides {items}: {_first_line(exc)}") from None


def load_yaml_layer(path: str) -> DictConfig:
    """Read a `--config FILE.yaml` layer through fsspec (so it may live on Drive or GCS)."""
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            layer = OmegaConf.create(f.read())
    except FileNotFoundError:
        raise UsageError(f"config file '{path}' does not exist") from None
    except OmegaConfBaseException as exc:
        raise UsageError(f"config file '{path}' is not valid YAML: {_first_line(exc)}") from None
    except Exception as exc:  # yaml.YAMLError and friends: report, do not crash
        raise UsageError(f"config file '{path}' cannot be read: {_first_line(exc)}") from None
    if not isinstance(layer, DictConfig):
        raise UsageError(f"config file '{path}' must hold a mapping at the top level")
    return layer


def kwargs_layer(kwargs: Mapping[str, Any]) -> dict:
    """Map `Trainer(max_steps=..., every_n_steps=...)` keywords onto their config sections.

    Field names are unique across sections, so a flat keyword is unambiguous; whole sections may
    also be passed as dicts (`checkpoint={"keep_last": 2}`).
    """
    layer: dict = {}
    for name, value in kwargs.items():
        if name in ("run_dir", "seed"):
            layer[name] = value
        elif name in ("trainer", "checkpoint", "logging", "task"):
            section = dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else dict(value)
            layer.setdefault(name, {}).update(section)
        else:
            for section_name, schema in _SECTIONS.items():
                if name in {f.name for f in dataclasses.fields(schema)}:
                    layer.setdefault(section_name, {})[name] = value
                    break
            else:
                near = nearest_key(name)
                hint = f"did you mean {near.rsplit('.', 1)[-1]}?" if near else "see docs/configuration.md"
                raise UsageError(f"Trainer got an unknown argument '{name}'; {hint}")
    return layer


def resolve(*layers: Any) -> RunConfig:
    """Merge layers over the defaults and validate; every failure names the offending key."""
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, *[layer for layer in layers if layer is not None])
        return cast(RunConfig, OmegaConf.to_object(merged))  # runs every __post_init__
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(getattr(exc, "__cause__", None), ConfigError) else None
        if cause is not None:
            raise cause from None
        raise _translate(exc) from None


def load_run_yaml(text: str) -> DictConfig:
    """Parse a stored `run.yaml` as a config layer."""
    try:
        layer = OmegaConf.create(text)
    except Exception as exc:
        raise UsageError(f"run.yaml is not valid YAML: {_first_line(exc)}") from None
    if not isinstance(layer, DictConfig):
        raise UsageError("run.yaml must hold a mapping at the top level")
    return layer


# -- config changes when a run continues ---------------------------------------------------------

# trainer keys that change how the run is computed on this machine, not what it computes: the
# resume's exactness line labels their effect (world size, device, precision), or they have none
# on the result (cadences, logging, worker count: batches are seeded from their position alone,
# validation leaves the training RNG streams where they were)
_FREE_TRAINER_KEYS = frozenset({
    "max_steps", "accelerator", "strategy", "precision", "gradient_checkpointing", "checkpoint_modules",
    "val_every_n_steps", "val_batches", "log_every_n_steps", "num_workers", "progress_bar", "micro_batch_size",
    "max_epochs", "gpu_stats",
})
# keys that set the batch layout: free while `trainer.global_batch_size` is set and unchanged (the
# trainer then derives accumulation so the samples per optimizer step stay the same)
_LAYOUT_KEYS = frozenset({"batch_size", "accumulate_grad_batches", "devices", "num_nodes"})
_ABSENT = "<unset>"


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value differs between a run's stored config and the one it continues with.

    `guarded` changes alter what the run computes (seed, task keys, batch layout): a run refuses
    them unless the user names each with `--allow-change KEY`, and then labels the resume
    approximate. The others (longer max_steps, checkpoint cadence, logging, hardware) pass.
    """

    key: str
    old: Any
    new: Any
    guarded: bool

    def to_json(self) -> dict[str, Any]:
        """The record kept in sessions.json."""
        return {"key": self.key, "old": self.old, "new": self.new, "guarded": self.guarded}


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted key -> value for every leaf of nested mappings (lists are leaves; an empty mapping has none)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _guarded(key: str, stored: RunConfig, new: RunConfig) -> bool:
    if key == "seed" or key.startswith("task."):
        return True
    section, _, name = key.partition(".")
    if section in ("checkpoint", "logging"):
        return False
    if section == "trainer" and name in _FREE_TRAINER_KEYS:
        return False
    if section == "trainer" and name in _LAYOUT_KEYS:
        kept = stored.trainer.global_batch_size
        return kept is None or new.trainer.global_batch_size != kept
    return True  # trainer.global_batch_size, gradient_clip_val, and any key not known to be harmless


def config_changes(stored: RunConfig, new: RunConfig) -> list[ConfigChange]:
    """Every key (run_dir aside) whose value differs, in key order, each classified."""
    before = _leaves(OmegaConf.to_container(stored.to_dictconfig(), resolve=True), "")
    after = _leaves(OmegaConf.to_container(new.to_dictconfig(), resolve=True), "")
    changes = []
    for key in sorted(set(before) | set(after)):
        if key == "run_dir":
            continue
        old, now = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if old != now or type(old) is not type(now):  # True == 1, but a flag is not a count
            changes.append(ConfigChange(key, old, now, _guarded(key, stored, new)))
    return changes


def _allowed(key: str, allow: Iterable[str]) -> bool:
    """`--allow-change task` allows every `task.*` key; `--allow-change task.lr` that one."""
    return any(key == a or key.startswith(a.rstrip(".") + ".") for a in allow if a)


def check_config_changes(stored: RunConfig, new: RunConfig, allow: Iterable[str] = ()) -> list[ConfigChange]:
    """The changes a continued run makes to its stored config; UsageError (exit 2) for guarded
    changes not named in `allow`, in one line naming the keys and the flag that lets them through.

    Computed from the config files alone, so every DDP rank reaches the same decision.
    """
    allow = [str(a).strip() for a in allow]
    changes = config_changes(stored, new)
    refused = [c for c in changes if c.guarded and not _allowed(c.key, allow)]
    if refused:
        what = ", ".join(f"{c.key} ({_short(c.old)} -> {_short(c.new)})" for c in refused)
        flags = " ".join(f"--allow-change {c.key}" for c in refused)
        raise UsageError(
            f"changing {what} would make this another run, not a continuation of the stored one; pass {flags} "
            "to continue anyway (the resume is then labelled approximate), or start a new run with another --run-dir"
        )
    return changes


def _short(value: Any) -> str:
    text = value if value == _ABSENT else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
