"""Saves in the background (`checkpoint.async_save`), in-process on `faulty://` / `memory://`.

An async save copies the state at the step boundary and writes it while training goes on; it must
commit the same checkpoints (byte for byte) as a sync save, report its failure at a later step,
honour `when_busy`, and a SIGTERM must still end with that step's checkpoint committed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ckpt_files import read_data
from faulty_fs import Fault, FaultPlan, SimulatedCrash, both, forget, in_step, in_steps_from, in_thread, install, named
from helpers import assert_same_weights
from resilient_train import Trainer, TrainingStopped, seed_everything
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint import format as fmt
from resilient_train.errors import CheckpointError
from resilient_train.storage import Storage

MAX_STEPS, EVERY_N, KEEP_LAST = 12, 3, 2
DATA_FILES = ("model.safetensors", "state.safetensors", "rng-rank00000.json", "state.json")


# -- a tiny run with dropout, optimizer and scheduler factories --------------------------------
def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def _model() -> nn.Module:
    seed_everything(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def _batchnorm_model() -> nn.Module:
    """BatchNorm changes its buffers (running statistics) in every training forward."""
    seed_everything(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


@dataclass
class Clock:
    """The step being trained (one micro-batch per step), and actions to run inside given steps
    (after that step's forward pass)."""

    step: int = 0
    actions: dict[int, Callable[[], None]] = field(default_factory=dict)

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        self.step += 1
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        if self.step in self.actions:
            self.actions[self.step]()
        return loss


def _fit(url: str, clock: Optional[Clock] = None, model_fn: Callable[[], nn.Module] = _model, **overrides) -> tuple:
    model = model_fn()
    settings = dict(max_steps=MAX_STEPS, batch_size=8, every_n_steps=EVERY_N, keep_last=KEEP_LAST, async_save="true",
                    progress_bar=False, accelerator="cpu")
    trainer = Trainer(run_dir=url, **{**settings, **overrides})
    result = trainer.fit(model, lambda params: torch.optim.AdamW(params, lr=0.01), _data(),
                         training_step=(clock or Clock()).training_step,
                         scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5))
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def _manager(url: str) -> CheckpointManager:
    return CheckpointManager(Storage(url))


def _committed(url: str) -> list[int]:
    return [i.step for i in _manager(url).list() if i.status == "committed"]


def _valid(url: str) -> list[int]:
    manager = _manager(url)
    return [i.step for i in manager.list() if i.status == "committed" and not manager.verify(i)]


def _final_checkpoint_weights(url: str) -> tuple[int, dict[str, torch.Tensor]]:
    loaded = _manager(url).load_latest()
    assert loaded is not None
    return loaded.info.step, fmt.decode_model(loaded.files)


# -- fixtures --------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str

    @property
    def faulty(self) -> str:
        return f"faulty://{self.name}"

    @property
    def memory(self) -> str:
        return f"memory://{self.name}"


@dataclass
class Baseline:
    url: str
    weights: dict[str, torch.Tensor]
    committed: list[int]


