"""The loop: read it top to bottom.

Each optimizer step: forward/backward over the step's batches, clip, update, schedule; then the
log window, validation, the session deadline, and a save when one is due or the run must stop.
Under DDP "stop" and "time-based save" are agreed a step late without a host sync (agreement.py).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

from resilient_train import state as state_lib
from resilient_train.agreement import StepAgreement
from resilient_train.checkpoint import format as fmt
from resilient_train.config import TrainerConfig
from resilient_train.deadline import SessionDeadline, budget_seconds, session_elapsed_offset
from resilient_train.errors import EXIT_STOPPED, StoppedMidStep, TrainingStopped
from resilient_train.loop.comm import info
from resilient_train.loop.session import Session
from resilient_train.loop.validate import validate
from resilient_train.loop.window import LogWindow, progress_bar
from resilient_train.preemption import WORKER_LOSS
from resilient_train.run.metrics import MetricsLogger
from resilient_train.runtime import peers_notice_a_leaver, stop_watching_children


def train(session: Session) -> tuple[Optional[float], Optional[float]]:
    """Steps to `max_steps` (or `max_epochs`); returns (last loss, last val loss)."""
    s, fabric, saver, progress = session.setup, session.setup.fabric, session.saver, session.progress
    tcfg, (model, optimizer, scheduler, _) = s.cfg.trainer, (s.parts.model, s.parts.optimizer, s.parts.scheduler, s.parts.scaler)
    deadline = _deadline(session)
    metrics = MetricsLogger.for_run(s.run, session.number, s.cfg, progress.step) if fabric.global_rank == 0 else None
    window = LogWindow(fabric, tcfg, metrics, progress_bar(fabric, tcfg, progress.step), s.layout.global_batch)
    agreement = StepAgreement(fabric.world_size, fabric.global_rank)
    loss: Optional[float] = None  # measured in this session: what its checkpoints record
    val_loss: Optional[float] = None
    with _closing(window, agreement):
        while progress.step < tcfg.max_steps and not _epochs_done(tcfg, s.stream):
            loss_sum = _forward_backward(session, window)
            saver.before_update()  # a background save finishes copying the state first
            if tcfg.gradient_clip_val is not None:
                fabric.clip_gradients(model, optimizer, max_norm=tcfg.gradient_clip_val)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            progress.step += 1
            progress.epoch, progress.cursor = s.stream.epoch, s.stream.cursor
            window.step_done()
            saver.on_step_end()  # surfaces a background save's outcome
            session.record_config()  # run.yaml says this config once a step of it succeeded

            step = progress.step
            last_step = step == tcfg.max_steps or _epochs_done(tcfg, s.stream)
            if window.due(step, last_step):
                loss = window.close(step, progress.epoch, loss_sum, s.micro_batches, optimizer.param_groups[0]["lr"])
            if s.val_loader is not None and ((tcfg.val_every_n_steps and step % tcfg.val_every_n_steps == 0) or last_step):
                val_loss = _validate(session, metrics, val_loss)
            if deadline is not None and deadline.expired(saver.slowest_save):
                session.stop.request("session budget")
            # no host sync per step: under DDP these are the flags all ranks raised a step ago
            stopping, time_due = agreement.exchange(session.stop.reason is not None, saver.policy.time_due())
            if stopping or last_step or saver.due(step, time_due):
                if metrics is not None:  # before the commit: a kill right after it loses no rows
                    metrics.flush()
                saver.save(step, lambda: _capture(session), {"loss": loss, "val_loss": val_loss}, final=stopping or last_step)
            if stopping or last_step:  # every rank reached the final commit: a child done first must not end this one
                stop_watching_children(fabric)
            if stopping:
                saver.finish()
                stopped = TrainingStopped(step, session.stop.reason or "another rank", rank=fabric.global_rank)
                info(fabric, str(stopped))  # the one line that says it (the CLI prints nothing more)
                raise stopped
        saver.finish()
    # a session that logged nothing (a finished run fitted again) reports the checkpoint's losses
    recorded = session.resumed.metrics
    return (loss if loss is not None else _finite(recorded.get("loss")),
            val_loss if val_loss is not None else _finite(recorded.get("val_loss")))


def _forward_backward(session: Session, window: LogWindow) -> Any:
    """The step's forward and backward passes; a stop whose signal killed the DataLoader workers
    before the step had its batches, or made another rank leave the step's all-reduce that way,
    ends the run here (StoppedMidStep, exit 75, nothing saved)."""
    try:
        return session.forward_backward.run(session.progress, window.custom)
    except WORKER_LOSS as exc:
        cause = session.stop.explains(exc)
        if cause is None:
            raise
        raise _stopped_mid_step(session, cause, exc) from exc


def _stopped_mid_step(session: Session, cause: str, exc: BaseException, in_validation: bool = False) -> StoppedMidStep:
    """The StoppedMidStep to raise, said once, after the background save in flight has finished.

    Under gloo every rank learns that another one left (`explains`), so the ranks all end here
    and a child's 75 must not get the main process killed (`stop_watching_children`, code 0 in
    a child). Under NCCL a rank waiting in a collective learns nothing, and Lightning's observer
    killing the main process when a child exits 75 is what ends it (in seconds, not at the
    collective's timeout): there the children keep 75 and the watch stays.
    """
    fabric = session.setup.fabric
    peers_notice = peers_notice_a_leaver(fabric)
    if peers_notice:
        stop_watching_children(fabric)
    session.saver.finish()
    lost = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}"
    stopped = StoppedMidStep(session.progress.step, session.stop.reason or "a stop", session.saver.last_path,
                             rank=fabric.global_rank, lost=lost, cause=cause, in_validation=in_validation,
                             code=None if peers_notice else EXIT_STOPPED)
    info(fabric, str(stopped))
    return stopped


def _capture(session: Session) -> fmt.Snapshot:
    """The whole training state at this step boundary (the saver calls it when it saves)."""
    p = session.setup.parts
    return state_lib.capture(p.model, p.optimizer, p.scheduler, p.scaler, session.progress, data=session.setup.stream.state_dict())


def _validate(session: Session, metrics: Optional[MetricsLogger], last: Optional[float]) -> Optional[float]:
    """Validate, keep the best val_loss in the progress record, and report it with the val_<name>
    averages of the metrics training_step returns. A validation whose DataLoader workers died of
    the stop signal is not recorded (`last` is kept); training's state is untouched by it, so the
    run still saves at this step. Under DDP it ends the run instead (StoppedMidStep, nothing saved):
    the other ranks may still be in the validation's collectives (its final all-reduce, DDP's
    buffer broadcast), which a save's collectives must not meet."""
    s, progress = session.setup, session.progress
    try:
        values = validate(s.fabric, s.parts.model, s.val_loader, s.step_fn, s.cfg.trainer.val_batches)
    except WORKER_LOSS as exc:
        cause = session.stop.explains(exc)
        if cause is None:
            raise
        if s.fabric.world_size > 1:  # the ranks may be at different collectives now: none can go on to save
            raise _stopped_mid_step(session, cause, exc, in_validation=True) from exc
        info(s.fabric, f"step {progress.step}: validation cut short ({session.stop.reason} reached its DataLoader workers); not recorded")
        return last
    val_loss = values["val_loss"]
    best = progress.best.get("val_loss")
    if best is None or val_loss < best:
        progress.best["val_loss"] = val_loss
    info(s.fabric, f"step {progress.step}: " + " ".join(f"{name} {value:.4f}" for name, value in values.items()))
    if metrics is not None:
        metrics.log(progress.step, epoch=progress.epoch, **values)
    return val_loss


