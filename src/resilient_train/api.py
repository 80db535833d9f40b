"""Running task files from Python (notebooks, scripts): the same path the CLI's `run`/`resume` take."""

from __future__ import annotations

import tempfile
from typing import Any, Optional, Sequence

from resilient_train.config import RunConfig, load_yaml_layer, parse_overrides, resolve
from resilient_train.run_folder import RunFolder
from resilient_train.seeding import seed_everything
from resilient_train.task import Task, load_task


def train_task(task: Task, cfg: RunConfig) -> Any:
    """Launch, prepare the run folder, seed every RNG from cfg.seed, build, fit.

    A new run folder is written whole before `build` (task snapshot, run id, run.yaml last); an
    existing one holding another task is refused (UsageError, exit 2) before anything is built or
    written, and its snapshot and run.yaml are replaced only after its checkpoint was restored.
    """
    from resilient_train.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.prepare_run(task)
    seed_everything(cfg.seed)
    parts = task.build(cfg.to_dictconfig())
    return trainer.fit(**parts)


def run_task(task: str, run_dir: Optional[str] = None, config: Optional[str] = None, overrides: Sequence[str] = ()) -> Any:
    """`python -m resilient_train run TASK [--run-dir URL] [--config FILE] [KEY=VALUE ...]` as a call.

    Continues the run if `run_dir` already holds it (the same task file, possibly edited), starts
    it when `run_dir` holds none or only the debris of a run that crashed before it was complete
    (no run.yaml). Returns the `FitResult`; raises
    `TrainingStopped` (exit code 75) when stopped by a signal or the session budget.
    """
    loaded = load_task(task)
    layers: list[Any] = [loaded.defaults]
    if config:
        layers.append(load_yaml_layer(config))
    layers.append(parse_overrides(overrides))
    if run_dir:
        layers.append({"run_dir": run_dir})
    return train_task(loaded, resolve(*layers))


def resume_run(run_dir: str, overrides: Sequence[str] = ()) -> Any:
    """`python -m resilient_train resume RUN [KEY=VALUE ...]` as a call: needs only the run folder.

    A folder without run.yaml holds no run (nothing, or a run that crashed before it was
    complete): NotFoundError (exit 3) naming `run TASK --run-dir RUN`.
    """
    folder = RunFolder.at(run_dir)
    cfg = resolve(folder.read_config_layer(), parse_overrides(overrides), {"run_dir": run_dir})
    with tempfile.TemporaryDirectory(prefix="resilient_train_task_") as tmp:
        return train_task(load_task(folder.task_entry(local_dir=tmp)), cfg)