class StepLog(logging.Handler):
    """The library's log records, each with the training step it was emitted in."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.clock = Clock()
        self.records: list[tuple[int, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((self.clock.step, record.levelno, record.getMessage()))

    def find(self, text: str, level: int = logging.DEBUG) -> list[tuple[int, str]]:
        return [(step, msg) for step, lvl, msg in self.records if lvl >= level and text in msg]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Storage, "retry_base_delay", 0.001)


@pytest.fixture
def run() -> Iterator[Run]:
    r = Run(f"rt-async-{uuid.uuid4().hex}/run")
    yield r
    forget(r.memory)


@pytest.fixture
def plan() -> Iterator[FaultPlan]:
    with install(FaultPlan()) as p:
        yield p


@pytest.fixture
def steplog(caplog: pytest.LogCaptureFixture) -> Iterator[StepLog]:
    caplog.set_level(logging.INFO, logger="resilient_train")  # restored after the test
    handler = StepLog()
    logger = logging.getLogger("resilient_train")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def baseline() -> Iterator[Baseline]:
    """An uninterrupted run with sync saves."""
    url = f"memory://rt-async-baseline-{uuid.uuid4().hex}/run"
    result, weights = _fit(url, async_save="false")
    assert result.step == MAX_STEPS
    yield Baseline(url, weights, _committed(url))
    forget(url)


def _assert_finished_like_baseline(url: str, result, weights, baseline: Baseline) -> None:
    assert result.step == MAX_STEPS
    assert_same_weights(weights, baseline.weights)
    step, final = _final_checkpoint_weights(url)
    assert step == MAX_STEPS
    assert_same_weights(final, baseline.weights)


# -- async == sync -------------------------------------------------------------------------------
def test_async_saves_commit_the_same_checkpoints_byte_for_byte_as_sync_saves(
    run: Run, plan: FaultPlan, baseline: Baseline
) -> None:
    # hold the step-9 writer at its first read (the lease check, before it serialises anything)
    # until training reached step 11: what it writes must still be the state of step 9
    release = threading.Event()
    clock = Clock(actions={11: release.set})
    plan.faults.append(Fault("delay", both(named("lease.json"), in_thread("checkpoint-9")), on="read",
                             seconds=30, release=release))
    result, weights = _fit(run.faulty, clock=clock)
    assert release.is_set() and plan.faults[0].fired >= 1
    assert plan.committed_steps() == [3, 6, 9, 12]
    assert {w.thread for w in plan.writes if w.step == 9} == {"checkpoint-9"}  # really in the background
    _assert_finished_like_baseline(run.memory, result, weights, baseline)
    assert _committed(run.memory) == baseline.committed == [9, 12]
    for name in DATA_FILES:  # the state of step 9, not of a later step the writer saw
        assert read_data(run.memory, 9, name) == read_data(baseline.url, 9, name), name


def test_an_async_save_stores_the_state_of_its_step_while_training_goes_on(
    run: Run, plan: FaultPlan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward is not read-only (BatchNorm updates its running statistics in place) and the next
    optimizer step changes the weights: what a background save stores must still be its own step's."""
    sync_url = f"memory://rt-async-sync-{uuid.uuid4().hex}/run"
    try:
        _, sync_weights = _fit(sync_url, model_fn=_batchnorm_model, async_save="false")
        # Wherever the copy into host buffers runs, the step-9 writer thread reaches it only when
        # training is in step 11 (after step 10's forward and optimizer step), or after 0.5 s if
        # training is (rightly) waiting for the copy. The main thread never waits here.
        step_11 = threading.Event()
        copy, held = fmt.HostBuffers.copy, []

        def late_copy(self, name, key, tensor):
            if threading.current_thread().name == "checkpoint-9" and not held:
                held.append(step_11.wait(0.5))
            return copy(self, name, key, tensor)

        monkeypatch.setattr(fmt.HostBuffers, "copy", late_copy)
        result, weights = _fit(run.faulty, clock=Clock(actions={11: step_11.set}), model_fn=_batchnorm_model)
        assert_same_weights(weights, sync_weights)  # training itself is unaffected
        assert plan.committed_steps() == [3, 6, 9, 12]
        for name in DATA_FILES:
            assert read_data(run.memory, 9, name) == read_data(sync_url, 9, name), name
    finally:
        forget(sync_url)


# -- failures in the background -----------------------------------------------------------------
def _writer_done(step: int) -> Callable[[], None]:
    """An action that waits until the background save of `step` has finished."""
    def wait() -> None:
        _wait_for(lambda: not any(t.name == f"checkpoint-{step}" and t.is_alive() for t in threading.enumerate()))
    return wait


def test_a_failed_background_save_is_reported_at_a_later_step_and_retried(
    run: Run, plan: FaultPlan, baseline: Baseline, steplog: StepLog
) -> None:
    plan.faults.append(Fault("fail_always", in_step(6)))
    # pin the timing: each background save is over before the end of the next step
    steplog.clock.actions.update({7: _writer_done(6), 8: _writer_done(7)})
    result, weights = _fit(run.faulty, clock=steplog.clock)
    failed = steplog.find("checkpoint at step 6 failed", logging.WARNING)
    assert len(failed) == 1 and "PermissionError" in failed[0][1]
    assert failed[0][0] == 7  # surfaced by the main thread at the end of the next step
    assert plan.committed_steps() == [3, 7, 9, 12]  # and retried there
    assert _manager(run.memory).info(6).status != "committed"
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


def test_a_retry_still_being_written_does_not_trigger_another_save(
    run: Run, plan: FaultPlan, steplog: StepLog
) -> None:
    """The retry of step 6 runs at step 7 and is still being written at step 8: step 8 is not due
    (an extra save there would block training waiting for the retry)."""
    plan.faults.append(Fault("fail_always", in_step(6)))
    plan.faults.append(Fault("delay", both(in_step(7), named("manifest.json")), seconds=0.3))
    steplog.clock.actions[7] = _writer_done(6)
    _fit(run.faulty, clock=steplog.clock)
    assert [step for step, _ in steplog.find("checkpoint at step 6 failed", logging.WARNING)] == [7]
    assert plan.committed_steps() == [3, 7, 9, 12]


def test_too_many_failed_background_saves_stop_the_run_with_a_checkpoint_error(
    run: Run, plan: FaultPlan, baseline: Baseline
) -> None:
    plan.faults.append(Fault("fail_always", in_steps_from(9)))
    with pytest.raises(CheckpointError, match=r"2 failure\(s\) in a row.*last valid checkpoint is \S*/checkpoints/step-000000006"):
        _fit(run.faulty, max_consecutive_failures=2)
    assert plan.committed_steps() == [3, 6]
    assert _valid(run.memory) == [3, 6]  # nothing committed earlier was touched
    result, weights = _fit(run.memory)
    assert result.resumed_from == 6
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


