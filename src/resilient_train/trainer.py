"""The training loop on Lightning Fabric, with checkpoints that make any interruption resumable.

Fabric places the model, runs mixed precision and DDP. This module adds what a run on a vanishing
GPU needs: gradient accumulation and clipping, optional gradient checkpointing, validation,
metrics, a progress bar, saving on a step/wall-clock cadence and on SIGTERM/SIGINT, and automatic
resume from the newest valid checkpoint. Read `fit` top to bottom: that is the whole loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union, cast

import torch
from lightning_fabric import Fabric

from resilient_train import state as state_lib
from resilient_train.agreement import StepAgreement
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.collective import Collective
from resilient_train.checkpoint.lease import Lease
from resilient_train.checkpoint.manager import LoadedCheckpoint, load_newest_valid
from resilient_train.checkpoint.mirror import Mirror
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.checkpoint.saver import CheckpointSaver
from resilient_train.config import ConfigChange, RunConfig, kwargs_layer, resolve
from resilient_train.console import ensure_log_handler
from resilient_train.data import BatchStream, build_eval_loader, build_stream, resumed_order
from resilient_train.data_iterable import check_position, world_size_refusal
from resilient_train.deadline import SessionDeadline, budget_seconds, session_elapsed_offset
from resilient_train.env import fingerprint
from resilient_train.errors import CheckpointError, TrainingStopped, UsageError
from resilient_train.gpu_stats import DeviceStats
from resilient_train.grad_ckpt import enable_gradient_checkpointing
from resilient_train.metrics import MetricsLogger
from resilient_train.microbatch import AUTO, MicroBatchFit, device_name, split_batch
from resilient_train.portability import ResumeAssessment, assess
from resilient_train.preemption import StopRequest
from resilient_train.run_folder import RunFolder
from resilient_train.runtime import (
    build_fabric,
    effective_precision,
    join_elastic_process_group,
    release_process_groups_at_exit,
    resolve_precision,
)
from resilient_train.step_metrics import MetricWindow, Ranks, split_output
from resilient_train.storage import Storage
from resilient_train.task import Task
from resilient_train.trackers import require_trackers

log = logging.getLogger("resilient_train")

# (model, batch) -> loss, or a mapping {"loss": loss, "accuracy": ..., ...} of scalars to log too
StepFn = Callable[[torch.nn.Module, Any], Any]
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


def default_training_step(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Without a `training_step`, the model's forward output is the loss.

    Mapping batches (dicts, and UserDicts such as Hugging Face's BatchEncoding) become keyword
    arguments and tuples positional ones; the output may be a scalar tensor, an object with
    `.loss` (Hugging Face) or a mapping with a "loss" entry.
    """
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if hasattr(out, "loss") and isinstance(out.loss, torch.Tensor):
        return out.loss
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return out
    raise UsageError(
        "the model's output is not a scalar loss (nor has .loss); pass training_step=(model, batch) -> loss"
    )


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
        self._run_prepared = False
        self._checkpoint_metrics: dict[str, Any] = {}  # loss and val_loss recorded with the checkpoint resumed from
        self.config_changes: list[ConfigChange] = []  # vs the stored config (api.py): labels and session record
        self._resumed_data: Any = None  # this rank's position in an iterable train_data, from the checkpoint resumed
        self._assessment: Optional[ResumeAssessment] = None  # what the resume promised: recorded in sessions.json

    # -- set-up --------------------------------------------------------------------------------
    def launch(self) -> Fabric:
        """Build Fabric and start its processes (DDP re-launches the command line per rank)."""
        if self.fabric is None:
            cfg = self.config.trainer
            self.precision = resolve_precision(cfg.precision, cfg.accelerator)
            self.fabric = build_fabric(cfg, self.precision)
            self.precision = effective_precision(self.fabric, self.precision)  # what checkpoints and sessions record
            join_elastic_process_group(self.fabric)
            self.fabric.launch()
            if self.fabric.world_size > 1:
                release_process_groups_at_exit()
        return self.fabric

    def prepare_run(self, task: Optional[Task] = None) -> None:
        """A new run is born whole here (task snapshot, run id, `run.yaml` last; global rank 0).

        An existing run is only checked: a different task is refused before anything is written
        (UsageError on rank 0, exit code 2 on the others). Its task snapshot and `run.yaml` are replaced only once `fit`
        has restored its checkpoint (`_start_session`), so a `run` or `resume` that fails to
        restore leaves the stored ones as they were.
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
        self._task = task
        self._run_prepared = True

    # -- the loop ------------------------------------------------------------------------------
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
        cfg = self.config
        tcfg = cfg.trainer
        fabric = self.launch()
        if not self._run_prepared:
            self.prepare_run()
        rank, world = fabric.global_rank, fabric.world_size
        step_fn = training_step or default_training_step
        model.train()  # from_pretrained hands models over in eval mode: train with dropout on

        if tcfg.gradient_checkpointing:
            what = enable_gradient_checkpointing(model, tcfg.checkpoint_modules)
            _info(fabric, f"gradient checkpointing: {what}")
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(_make_optimizer(optimizer, model))
        scheduler = _make_scheduler(scheduler, optimizer)
        scaler = getattr(fabric.strategy.precision, "scaler", None)

        # an iterable train_data gets an IterableStream, which is its own "sampler" (data_iterable.py)
        stream, sampler = build_stream(train_data, tcfg.batch_size, cfg.seed, rank, world, tcfg.num_workers, tcfg.max_epochs)
        val_loader = build_eval_loader(val_data, sampler.batch_size, rank, world) if val_data is not None else None
        micro_batches = _accumulation(fabric, tcfg, sampler.global_batch)
        batch_layout = {"micro_batch": sampler.batch_size, "global_batch": sampler.global_batch * micro_batches, **sampler.layout()}

        run = Storage(cfg.run_dir)
        chunking = self._micro_batch_fit(fabric, sampler.batch_size, run)
        batch_layout["device_micro_batch"] = chunking.size if chunking is not None and chunking.splits else None
        batch_layout["micro_batch_auto"] = chunking is not None and chunking.auto
        managers = [CheckpointManager(run)]
        if cfg.checkpoint.mirror:
            mirror = Storage(cfg.checkpoint.mirror)
            if mirror.fs.unstrip_protocol(mirror.root) == run.fs.unstrip_protocol(run.root) and type(mirror.fs) is type(run.fs):
                _info(fabric, "checkpoint.mirror is the run folder itself (a run resumed from its mirror?); not mirroring")
            else:
                managers.append(CheckpointManager(mirror))
        with StopRequest(cfg.checkpoint.stop_signals) as stop:  # a SIGTERM while the checkpoint loads still ends with 75
            progress, resumed_from = self._resume(fabric, managers, model, optimizer, scheduler, scaler, batch_layout)
            if _agree(fabric, stop.reason is not None):
                _info(fabric, f"stopped by {stop.reason or 'another rank'} while resuming; nothing new to save, resume to continue")
                raise TrainingStopped(progress.step, stop.reason or "signal", rank=rank)
            sampler.use_order(batch_layout["order"])
            stream.seek(progress.epoch, progress.cursor, self._resumed_data if resumed_from is not None else None)
            session, saver = self._start_session(fabric, run, managers, progress, batch_layout)
            if resumed_from is not None:
                saver.last_path = managers[0].info(resumed_from).path
            try:
                result = self._loop(fabric, stop, saver, run, session, progress, model, optimizer, scheduler, scaler,
                                    step_fn, stream, val_loader, micro_batches, batch_layout, chunking)
            except BaseException as exc:
                if not isinstance(exc, TrainingStopped):
                    saver.abort(EXIT_WAIT_SECONDS)  # the save in flight commits or is reported
                raise
        fabric.barrier()
        return FitResult(
            step=progress.step,
            epoch=progress.epoch,
            loss=result[0],
            val_loss=result[1],
            checkpoint=saver.last_path,
            resumed_from=resumed_from,
            rank=rank,
        )

    def _loop(self, fabric: Fabric, stop: StopRequest, saver: CheckpointSaver, run: Storage, session: int,
              progress: state_lib.Progress, model: Any, optimizer: Any, scheduler: Any, scaler: Any, step_fn: StepFn,
              stream: BatchStream, val_loader: Any, micro_batches: int, batch_layout: dict[str, Any],
              chunking: Optional[MicroBatchFit] = None) -> tuple[Optional[float], Optional[float]]:
        """Steps to `max_steps`: accumulate, clip, update, log, validate, save; (last loss, val loss)."""
        cfg, tcfg, rank = self.config, self.config.trainer, fabric.global_rank
        budget = budget_seconds(cfg.checkpoint.session_budget)
        deadline = SessionDeadline(budget, session_elapsed_offset()) if budget else None
        if budget:
            _info(fabric, f"session budget {_duration(budget)}: the run saves and exits 75 before it runs out")
        metrics = MetricsLogger.for_run(run, session, cfg, progress.step) if rank == 0 else None
        bar = _progress_bar(fabric, tcfg, progress.step)

        def capture() -> fmt.Snapshot:
            return state_lib.capture(model, optimizer, scheduler, scaler, progress, data=stream.state_dict())

        last_loss: Optional[float] = None  # measured in this session: what its checkpoints record
        val_loss: Optional[float] = None
        window_start, window_steps = time.perf_counter(), 0
        window = MetricWindow()  # what training_step returns besides the loss
        ranks = None if fabric.world_size == 1 else Ranks(lambda names: _gather_objects(fabric, names),
                                                          lambda t: _all_reduce(fabric, t, "sum"))
        device_stats = DeviceStats(fabric.device) if tcfg.gpu_stats and rank == 0 else None
        agreement = StepAgreement(fabric.world_size, rank)
        with _closing(bar, metrics, agreement):
            while progress.step < tcfg.max_steps and not _epochs_done(tcfg, stream):
                if chunking is None:
                    loss_sum = torch.zeros((), device=fabric.device)
                    for micro in range(micro_batches):
                        batch = fabric.to_device(stream.next())
                        syncing = micro == micro_batches - 1
                        with fabric.no_backward_sync(model, enabled=not syncing):
                            loss, extras = split_output(step_fn(model, batch))
                            fabric.backward(loss / micro_batches)
                        loss_sum += loss.detach()
                        window.add(extras)
                        progress.samples_seen += stream.last_consumed
                else:
                    loss_sum = self._chunked_step(fabric, model, optimizer, step_fn, stream, progress, micro_batches,
                                                  chunking, saver, batch_layout, window)
                saver.before_update()  # a background save finishes copying the state first
                if tcfg.gradient_clip_val is not None:
                    fabric.clip_gradients(model, optimizer, max_norm=tcfg.gradient_clip_val)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if scheduler is not None:
                    scheduler.step()
                progress.step += 1
                progress.epoch, progress.cursor = stream.epoch, stream.cursor
                window_steps += 1
                bar.update(1)
                saver.on_step_end()  # surfaces a background save's outcome

                step = progress.step
                last_step = step == tcfg.max_steps or _epochs_done(tcfg, stream)
                if step % tcfg.log_every_n_steps == 0 or last_step:
                    last_loss = _all_reduce(fabric, loss_sum / micro_batches, "mean").item()
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * batch_layout["global_batch"] / elapsed if elapsed > 0 else float("nan")
                    window_start, window_steps = time.perf_counter(), 0
                    lr = optimizer.param_groups[0]["lr"]
                    extra = {**window.read(ranks, fabric.device), **(device_stats.read() if device_stats is not None else {})}
                    if rank == 0:
                        _show_window(bar, tcfg, step, progress.epoch, last_loss, lr, extra)
                    if metrics is not None:
                        metrics.log(step, epoch=progress.epoch, loss=last_loss, lr=lr, samples_per_sec=round(rate, 2), **extra)
                if val_loader is not None and (
                    (tcfg.val_every_n_steps and step % tcfg.val_every_n_steps == 0) or last_step
                ):
                    val_loss = _validate(fabric, model, val_loader, step_fn, tcfg.val_batches)
                    best = progress.best.get("val_loss")
                    if best is None or val_loss < best:
                        progress.best["val_loss"] = val_loss
                    _info(fabric, f"step {step}: val_loss {val_loss:.4f}")
                    if metrics is not None:
                        metrics.log(step, epoch=progress.epoch, val_loss=val_loss)

                if deadline is not None and deadline.expired(saver.slowest_save):
                    stop.request("session budget")
                # no host sync per step: under DDP these are the flags all ranks raised a step ago
                stopping, time_due = agreement.exchange(stop.reason is not None, saver.policy.time_due())
                final = stopping or last_step
                if final or saver.due(step, time_due):
                    if metrics is not None:  # before the commit: a kill right after it loses no rows
                        metrics.flush()
                    saver.save(step, capture, {"loss": last_loss, "val_loss": val_loss}, final=final)
                if stopping:
                    saver.finish()
                    stopped = TrainingStopped(step, stop.reason or "another rank", rank=rank)
                    _info(fabric, str(stopped))  # the one line that says it (the CLI prints nothing more)
                    raise stopped
            saver.finish()
        # a session that logged nothing (a finished run fitted again) reports the checkpoint's losses
        if last_loss is None:
            last_loss = _finite(self._checkpoint_metrics.get("loss"))
        if val_loss is None:
            val_loss = _finite(self._checkpoint_metrics.get("val_loss"))
        return last_loss, val_loss

    def _micro_batch_fit(self, fabric: Fabric, loaded: int, run: Storage) -> Optional[MicroBatchFit]:
        """The device micro-batch setting for this session (None: each loaded batch goes in whole)."""
        setting = self.config.trainer.micro_batch_size
        if setting is None:
            return None
        if setting == AUTO and fabric.world_size > 1:
            if fabric.global_rank != 0:  # rank 0 says it in one line
                raise SystemExit(UsageError.exit_code)
            raise UsageError(
                "trainer.micro_batch_size=auto needs a single process: under DDP an out-of-memory error on one rank "
                "would leave the others waiting in the gradient all-reduce; set trainer.micro_batch_size=N instead"
            )
        chunking = MicroBatchFit(setting, loaded, device_name(fabric.device), run if fabric.global_rank == 0 else None)
        if chunking.recalled is not None:
            _info(fabric, f"device micro-batch {chunking.size} (found on {chunking.device} by an earlier session)")
        elif chunking.splits:
            _info(fabric, f"device micro-batch {chunking.size}: each batch of {loaded} goes through in {chunking.chunks()} chunks")
        return chunking

    def _chunked_step(self, fabric: Fabric, model: Any, optimizer: Any, step_fn: StepFn, stream: BatchStream,
                      progress: state_lib.Progress, micro_batches: int, chunking: MicroBatchFit, saver: CheckpointSaver,
                      batch_layout: dict[str, Any], window: MetricWindow) -> torch.Tensor:
        """Forward and backward of one optimizer step's batches in chunks; (auto) retried smaller on OOM.

        With `auto` the step's batches are loaded once and kept on the host, so a retry sees the
        same samples; the RNG streams and the model's buffers (BatchNorm statistics) go back to
        the step's start and the failed attempt's gradients are dropped.
        """
        def load() -> tuple[Any, int]:
            batch = stream.next()
            progress.samples_seen += stream.last_consumed
            return batch, stream.last_local

        if not chunking.auto:
            return self._run_chunks(fabric, model, step_fn, (load() for _ in range(micro_batches)), micro_batches, chunking.size,
                                    window)
        batches = [load() for _ in range(micro_batches)]
        rng = state_lib.capture_rng()
        buffers = [buffer.detach().clone() for buffer in model.buffers()]
        while True:
            error = None
            attempt = MetricWindow()  # a failed attempt's metrics are dropped with its gradients
            try:
                loss_sum = self._run_chunks(fabric, model, step_fn, iter(batches), micro_batches, chunking.size, attempt)
                window.merge(attempt)
                return loss_sum
            except torch.OutOfMemoryError as exc:
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else "OutOfMemoryError"
            # out of the except block: the traceback and the tensors it kept alive are gone
            optimizer.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)  # trainable parameters the optimizer does not hold, too
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for problem in state_lib.restore_rng(rng):
                log.warning("retrying step %d: %s", progress.step + 1, problem)
            chunking.shrink(progress.step + 1, error)
            batch_layout["device_micro_batch"] = chunking.size
            saver.meta["device_micro_batch"] = chunking.size  # what the next checkpoint records

    @staticmethod
    def _run_chunks(fabric: Fabric, model: Any, step_fn: StepFn, batches: Iterator[tuple[Any, int]], micro_batches: int,
                    size: int, window: MetricWindow) -> torch.Tensor:
        """Accumulate gradients over every chunk; each chunk's loss weighs by its share of its batch.

        Exact for a loss that is a mean over the samples of the batch (the usual case); a sum, a
        mean over tokens of uneven lengths or layers that couple the samples of a batch (BatchNorm,
        in-batch negatives) see a different objective in chunks (see trainer.micro_batch_size).
        """
        loss_sum = torch.zeros((), device=fabric.device)
        for index, (batch, samples) in enumerate(batches):
            chunks = split_batch(batch, samples, size)
            for number, (chunk, count) in enumerate(chunks):
                syncing = index == micro_batches - 1 and number == len(chunks) - 1
                with fabric.no_backward_sync(model, enabled=not syncing):
                    loss, extras = split_output(step_fn(model, fabric.to_device(chunk)))
                    weight = count / samples
                    fabric.backward(loss / micro_batches if count == samples else loss * weight / micro_batches)
                loss_sum += loss.detach() * weight
                window.add(extras, weight)
        return loss_sum

    def _resume(self, fabric: Fabric, managers: list[CheckpointManager], model: Any, optimizer: Any, scheduler: Any, scaler: Any,
                batch_layout: dict[str, Any]) -> tuple[state_lib.Progress, Optional[int]]:
        """Restore the newest valid checkpoint of the run folder or its mirror; rank 0 picks it."""
        rank = fabric.global_rank
        wanted = {fmt.MODEL_FILE, fmt.STATE_TENSORS, fmt.STATE_JSON, *fmt.rank_files(rank)}
        misfits: list[CheckpointError] = []

        def decode(loaded: LoadedCheckpoint) -> fmt.Snapshot:
            """Decode and check against the live objects: one that does not fit is skipped too."""
            snapshot = loaded.snapshot(rank)
            try:
                state_lib.check(snapshot, model, optimizer, scheduler, scaler)
                if snapshot.data is not None:  # a garbled data position: this checkpoint is skipped too
                    check_position(snapshot.data)
            except CheckpointError as exc:
                misfits.append(exc)
                raise
            return snapshot

        choice: Any = None
        found = None
        if rank == 0:
            found = load_newest_valid(managers, wanted, decode=decode)
            if found is not None:
                choice = (found[0], found[1].info.step)
            elif misfits:  # the model changed, not the checkpoints: never silently start over
                choice = ("error", str(misfits[0]))
        choice = fabric.broadcast(choice)
        if choice is None:
            return state_lib.Progress(), None
        if choice[0] == "error":
            raise CheckpointError(choice[1])
        index, step = choice
        if step > self.config.trainer.max_steps:  # every rank knows the step: all stop here
            message = (f"trainer.max_steps={self.config.trainer.max_steps} is below the run's step {step}; "
                       f"resume with trainer.max_steps={step} or more")
            raise UsageError(message) if rank == 0 else SystemExit(UsageError.exit_code)
        if found is not None:
            _, loaded, snapshot = found
        else:
            loaded = managers[index].load(managers[index].info(step), wanted)
            snapshot = loaded.snapshot(rank)
        progress, problems = state_lib.restore(snapshot, model, optimizer, scheduler, scaler)
        self._resumed_data = snapshot.data  # this rank's position in an iterable train_data: `fit` hands it to the stream
        for problem in problems:
            log.warning("rank %d: %s", rank, problem)
        _info(fabric, f"resumed from {loaded.info.path} (step {step}, epoch {progress.epoch})")
        recorded = loaded.manifest.get("metrics")
        self._checkpoint_metrics = dict(recorded) if isinstance(recorded, dict) else {}
        # a shuffled run keeps the order algorithm it started with (checkpoints before feistel-v1: randperm)
        batch_layout["order"] = resumed_order(loaded.manifest.get("order"), batch_layout.get("order"))
        now = {"world_size": fabric.world_size, "precision": self.precision, "environment": fingerprint(), **batch_layout,
               "config_changes": [change.key for change in self.config_changes if change.guarded]}
        refusal = world_size_refusal(loaded.manifest, now)  # iterable train_data: positions are per shard
        if refusal is not None:
            raise UsageError(refusal) if rank == 0 else SystemExit(UsageError.exit_code)
        self._assessment = assess(loaded.manifest, now)
        for line in self._assessment.lines:
            _info(fabric, line)
        return progress, step

    def _start_session(self, fabric: Fabric, run: Storage, managers: list[CheckpointManager], progress: state_lib.Progress,
                       batch_layout: dict[str, Any]) -> tuple[int, CheckpointSaver]:
        """Take the lease (fencing older writers), record the session, build the saver and mirror."""
        cfg, rank = self.config, fabric.global_rank
        environment = fingerprint()  # probed once: recorded in the session and in every manifest
        session, lease, mirror = 0, None, None
        if rank == 0:
            folder = RunFolder(run)
            folder.refresh(cfg, self._task)  # restored: now the task snapshot and the config this session trains with
            lease = Lease.acquire(run)
            session = folder.start_session(progress.step, {
                "incarnation": lease.incarnation, "world_size": fabric.world_size,
                "precision": self.precision, "environment": environment,
                "config_changes": [change.to_json() for change in self.config_changes],
                "resumed_from": progress.step if self._assessment is not None else None,
                "resume": self._assessment.to_json() if self._assessment is not None else None,
            })
            if len(managers) > 1:
                mirror = Mirror(run, managers[1].run, RetentionPolicy.from_config(cfg.checkpoint))
        saver = CheckpointSaver(
            managers[0],
            cfg.checkpoint,
            Collective(fabric.world_size, rank),
            meta={
                "world_size": fabric.world_size,
                "precision": self.precision,
                **batch_layout,
                "config_hash": cfg.hash(),
                "environment": environment,
                "writer": {"id": lease.writer if lease else None, "session": session},
            },
            lease=lease,
            mirror=mirror,
            decide=fabric.broadcast if fabric.world_size > 1 else (lambda value: value),
        )
        if rank == 0:
            _collect_debris(managers[0])
        return session, saver


def _collect_debris(manager: CheckpointManager) -> None:
    """Session start, lease held: remove what dead writers left (never a committed checkpoint)."""
    try:
        removed = manager.collect_garbage()
    except Exception as exc:  # noqa: BLE001 - debris costs space, not correctness
        log.warning("could not remove debris of earlier sessions (%s: %s)", type(exc).__name__, exc)
        return
    if removed:
        log.info("removed debris of interrupted saves: %s", ", ".join(removed))


@contextlib.contextmanager
def _closing(bar: Any, metrics: Optional[MetricsLogger], agreement: StepAgreement) -> Iterator[None]:
    """Close the progress bar and flush metrics however the loop ends (done, stopped, crashed)."""
    try:
        try:
            yield
        except TrainingStopped:
            agreement.close()  # every rank stops at the same step with one exchange in flight
            raise
        agreement.close()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()


def _epochs_done(cfg: Any, stream: Any) -> bool:
    """Whether `trainer.max_epochs` full passes over the data are behind (never, when unset)."""
    return cfg.max_epochs is not None and stream.completed_epochs >= cfg.max_epochs


def _show_window(bar: Any, cfg: Any, step: int, epoch: int, loss: float, lr: float, extra: dict[str, float]) -> None:
    """A log window's figures: on the bar's postfix, or as one line when there is no bar."""
    memory = extra.get("gpu_mem_peak_gb", extra.get("cpu_mem_gb"))
    shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
    shown.update({name: f"{value:.4g}" for name, value in extra.items() if not name.startswith(("gpu_", "cpu_"))})
    if memory is not None:
        shown["mem"] = f"{memory:.2f}G"
    if cfg.progress_bar:
        bar.set_postfix(shown, refresh=False)
    else:  # no bar: a long run must still say how it is doing
        log.info("step %d/%d (epoch %d) %s", step, cfg.max_steps, epoch, " ".join(f"{k} {v}" for k, v in shown.items()))


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _accumulation(fabric: Fabric, cfg: Any, per_micro_step: int) -> int:
    """Micro-batches per optimizer step: configured, or derived from `trainer.global_batch_size`
    so that another world size keeps the same samples per optimizer step."""
    if cfg.global_batch_size is None:
        return cfg.accumulate_grad_batches
    if cfg.global_batch_size % per_micro_step:
        raise UsageError(
            f"trainer.global_batch_size={cfg.global_batch_size} is not a multiple of batch_size x world size "
            f"= {per_micro_step}; choose a global batch that divides evenly"
        )
    accumulation = cfg.global_batch_size // per_micro_step
    _info(fabric, f"global batch {cfg.global_batch_size} = {per_micro_step} per micro-step x {accumulation} accumulated micro-batches")
    return accumulation


def _make_optimizer(optimizer: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        built = optimizer(model.parameters())
        if not isinstance(built, torch.optim.Optimizer):
            raise UsageError(f"the optimizer factory returned {type(built).__name__}, not a torch.optim.Optimizer")
        return built
    raise UsageError(f"optimizer must be a torch.optim.Optimizer or a callable params -> optimizer, got {type(optimizer).__name__}")


def _make_scheduler(scheduler: Any, optimizer: Any) -> Any:
    if scheduler is None or (hasattr(scheduler, "step") and hasattr(scheduler, "state_dict")):
        return scheduler
    if callable(scheduler):
        return scheduler(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
    raise UsageError(f"scheduler must be an LR scheduler or a callable optimizer -> scheduler, got {type(scheduler).__name__}")


def _validate(fabric: Fabric, model: Any, loader: Any, step_fn: StepFn, max_batches: Optional[int]) -> float:
    """Mean loss over (up to `max_batches` of) the validation data, averaged across ranks.

    Every submodule gets its own mode back (a part the user froze in eval mode stays so), and the
    RNG streams are put back where training left them, so validation (and its cadence) cannot
    change what training draws.
    """
    modes = [(module, module.training) for module in model.modules()]
    rng = state_lib.capture_rng()
    model.eval()
    total = torch.zeros(2, device=fabric.device)
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                total[0] += split_output(step_fn(model, fabric.to_device(batch)))[0].float()
                total[1] += 1
    finally:
        for module, training in modes:
            module.training = training
        for problem in state_lib.restore_rng(rng):
            log.warning("after validation: %s", problem)
    total = _all_reduce(fabric, total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()


def _finite(value: Any) -> Optional[float]:
    """A recorded metric as a float, or None when it is missing or not a finite number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _all_reduce(fabric: Fabric, tensor: torch.Tensor, op: str) -> torch.Tensor:
    """Fabric's all-reduce of one tensor (typed for what it returns for a tensor)."""
    return cast(torch.Tensor, fabric.all_reduce(tensor, reduce_op=op))


def _gather_objects(fabric: Fabric, value: Any) -> list[Any]:
    """Every rank's `value` (a short list of metric names) on every rank."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _agree(fabric: Fabric, flag: bool) -> bool:
    """True on every rank when it is true on any (signals may reach only some processes)."""
    if fabric.world_size == 1:
        return flag
    value = _all_reduce(fabric, torch.tensor(float(flag), device=fabric.device), "sum")
    return bool(value.item() > 0)


def _progress_bar(fabric: Fabric, cfg: Any, initial: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.max_steps,
        initial=initial,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=fabric.global_rank != 0 or not cfg.progress_bar,
        mininterval=0.5,
    )


def _info(fabric: Fabric, message: str) -> None:
    if fabric.global_rank == 0:
        log.info(message)
