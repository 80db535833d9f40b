"""Resume: the newest valid checkpoint of the run folder (or its mirror), restored on every rank.

Rank 0 lists and verifies, decodes the candidate and checks it against the live objects (a
checkpoint that does not fit the model, optimizer, scheduler or data source is skipped like a
corrupt one); its choice is broadcast and every rank restores its own files. What the resume can
promise (bit-exact, sample-exact, approximate) is assessed here, printed, and returned as a
record for the session log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from lightning_fabric import Fabric

from resilient_train import state as state_lib
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.format import decode_data as decode_data_position
from resilient_train.checkpoint.info import LoadedCheckpoint
from resilient_train.checkpoint.selection import load_newest_valid
from resilient_train.config import ConfigChange
from resilient_train.data import resumed_order
from resilient_train.data.iterable import check_position, world_size_refusal
from resilient_train.env import training_fingerprint
from resilient_train.errors import CheckpointError, UsageError
from resilient_train.loop.comm import info
from resilient_train.loop.layout import RunLayout
from resilient_train.loop.parts import check_scheduler_horizon
from resilient_train.portability import ResumeAssessment, assess

log = logging.getLogger("resilient_train")


@dataclass(frozen=True)
class TrainingParts:
    """The live objects a checkpoint is restored into."""

    model: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    data_shards: Optional[int] = None  # shards of a datasets.IterableDataset train_data (positions are checked against it)


@dataclass
class Resumed:
    """Where a session starts: fresh (step None) or from a restored checkpoint."""

    progress: state_lib.Progress = field(default_factory=state_lib.Progress)
    step: Optional[int] = None  # the checkpoint's step, None for a fresh start
    path: Optional[str] = None  # the checkpoint's URL
    layout: Optional[RunLayout] = None  # the session's layout with the order the run started with
    data: Any = None  # this rank's position in an iterable train_data
    metrics: dict[str, Any] = field(default_factory=dict)  # loss and val_loss the checkpoint recorded
    assessment: Optional[ResumeAssessment] = None
    manager: int = 0  # which of the managers the checkpoint came from (0: the run folder, 1: its mirror)


def resume(fabric: Fabric, managers: Sequence[CheckpointManager], parts: TrainingParts, layout: RunLayout, max_steps: int,
           precision: Optional[str], changes: Sequence[ConfigChange], schedule_to: Optional[int] = None) -> Resumed:
    """Restore the newest valid checkpoint of the run folder or its mirror; rank 0 picks it.

    `schedule_to` (max_steps, when no max_epochs may end the run first): the restored scheduler
    must be able to step that far, checked before the resume is announced.
    """
    rank = fabric.global_rank
    wanted = {fmt.MODEL_FILE, fmt.STATE_TENSORS, fmt.STATE_JSON, *fmt.rank_files(rank)}
    if rank == 0:  # rank 0 checks every rank's data position while it chooses (they are small)
        wanted |= {name for r in range(fabric.world_size) for name in (fmt.data_file(r), fmt.data_tensors_file(r))}
    choice, found = _choose(fabric, managers, parts, wanted)
    if choice is None:
        return Resumed(layout=layout)
    index, step = choice
    if step > max_steps:  # every rank knows the step: all stop here
        message = f"trainer.max_steps={max_steps} is below the run's step {step}; resume with trainer.max_steps={step} or more"
        raise UsageError(message) if rank == 0 else SystemExit(UsageError.exit_code)
    if found is not None:
        _, loaded, snapshot = found
    else:
        loaded = managers[index].load(managers[index].info(step), wanted, shared=False)
        snapshot = loaded.snapshot(rank)
        state_lib.resolve_shared(snapshot, parts.model, loaded)
    progress, problems = state_lib.restore(snapshot, parts.model, parts.optimizer, parts.scheduler, parts.scaler)
    for problem in problems:
        log.warning("rank %d: %s", rank, problem)
    if schedule_to is not None:
        try:
            check_scheduler_horizon(parts.scheduler, progress.step, schedule_to)
        except UsageError:
            if rank == 0:
                raise
            raise SystemExit(UsageError.exit_code) from None
    info(fabric, f"resumed from {loaded.info.path} (step {step}, epoch {progress.epoch})")
    recorded = loaded.manifest.get("metrics")
    # a shuffled run keeps the order algorithm it started with (checkpoints before feistel-v1: randperm)
    layout = layout.with_order(resumed_order(loaded.manifest.get("order"), layout.order))
    assessment = _assess(fabric, loaded.manifest, layout, precision, changes)
    return Resumed(progress=progress, step=step, path=loaded.info.path, layout=layout, data=snapshot.data,
                   metrics=dict(recorded) if isinstance(recorded, dict) else {}, assessment=assessment,
                   manager=index)


def _choose(fabric: Fabric, managers: Sequence[CheckpointManager], parts: TrainingParts,
            wanted: set[str]) -> tuple[Optional[tuple[int, int]], Any]:
    """((manager index, step) or None, what rank 0 already loaded): rank 0 decides, every rank hears it."""
    rank = fabric.global_rank
    misfits: list[CheckpointError] = []

    def decode(loaded: LoadedCheckpoint) -> fmt.Snapshot:
        """Decode and check against the live objects: one that does not fit is skipped too."""
        snapshot = loaded.snapshot(rank)
        try:
            state_lib.resolve_shared(snapshot, parts.model, loaded)
            state_lib.check(snapshot, parts.model, parts.optimizer, parts.scheduler, parts.scaler)
            _check_positions(loaded, snapshot, fabric.world_size, parts.data_shards)
        except CheckpointError as exc:
            misfits.append(exc)
            raise
        return snapshot

    choice: Any = None
    found = None
    if rank == 0:
        found = load_newest_valid(list(managers), wanted, decode=decode, shared=False)
        if found is not None:
            choice = (found[0], found[1].info.step)
        elif misfits:  # the model changed, not the checkpoints: never silently start over
            choice = ("error", str(misfits[0]))
    choice = fabric.broadcast(choice)
    if choice is not None and choice[0] == "error":
        raise CheckpointError(choice[1])
    return (tuple(choice) if choice is not None else None), found


def _check_positions(loaded: LoadedCheckpoint, snapshot: fmt.Snapshot, world_size: int, shards: Optional[int]) -> None:
    """Every rank's data position must be one its source can take (a garbled one, checksums fixed
    up, skips this checkpoint while it is chosen, not after: then an older one is used)."""
    if snapshot.data is not None:
        check_position(snapshot.data, shards)
    for other in range(1, world_size):
        position = decode_data_position(loaded.files, other)
        if position is not None:
            check_position(position, shards)


def _assess(fabric: Fabric, manifest: dict[str, Any], layout: RunLayout, precision: Optional[str],
            changes: Sequence[ConfigChange]) -> ResumeAssessment:
    """Say what this resume keeps exact (refusing what it cannot do at all), and return it as a record."""
    environment = training_fingerprint(fabric.device.type)
    now = {"world_size": fabric.world_size, "precision": precision, "environment": environment, **layout.to_json(),
           "config_changes": [change.key for change in changes if change.guarded]}
    refusal = world_size_refusal(manifest, now)  # iterable train_data: positions are per shard
    if refusal is not None:
        raise UsageError(refusal) if fabric.global_rank == 0 else SystemExit(UsageError.exit_code)
    assessment = assess(manifest, now)
    for line in assessment.lines:
        info(fabric, line)
    return assessment