# -- a save due while one is in flight ------------------------------------------------------------
def test_when_busy_skip_skips_saves_due_while_a_slow_save_is_in_flight(
    run: Run, plan: FaultPlan, baseline: Baseline, steplog: StepLog
) -> None:
    release = threading.Event()  # the step-3 save hangs until training reached step 10
    steplog.clock.actions[10] = release.set
    plan.faults.append(Fault("delay", in_step(3), seconds=30, release=release))
    result, weights = _fit(run.faulty, clock=steplog.clock, when_busy="skip")
    assert [step for step, _ in steplog.find("skipped")] == [6, 9]
    assert all("checkpoint.when_busy=skip" in msg for _, msg in steplog.find("skipped"))
    assert plan.committed_steps() == [3, 12]
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


def test_when_busy_wait_commits_every_due_step_behind_a_slow_save(
    run: Run, plan: FaultPlan, baseline: Baseline, steplog: StepLog
) -> None:
    plan.faults.append(Fault("delay", both(in_step(3), named("manifest.json")), seconds=0.3))
    result, weights = _fit(run.faulty, clock=steplog.clock, when_busy="wait")
    assert not steplog.find("skipped")
    assert plan.committed_steps() == [3, 6, 9, 12]
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


# -- stopping --------------------------------------------------------------------------------------
def test_sigterm_stops_an_async_run_only_after_that_steps_checkpoint_is_committed(
    run: Run, plan: FaultPlan, baseline: Baseline
) -> None:
    # the step-3 save is still being written when SIGTERM arrives in step 5
    plan.faults.append(Fault("delay", both(in_step(3), named("manifest.json")), seconds=0.3))
    plan.faults.append(Fault("delay", both(in_step(5), named("manifest.json")), seconds=0.1))
    clock = Clock(actions={5: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        _fit(run.faulty, clock=clock)
    assert isinstance(stopped.value, SystemExit) and stopped.value.code == 75
    assert stopped.value.step == 5 and stopped.value.reason == "SIGTERM"
    assert clock.step == 5  # no step after the signal's
    assert plan.committed_steps() == [3, 5]
    assert _valid(run.memory) == [3, 5]
    assert signal.getsignal(signal.SIGTERM) is handler_before

    result, weights = _fit(run.memory)
    assert result.resumed_from == 5
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


def test_a_failed_save_on_sigterm_fails_the_run_instead_of_reporting_a_clean_stop(
    run: Run, plan: FaultPlan
) -> None:
    plan.faults.append(Fault("fail_always", in_step(5)))
    clock = Clock(actions={5: lambda: os.kill(os.getpid(), signal.SIGTERM)})
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(CheckpointError, match=r"step 5 failed.*last valid checkpoint is \S*/checkpoints/step-000000003") as failed:
        _fit(run.faulty, clock=clock)
    assert not isinstance(failed.value, SystemExit)  # exit 1, never 75: there is nothing to resume from at 5
    assert _valid(run.memory) == [3]
    assert signal.getsignal(signal.SIGTERM) is handler_before


# -- dying while a background save is in flight ---------------------------------------------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crash_while_a_background_save_is_in_flight_resumes_from_the_previous_checkpoint(
    run: Run, plan: FaultPlan, baseline: Baseline
) -> None:
    release = threading.Event()  # the step-6 manifest waits; the process dies in step 8

    def manifest_reached() -> bool:
        return any(w.step == 6 and w.name == "manifest.json" for w in plan.writes)

    def die() -> None:
        _wait_for(manifest_reached)  # the writer may lag behind training on a busy machine
        plan.kill()
        release.set()
        raise SimulatedCrash("simulated crash in step 8")

    plan.faults.append(Fault("delay", both(in_step(6), named("manifest.json")), seconds=30, release=release))
    with pytest.raises(SimulatedCrash):
        _fit(run.faulty, clock=Clock(actions={8: die}))
    for thread in threading.enumerate():
        if thread.name == "checkpoint-6":
            thread.join(10)
    assert plan.committed_steps() == [3]
    assert set(plan.files_of(6)) == set(DATA_FILES)  # everything but the manifest had landed
    assert _valid(run.memory) == [3]
    result, weights = _fit(run.memory)
    assert result.resumed_from == 3
    _assert_finished_like_baseline(run.memory, result, weights, baseline)
    assert _committed(run.memory) == baseline.committed


# -- auto ------------------------------------------------------------------------------------------
def test_async_save_auto_logs_its_decision_after_the_second_save_and_changes_nothing(
    run: Run, plan: FaultPlan, baseline: Baseline, steplog: StepLog
) -> None:
    result, weights = _fit(run.faulty, clock=steplog.clock, async_save="auto")
    decisions = steplog.find("async_save=auto")
    assert len(decisions) == 1
    step, message = decisions[0]
    assert step >= 6 and ("using async saves" in message or "using sync saves" in message)
    threads = {w.step: w.thread for w in plan.writes if w.name == "manifest.json"}
    assert threads[3] == "MainThread" and threads[6] == "checkpoint-6"  # measured: one sync, one async
    assert plan.committed_steps() == [3, 6, 9, 12]
    _assert_finished_like_baseline(run.memory, result, weights, baseline)