def _deadline(session: Session) -> Optional[SessionDeadline]:
    """The session budget (Colab's limit by default on Colab), announced once; None when unlimited."""
    budget = budget_seconds(session.setup.cfg.checkpoint.session_budget)
    if not budget:
        return None
    info(session.setup.fabric, f"session budget {_duration(budget)}: the run saves and exits 75 before it runs out")
    return SessionDeadline(budget, session_elapsed_offset())


@contextlib.contextmanager
def _closing(window: LogWindow, agreement: StepAgreement) -> Iterator[None]:
    """Close the progress bar and flush metrics however the loop ends (done, stopped, crashed)."""
    try:
        try:
            yield
        except StoppedMidStep:
            raise  # ranks that stop mid-step are at no common boundary: the exchange in flight may never finish
        except TrainingStopped:
            agreement.close()  # every rank stops at the same step with one exchange in flight
            raise
        agreement.close()
    finally:
        window.bar.close()
        if window.metrics is not None:
            window.metrics.close()


def _epochs_done(cfg: TrainerConfig, stream: Any) -> bool:
    """Whether `trainer.max_epochs` full passes over the data are behind (never, when unset)."""
    return cfg.max_epochs is not None and stream.completed_epochs >= cfg.max_epochs


def _finite(value: Any) -> Optional[float]:
    """A recorded metric as a float, or None when it is missing or not a finite number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
