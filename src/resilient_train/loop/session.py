"""A session: everything one `fit` call trains with, built once, then handed to the loop.

`build_setup` turns what the user passed into parts on their device (before any signal handler:
nothing is saved yet); `start` (inside the stop-signal handler) resumes, takes the lease that
fences older writers, records the session in the run folder and builds the saver.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from lightning_fabric import Fabric

from resilient_train import state as state_lib
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint.collective import Collective
from resilient_train.checkpoint.lease import Lease
from resilient_train.checkpoint.mirror import Mirror
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.checkpoint.saver import CheckpointSaver
from resilient_train.config import ConfigChange, RunConfig
from resilient_train.data import BatchSource, build_eval_loader, build_source
from resilient_train.env import training_fingerprint
from resilient_train.errors import TrainingStopped, UsageError
from resilient_train.grad_ckpt import enable_gradient_checkpointing
from resilient_train.loop import parts as parts_lib
from resilient_train.loop.comm import agree, info
from resilient_train.loop.layout import RunLayout
from resilient_train.loop.parts import StepFn
from resilient_train.loop.resume import Resumed, TrainingParts, resume
from resilient_train.loop.step import ForwardBackward
from resilient_train.microbatch import MicroBatchFit
from resilient_train.preemption import StopRequest
from resilient_train.run.folder import RunFolder
from resilient_train.run.history import adopt
from resilient_train.runtime import stop_watching_children
from resilient_train.storage import Storage
from resilient_train.task import Task

log = logging.getLogger("resilient_train")


@dataclass(frozen=True)
class FitInputs:
    """What the user handed to `fit`."""

    model: Any
    optimizer: Any
    train_data: Any
    training_step: Optional[StepFn] = None
    scheduler: Any = None
    val_data: Any = None


@dataclass
class Setup:
    """The parts on their device, the data source and the batch layout: built before any resume."""

    fabric: Fabric
    cfg: RunConfig
    parts: TrainingParts
    step_fn: StepFn
    stream: BatchSource  # map-style or iterable, one interface (data/source.py)
    val_loader: Any
    micro_batches: int
    layout: RunLayout
    chunking: Optional[MicroBatchFit]
    run: Storage
    managers: list[CheckpointManager]


@dataclass
class Session:
    """A started session: the setup, where it resumed, the saver and the signal handler."""

    setup: Setup
    stop: StopRequest
    resumed: Resumed
    saver: CheckpointSaver
    number: int  # the session's number in sessions.json (0 on ranks other than 0)
    task: Optional[Task] = None
    forward_backward: ForwardBackward = field(init=False)
    _config_pending: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        s = self.setup
        self.forward_backward = ForwardBackward(s.fabric, s.parts.model, s.parts.optimizer, s.step_fn, s.stream,
                                                s.micro_batches, s.chunking, on_resize=self.saver.set_device_micro_batch)

    def record_config(self) -> None:
        """After the session's first optimizer step (global rank 0, once): the task snapshot (when
        it changed) and `run.yaml` become what this session trains with. Not earlier: a session
        that fails before it trains (a schedule too short for a new max_steps, a crash in the
        first step) leaves the stored config as it was, so the next resume is not stuck with it."""
        if self._config_pending and self.setup.fabric.global_rank == 0:
            RunFolder(self.setup.run).refresh(self.setup.cfg, self.task)
        self._config_pending = False

    @property
    def progress(self) -> state_lib.Progress:
        return self.resumed.progress


def build_setup(fabric: Fabric, cfg: RunConfig, inputs: FitInputs) -> Setup:
    """Model, optimizer and scheduler on their device; the data source; the layout; the stores."""
    tcfg = cfg.trainer
    rank, world = fabric.global_rank, fabric.world_size
    model = inputs.model
    model.train()  # from_pretrained hands models over in eval mode: train with dropout on
    if tcfg.gradient_checkpointing:
        info(fabric, f"gradient checkpointing: {enable_gradient_checkpointing(model, tcfg.checkpoint_modules)}")
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(parts_lib.make_optimizer(inputs.optimizer, model))
    scheduler = parts_lib.make_scheduler(inputs.scheduler, optimizer)
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    source = build_source(inputs.train_data, tcfg.batch_size, cfg.seed, rank, world, tcfg.num_workers, tcfg.max_epochs)
    val_loader = build_eval_loader(inputs.val_data, source.batch_size, rank, world) if inputs.val_data is not None else None
    micro_batches = parts_lib.accumulation(fabric, tcfg, source.global_batch)
    run = Storage(cfg.run_dir)
    chunking = parts_lib.micro_batch_fit(fabric, tcfg, source.batch_size, run)
    layout = RunLayout.of_source(source.layout(), source.batch_size, source.global_batch * micro_batches).with_chunking(
        chunking.size if chunking is not None and chunking.splits else None, chunking is not None and chunking.auto)
    parts = TrainingParts(model, optimizer, scheduler, scaler, getattr(source, "shards", None))
    return Setup(fabric, cfg, parts, inputs.training_step or parts_lib.default_training_step,
                 source, val_loader, micro_batches, layout, chunking, run, _managers(fabric, cfg, run))


def _managers(fabric: Fabric, cfg: RunConfig, run: Storage) -> list[CheckpointManager]:
    """The run folder's checkpoint manager, and the mirror's when one is configured."""
    managers = [CheckpointManager(run)]
    if cfg.checkpoint.mirror:
        mirror = Storage(cfg.checkpoint.mirror)
        if mirror.fs.unstrip_protocol(mirror.root) == run.fs.unstrip_protocol(run.root) and type(mirror.fs) is type(run.fs):
            info(fabric, "checkpoint.mirror is the run folder itself (a run resumed from its mirror?); not mirroring")
        else:
            managers.append(CheckpointManager(mirror))
    return managers


@dataclass(frozen=True)
class RunIdentity:
    """What the session record and every manifest say about how this session runs."""

    precision: Optional[str]
    changes: Sequence[ConfigChange]
    task: Optional[Task]


def start(setup: Setup, stop: StopRequest, identity: RunIdentity) -> Session:
    """Resume (a stop signal meanwhile ends it with 75, nothing new saved), then record the session."""
    fabric = setup.fabric
    tcfg = setup.cfg.trainer
    schedule_to = tcfg.max_steps if tcfg.max_epochs is None else None  # how far the scheduler must step
    resumed = resume(fabric, setup.managers, setup.parts, setup.layout, tcfg.max_steps, identity.precision,
                     identity.changes, schedule_to)
    if agree(fabric, stop.reason is not None):
        stop_watching_children(fabric)  # every rank agreed: a child done first must not end this one
        info(fabric, f"stopped by {stop.reason or 'another rank'} while resuming; nothing new to save, resume to continue")
        raise TrainingStopped(resumed.progress.step, stop.reason or "signal", rank=fabric.global_rank)
    if schedule_to is not None and resumed.step is None:  # a fresh start (a resume checked its restored one)
        try:
            parts_lib.check_scheduler_horizon(setup.parts.scheduler, 0, schedule_to)
        except UsageError:  # every rank stops; rank 0 says it
            if fabric.global_rank == 0:
                raise
            raise SystemExit(UsageError.exit_code) from None
    layout = resumed.layout or setup.layout
    setup.stream.use_order(layout.order)
    setup.stream.seek(resumed.progress.epoch, resumed.progress.cursor, resumed.data)
    number, saver = _record_and_saver(setup, layout, resumed, identity)
    return Session(setup, stop, resumed, saver, number, identity.task)


def _record_and_saver(setup: Setup, layout: RunLayout, resumed: Resumed, identity: RunIdentity) -> tuple[int, CheckpointSaver]:
    """Take the lease (fencing older writers), record the session, build the saver and mirror."""
    fabric, cfg, managers, rank = setup.fabric, setup.cfg, setup.managers, setup.fabric.global_rank
    environment = training_fingerprint(fabric.device.type)  # probed once: recorded in the session and in every manifest
    number, lease, mirror = 0, None, None
    if rank == 0:
        folder = RunFolder(setup.run)
        lease = Lease.acquire(setup.run)
        if resumed.manager and resumed.step is not None:  # resumed from the mirror's checkpoint: its history too
            adopt(setup.run, managers[resumed.manager].run, resumed.step)
        number = folder.start_session(resumed.progress.step, {
            "incarnation": lease.incarnation, "world_size": fabric.world_size,
            "precision": identity.precision, "environment": environment,
            "config_changes": [change.to_json() for change in identity.changes],
            "resumed_from": resumed.step,
            "resume": resumed.assessment.to_json() if resumed.assessment is not None else None,
        })
        if len(managers) > 1:
            mirror = Mirror(setup.run, managers[1].run, RetentionPolicy.from_config(cfg.checkpoint))
    meta = {"world_size": fabric.world_size, "precision": identity.precision, **layout.to_json(), "config_hash": cfg.hash(),
            "environment": environment, "writer": {"id": lease.writer if lease else None, "session": number}}
    saver = CheckpointSaver(managers[0], cfg.checkpoint, Collective(fabric.world_size, rank), meta=meta, lease=lease,
                            mirror=mirror, decide=fabric.broadcast if fabric.world_size > 1 else (lambda value: value),
                            last_path=managers[0].info(resumed.step).path if resumed.step is not None else None)
    if rank == 0:
        _collect_debris(managers[0])
    return number, saver


def _collect_debris(manager: CheckpointManager) -> None:
    """Session start, lease held: remove what dead writers left (never a committed checkpoint)."""
    try:
        removed = manager.collect_garbage()
    except Exception as exc:  # noqa: BLE001 - debris costs space, not correctness
        log.warning("could not remove debris of earlier sessions (%s: %s)", type(exc).__name__, exc)
        return
    if removed:
        log.info("removed debris of interrupted saves: %s", ", ".join(removed))
