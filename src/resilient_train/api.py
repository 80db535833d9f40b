"""Running task files from Python (notebooks, scripts): the same path the CLI's `run`/`resume` take."""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Optional, Sequence

from resilient_train.config import ConfigChange, RunConfig, check_config_changes, load_yaml_layer, parse_overrides, resolve
from resilient_train.errors import UsageError
from resilient_train.preemption import StopRequest
from resilient_train.run.folder import RunFolder
from resilient_train.seeding import seed_everything
from resilient_train.task import BUILD_KEYS_NOT_FOR_FIT, Task, load_task

log = logging.getLogger("resilient_train")


def train_task(task: Task, cfg: RunConfig, config_changes: Sequence[ConfigChange] = ()) -> Any:
    """Launch, prepare the run folder, seed every RNG from cfg.seed, build, fit.

    A new run folder is written whole before `build` (task snapshot, run id, run.yaml last); an
    existing one holding another task is refused (UsageError, exit 2) before anything is built or
    written, and its snapshot and run.yaml are replaced only after the first optimizer step of the session.
    `config_changes` (from `check_config_changes`) label the resume and go into the session record.
    """
    from resilient_train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.prepare_run(task, config_changes)
    trainer.stop_if_asked_before_training()  # a stop during start-up: 75 before build loads anything
    seed_everything(cfg.seed)
    parts = task.build(trainer.config.to_dictconfig())  # the trainer's copy has its OmegaConf view built already
    return trainer.fit(**{k: v for k, v in parts.items() if k not in BUILD_KEYS_NOT_FOR_FIT})


def run_task(task: str, run_dir: Optional[str] = None, config: Optional[str] = None, overrides: Sequence[str] = (),
             allow_change: Sequence[str] = ()) -> Any:
    """`python -m resilient_train run TASK [--run-dir URL] [--config FILE] [KEY=VALUE ...]` as a call.

    Continues the run if `run_dir` already holds it (the same task file, possibly edited), starts
    it when `run_dir` holds none or only the debris of a run that crashed before it was complete
    (no run.yaml). Continuing with a config that changes what the run computes (seed, task keys,
    batch layout) is refused (UsageError, exit 2) unless each such key is in `allow_change`.
    Returns the `FitResult`; raises `TrainingStopped` (exit code 75) when stopped by a signal or
    the session budget.
    """
    given: list[Any] = [load_yaml_layer(config)] if config else []
    given.append(parse_overrides(overrides))
    if run_dir:
        given.append({"run_dir": run_dir})
    _listen_for_configured_stops(given)  # before the task file imports: a SIGUSR1 given here stops it too
    loaded = load_task(task)
    cfg = resolve(loaded.defaults, *given)
    StopRequest.retune_early(cfg.checkpoint.stop_signals)  # the task's CONFIG may name them
    return train_task(loaded, cfg, _changes_to_existing_run(loaded, cfg, allow_change))


def _listen_for_configured_stops(given: Sequence[Any]) -> None:
    """Stop signals named by --config or KEY=VALUE, listened for before the task is imported; a
    config that does not resolve yet is reported later, with the task's CONFIG beneath it. Layers
    that do not name `checkpoint.stop_signals` leave the default set the CLI listens for already."""
    if not any(_names_stop_signals(layer) for layer in given):
        return
    try:
        signals = resolve(*given).checkpoint.stop_signals
    except UsageError:
        return
    StopRequest.retune_early(signals)


def _names_stop_signals(layer: Any) -> bool:
    """False only when the layer surely leaves `checkpoint.stop_signals` unset."""
    if not hasattr(layer, "get"):
        return True
    try:
        section = layer.get("checkpoint")
    except Exception:  # noqa: BLE001 - e.g. an interpolation that does not resolve: resolve reports it
        return True
    if section is None:
        return False
    return not hasattr(section, "keys") or "stop_signals" in section


def resume_run(run_dir: str, overrides: Sequence[str] = (), allow_change: Sequence[str] = ()) -> Any:
    """`python -m resilient_train resume RUN [KEY=VALUE ...]` as a call: needs only the run folder.

    A folder without run.yaml holds no run (nothing, or a run that crashed before it was
    complete): NotFoundError (exit 3) naming `run TASK --run-dir RUN`. Overrides that change what
    the run computes are refused (UsageError, exit 2) unless named in `allow_change`.
    """
    folder = RunFolder.at(run_dir)
    stored_layer = folder.read_config_layer()
    cfg = resolve(stored_layer, parse_overrides(overrides), {"run_dir": run_dir})
    StopRequest.retune_early(cfg.checkpoint.stop_signals)
    changes = check_config_changes(resolve(stored_layer, {"run_dir": run_dir}), cfg, allow_change)
    with tempfile.TemporaryDirectory(prefix="resilient_train_task_") as tmp:
        return train_task(load_task(folder.task_entry(local_dir=tmp)), cfg, changes)


def _changes_to_existing_run(task: Task, cfg: RunConfig, allow_change: Sequence[str]) -> list[ConfigChange]:
    """`run` into a folder that holds a run: what the new config changes (refused when guarded).

    Another task is refused first, with its own message. A stored run.yaml that cannot be read
    never blocks the run (bookkeeping never does): it is said in one line and not compared.
    """
    folder = RunFolder.at(cfg.run_dir)
    if not folder.has_run():
        return []
    folder.check_task(task)
    try:
        stored = resolve(folder.read_config_layer(), {"run_dir": cfg.run_dir})
    except UsageError as exc:
        log.warning("cannot compare the config with the run's stored run.yaml (%s); config changes are not checked", exc)
        return []
    return check_config_changes(stored, cfg, allow_change)
