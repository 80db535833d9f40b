"""`Trainer`: the public entry point. It configures, launches Fabric, and runs a session.

Fabric places the model, runs mixed precision and DDP. What a run on a vanishing GPU needs on top
(accumulation and clipping, gradient checkpointing, validation, metrics, saving on a step or
wall-clock cadence and on stop signals, automatic resume from the newest valid checkpoint) lives
in the `loop` package: `loop/session.py` builds a session, `loop/train.py` is the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from lightning_fabric import Fabric

from resilient_train.config import ConfigChange, RunConfig, kwargs_layer, resolve
from resilient_train.console import ensure_log_handler
from resilient_train.errors import StoppedBeforeTraining, TrainingStopped, UsageError
from resilient_train.loop import session as session_lib
from resilient_train.loop.comm import agree, info
from resilient_train.loop.parts import StepFn, default_training_step
from resilient_train.loop.train import train
from resilient_train.preemption import StopRequest
from resilient_train.run.folder import RunFolder
from resilient_train.runtime import (
    build_fabric,
    children_know_their_parent,
    effective_precision,
    join_elastic_process_group,
    release_process_groups_at_exit,
    resolve_precision,
    stop_watching_children,
)
from resilient_train.storage import Storage
from resilient_train.task import Task
from resilient_train.trackers import require_trackers

__all__ = ["FitResult", "StepFn", "Trainer", "default_training_step"]

# How long an exception leaving the loop waits for a background save to commit before it goes on.
EXIT_WAIT_SECONDS = 600.0


@dataclass
class FitResult:
    """What `fit` reports when training reached `max_steps`."""

    step: int
    epoch: int
    loss: Optional[float]
    val_loss: Optional[float]
    checkpoint: Optional[str]  # URL of the last committed checkpoint
    resumed_from: Optional[int]  # step the session started from, None for a fresh run
    rank: int = 0  # global rank of this process (DDP runs return on every rank)


class Trainer:
    """Train a PyTorch model so that any interruption can be resumed exactly.

    Configure with a `RunConfig` (or a dict / OmegaConf config of the same shape) and/or keywords:
    `Trainer(run_dir="runs/exp1", max_steps=1000, precision="bf16-mixed", every_n_steps=200)`.
    Keywords are config field names; see docs/configuration.md.
    """

    def __init__(self, config: Union[RunConfig, dict, Any, None] = None, **overrides: Any) -> None:
        self.config: RunConfig = resolve(config, kwargs_layer(overrides))
        self.fabric: Optional[Fabric] = None
        self.precision: Optional[str] = None
        self._task: Optional[Task] = None
        self._changes: list[ConfigChange] = []  # vs the stored config (api.py): labels and session record
        self._run_prepared = False

    def launch(self) -> Fabric:
        """Build Fabric and start its processes (DDP re-launches the command line per rank)."""
        if self.fabric is None:
            cfg = self.config.trainer
            self.precision = resolve_precision(cfg.precision, cfg.accelerator)
            self.fabric = build_fabric(cfg, self.precision)
            self.precision = effective_precision(self.fabric, self.precision)  # what checkpoints and sessions record
            join_elastic_process_group(self.fabric)
            with children_know_their_parent():
                self.fabric.launch()
            if self.fabric.world_size > 1:
                release_process_groups_at_exit()
        return self.fabric

    def prepare_run(self, task: Optional[Task] = None, config_changes: Sequence[ConfigChange] = ()) -> None:
        """A new run is born whole here (task snapshot, run id, `run.yaml` last; global rank 0).

        An existing run is only checked: a different task is refused before anything is written
        (UsageError on rank 0, exit code 2 on the others). Its task snapshot and `run.yaml` are
        replaced only after the session's first optimizer step (loop/session.py), so a `run` or
        `resume` that fails to restore or to start training leaves the stored ones as they were. `config_changes`
        (against the stored config) label the resume and go into the session record.
        """
        fabric = self.launch()
        refusal: Optional[str] = None
        if fabric.global_rank == 0:
            try:
                run = Storage(self.config.run_dir)
                require_trackers(self.config.logging, run)  # before any collective of the session
                RunFolder(run).prepare(self.config, task)
            except UsageError as exc:
                refusal = str(exc)
        if fabric.world_size > 1:
            refusal = fabric.broadcast(refusal, src=0)
        if refusal is not None:  # rank 0 says it in one line; the other ranks exit with its code
            raise UsageError(refusal) if fabric.global_rank == 0 else SystemExit(UsageError.exit_code)
        fabric.barrier()
        self._task, self._changes = task, list(config_changes)
        self._run_prepared = True

    def stop_if_asked_before_training(self) -> None:
        """Raise StoppedBeforeTraining (exit 75) when a stop signal came since the CLI started."""
        self._stop_before_training(StopRequest.early_reason())

    def _stop_before_training(self, reason: Optional[str]) -> None:
        """Every rank stops before the first step when any was asked to (signals may reach only
        some processes); nothing is saved: the newest checkpoint, if any, is where a resume starts."""
        fabric = self.launch()
        if not agree(fabric, reason is not None):
            return
        stop_watching_children(fabric)
        stopped = StoppedBeforeTraining(reason or "another rank", rank=fabric.global_rank)
        info(fabric, str(stopped))  # the one line that says it (the CLI prints nothing more)
        raise stopped

    def fit(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        train_data: Any,
        training_step: Optional[StepFn] = None,
        scheduler: Any = None,
        val_data: Any = None,
    ) -> FitResult:
        """Train to `trainer.max_steps`, resuming from the newest valid checkpoint in `run_dir`.

        Raises `TrainingStopped` (a SystemExit with code 75) after SIGTERM/SIGINT, once the
        checkpoint of the step it stopped at is committed.
        """
        ensure_log_handler()
        fabric = self.launch()
        if not self._run_prepared:
            self.prepare_run()
        inputs = session_lib.FitInputs(model, optimizer, train_data, training_step, scheduler, val_data)
        setup = session_lib.build_setup(fabric, self.config, inputs)
        identity = session_lib.RunIdentity(self.precision, self._changes, self._task)
        with StopRequest(self.config.checkpoint.stop_signals) as stop:  # a SIGTERM while the checkpoint loads still ends with 75
            self._stop_before_training(stop.reason)  # asked for during start-up (the CLI listened from its start)
            session = session_lib.start(setup, stop, identity)
            try:
                loss, val_loss = train(session)
            except BaseException as exc:
                if not isinstance(exc, TrainingStopped):
                    session.saver.abort(EXIT_WAIT_SECONDS)  # the save in flight commits or is reported
                raise
        fabric.barrier()
        progress = session.progress
        return FitResult(step=progress.step, epoch=progress.epoch, loss=loss, val_loss=val_loss,
                         checkpoint=session.saver.last_path, resumed_from=session.resumed.step, rank=fabric.global_rank)
