"""Faults injected into each write of the save protocol, in-process through `faulty://`.

The promise under test: a fault-injecting fsspec wrapper fails or truncates each write of the save
protocol in turn; after each fault, resume uses the newest committed checkpoint and finishes
bit-identical to an uninterrupted run. Session 1 trains on `faulty://NAME` until a fault kills it
(`SimulatedCrash`); session 2 resumes the same run on plain `memory://NAME` with a freshly built,
identically seeded model. Whether a checkpoint is "really valid" is judged by an oracle that reads
the raw bytes of the store (`_valid_steps`), not by the library's own listing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import fsspec
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ckpt_files import stored_name
from faulty_fs import Fault, FaultPlan, SimulatedCrash, both, forget, in_step, in_steps_from, install, named, step_of
from helpers import assert_same_weights, committed_steps
from resilient_train import Trainer, TrainingStopped, seed_everything
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint import format as fmt
from resilient_train.errors import CheckpointError
from resilient_train.storage import Storage

try:
    import google_crc32c
except ImportError:  # pragma: no cover
    google_crc32c = None

MAX_STEPS, EVERY_N, KEEP_LAST = 12, 3, 2
VICTIM_STEP = 6  # the save whose writes are sabotaged (step 3 is committed by then)
# Every write of one save, in the order the protocol makes them (checked against a real save by
# test_the_fault_matrix_covers_every_write_of_a_save_in_order).
SAVE_FILES = ("model.safetensors", "state.safetensors", "rng-rank00000.json", "state.json", "manifest.json")


# -- a tiny run: dropout (bit-exact needs RNG restored), optimizer and scheduler factories --------
def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(96, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def _model() -> nn.Module:
    seed_everything(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def _training_step(crash_at: Optional[int] = None, sigterm_at: Optional[int] = None) -> Callable:
    """The loss; with `crash_at`, the process "dies" inside that step (one micro-batch per step);
    with `sigterm_at`, it receives SIGTERM there."""
    calls = 0

    def step(model: nn.Module, batch) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == crash_at:
            raise SimulatedCrash(f"simulated crash in step {calls}")
        if calls == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    return step


def _fit(url: str, crash_at: Optional[int] = None, sigterm_at: Optional[int] = None, **overrides) -> tuple:
    model = _model()
    settings = dict(max_steps=MAX_STEPS, batch_size=8, every_n_steps=EVERY_N, keep_last=KEEP_LAST, async_save="false",
                    progress_bar=False, accelerator="cpu")
    trainer = Trainer(run_dir=url, **{**settings, **overrides})
    result = trainer.fit(model, lambda params: torch.optim.AdamW(params, lr=0.01), _data(),
                         training_step=_training_step(crash_at, sigterm_at),
                         scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5))
    return result, _weights(model)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoint_weights(url: str) -> tuple[int, dict[str, torch.Tensor]]:
    loaded = CheckpointManager(Storage(url)).load_latest()
    assert loaded is not None, f"no valid checkpoint in {url}"
    return loaded.info.step, fmt.decode_model(loaded.files)


def _valid_steps(url: str) -> list[int]:
    """Oracle: steps whose manifest parses and lists files whose raw bytes match size and checksum."""
    store = fsspec.filesystem("memory").store
    root = fsspec.filesystem("memory")._strip_protocol(url.replace("faulty://", "memory://", 1)) + "/checkpoints/"
    steps = []
    for key in list(store):
        if not (key.startswith(root) and key.endswith("/manifest.json")):
            continue
        folder, step = key.rsplit("/", 1)[0], step_of(key)
        try:
            manifest = json.loads(store[key].getvalue())
        except ValueError:
            continue
        if manifest.get("step") == step and all(_matches(store.get(f"{folder}/{stored_name(name, record)}"), record)
                                                for name, record in manifest["files"].items()) \
                and all(_matches(store.get(f"{root}shared/{name}"), record) for name, record in manifest.get("shared", {}).items()):
            steps.append(step)
    return sorted(steps)


def _matches(entry, record: dict) -> bool:
    if entry is None:
        return False
    data = entry.getvalue()
    if len(data) != record["bytes"]:
        return False
    if "crc32c" in record and google_crc32c is not None:
        return f"{google_crc32c.value(data):08x}" == record["crc32c"]
    if "sha256" in record:
        return hashlib.sha256(data).hexdigest() == record["sha256"]
    return True


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
    weights: dict[str, torch.Tensor]
    checkpoint: dict[str, torch.Tensor]
    committed: list[int]
    plan: FaultPlan  # the write log of the uninterrupted run
    manifest_files: list[str]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Storage, "retry_base_delay", 0.001)


@pytest.fixture
def run() -> Iterator[Run]:
    r = Run(f"rt-faults-{uuid.uuid4().hex}/run")
    yield r
    forget(r.memory)


@pytest.fixture
def plan() -> Iterator[FaultPlan]:
    with install(FaultPlan()) as p:
        yield p


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """The library's log records (it may have turned propagation off in a plain script)."""
    monkeypatch.setattr(logging.getLogger("resilient_train"), "propagate", True)
    caplog.set_level(logging.INFO, logger="resilient_train")
    return caplog


@pytest.fixture(scope="module")
def baseline() -> Iterator[Baseline]:
    """An uninterrupted run, through `faulty://` with no faults so that its writes are logged."""
    r = Run(f"rt-faults-baseline-{uuid.uuid4().hex}/run")
    with install(FaultPlan()) as p:
        result, weights = _fit(r.faulty)
    assert result.step == MAX_STEPS and result.resumed_from is None
    step, checkpoint = _checkpoint_weights(r.memory)
    assert step == MAX_STEPS
    latest = CheckpointManager(Storage(r.memory)).load_latest()
    yield Baseline(weights, checkpoint, committed_steps(r.memory), p, list(latest.manifest["files"]))
    forget(r.memory)


def _assert_finished_like_baseline(url: str, result, weights, baseline: Baseline) -> None:
    assert result.step == MAX_STEPS
    assert_same_weights(weights, baseline.weights)
    step, checkpoint = _checkpoint_weights(url)
    assert step == MAX_STEPS
    assert_same_weights(checkpoint, baseline.checkpoint)


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# -- the write list the matrix covers --------------------------------------------------------------
def test_the_fault_matrix_covers_every_write_of_a_save_in_order(baseline: Baseline) -> None:
    discovered = set(baseline.manifest_files) | {"manifest.json"}
    assert set(SAVE_FILES) == discovered, "the save protocol changed: update SAVE_FILES"
    for step in range(EVERY_N, MAX_STEPS + 1, EVERY_N):
        assert tuple(baseline.plan.files_of(step)) == SAVE_FILES  # the manifest is written last
    assert baseline.plan.committed_steps() == [3, 6, 9, 12]
    assert all(w.outcome == "ok" for w in baseline.plan.writes)


def test_faulty_and_memory_urls_share_one_store(run: Run) -> None:
    Storage(run.faulty).write_bytes(b"written through faulty", "probe.bin")
    assert Storage(run.memory).read_bytes("probe.bin") == b"written through faulty"
    Storage(run.memory).write_bytes(b"and back", "probe.bin")
    assert Storage(run.faulty).read_bytes("probe.bin") == b"and back"


# -- crash or truncation at each write of a save: resume from the newest valid, bit-identical --------
@pytest.mark.parametrize("victim", SAVE_FILES)
@pytest.mark.parametrize("mode", ["crash", "truncate_crash", "truncate", "drop", "flip"])
def test_a_fault_at_any_write_of_a_save_resumes_from_the_newest_valid_checkpoint_bit_identical(
    run: Run, plan: FaultPlan, baseline: Baseline, mode: str, victim: str
) -> None:
    silent = mode in ("truncate", "drop", "flip")  # the process goes on; it dies later, in step 8
    plan.faults.append(Fault(mode, both(in_step(VICTIM_STEP), named(victim))))
    with pytest.raises(SimulatedCrash):
        _fit(run.faulty, crash_at=8 if silent else None)

    sabotaged = [w for w in plan.writes if w.outcome != "ok"]
    assert [(w.step, w.logical, w.outcome) for w in sabotaged] == [(VICTIM_STEP, victim, mode)]
    if silent:
        assert plan.files_of(VICTIM_STEP) == [f for f in SAVE_FILES if f != victim]  # all others landed
    else:  # the process died at this write: nothing after it was written
        assert plan.writes[-1] is sabotaged[0]
    valid = _valid_steps(run.memory)
    assert VICTIM_STEP not in valid and 3 in valid

    result, weights = _fit(run.memory)
    assert result.resumed_from == max(valid)
    if not silent:
        assert result.resumed_from == 3
    _assert_finished_like_baseline(run.memory, result, weights, baseline)
    assert committed_steps(run.memory) == baseline.committed  # the debris of step 6 was replaced


@pytest.mark.parametrize("victim", SAVE_FILES)
def test_a_crash_at_any_write_of_the_save_after_the_first_resumes_from_step_6(
    run: Run, plan: FaultPlan, baseline: Baseline, victim: str
) -> None:
    """Same at the step-9 save, where the newest valid checkpoint is step 6 (step 3 kept too)."""
    plan.faults.append(Fault("crash", both(in_step(9), named(victim))))
    with pytest.raises(SimulatedCrash):
        _fit(run.faulty)
    assert _valid_steps(run.memory) == [3, 6]
    result, weights = _fit(run.memory)
    assert result.resumed_from == 6
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


# -- transient and permanent write errors -----------------------------------------------------------
@pytest.mark.parametrize("victim", SAVE_FILES)
def test_a_transient_error_at_any_write_is_retried_and_changes_nothing(
    run: Run, plan: FaultPlan, baseline: Baseline, logs: pytest.LogCaptureFixture, victim: str
) -> None:
    target = both(in_step(VICTIM_STEP), named(victim))
    plan.faults.append(Fault("fail_once", target))
    result, weights = _fit(run.faulty)
    assert [w.outcome for w in plan.attempts(target)] == ["fail_once", "ok"]
    assert _warnings(logs, "retry 1/")
    assert not _warnings(logs, "checkpoint at step")  # the save itself succeeded
    assert plan.committed_steps() == [3, 6, 9, 12]
    assert result.resumed_from is None
    _assert_finished_like_baseline(run.memory, result, weights, baseline)
    assert committed_steps(run.memory) == baseline.committed


def test_a_save_that_keeps_failing_is_retried_at_the_next_step_and_training_goes_on(
    run: Run, plan: FaultPlan, baseline: Baseline, logs: pytest.LogCaptureFixture
) -> None:
    plan.faults.append(Fault("fail_always", in_step(VICTIM_STEP)))
    result, weights = _fit(run.faulty)
    failed = _warnings(logs, f"checkpoint at step {VICTIM_STEP} failed")
    assert len(failed) == 1 and "PermissionError" in failed[0] and "step-000000003" in failed[0]
    assert not _warnings(logs, "retry 1/")  # a permission error is not retried by storage
    assert plan.committed_steps() == [3, 7, 9, 12]  # step 7 is the retry of step 6
    assert CheckpointManager(Storage(run.memory)).info(VICTIM_STEP).status != "committed"
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


def test_too_many_failed_saves_in_a_row_stop_the_run_naming_the_last_valid_checkpoint(
    run: Run, plan: FaultPlan, baseline: Baseline, logs: pytest.LogCaptureFixture
) -> None:
    plan.faults.append(Fault("fail_always", in_steps_from(9)))
    with pytest.raises(CheckpointError, match=r"step 10 failed .*2 failure\(s\) in a row.*last valid checkpoint is \S*/checkpoints/step-000000006"):
        _fit(run.faulty, max_consecutive_failures=2)
    assert len(_warnings(logs, "checkpoint at step 9 failed")) == 1
    assert plan.committed_steps() == [3, 6]
    assert _valid_steps(run.memory) == [3, 6]  # nothing committed before the failures was touched
    assert not [p for p in plan.removed if step_of(p) in (3, 6)]
    result, weights = _fit(run.memory)
    assert result.resumed_from == 6
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


def test_a_transient_error_on_the_run_bookkeeping_files_is_retried(
    run: Run, plan: FaultPlan, baseline: Baseline
) -> None:
    """run.yaml, the lease, sessions.json and metrics.csv go through the same storage retries."""
    for name in ("run.yaml", "lease.json", "sessions.json", "metrics.csv"):
        plan.faults.append(Fault("fail_once", named(name)))
    result, weights = _fit(run.faulty)
    assert sorted(w.name for w in plan.writes if w.outcome == "fail_once") == ["lease.json", "metrics.csv", "run.yaml", "sessions.json"]
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


# -- retention must not trust a damaged newest checkpoint ---------------------------------------------
@pytest.mark.parametrize("mode", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_does_not_let_retention_prune_the_older_valid_one(
    run: Run, plan: FaultPlan, baseline: Baseline, mode: str
) -> None:
    """keep_last=1 would delete step 3 once step 6 is committed; step 6 landed short (truncate) or
    with a flipped byte (same size: only the checksum tells), so step 3 must survive."""
    plan.faults.append(Fault(mode, both(in_step(VICTIM_STEP), named("model.safetensors"))))
    with pytest.raises(SimulatedCrash):  # in step 7, before a retry of step 6 could be saved
        _fit(run.faulty, crash_at=7, keep_last=1)
    assert _valid_steps(run.memory) == [3]
    assert not [p for p in plan.removed if step_of(p) == 3]
    result, weights = _fit(run.memory, keep_last=1)
    assert result.resumed_from == 3
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


# -- a save that landed short is a failed save ---------------------------------------------------------
def test_a_save_that_landed_short_counts_as_failed_and_is_retried_at_the_next_step(
    run: Run, plan: FaultPlan, baseline: Baseline, logs: pytest.LogCaptureFixture
) -> None:
    plan.faults.append(Fault("truncate", both(in_step(VICTIM_STEP), named("model.safetensors"))))
    with pytest.raises(SimulatedCrash):
        _fit(run.faulty, crash_at=8)
    assert len(_warnings(logs, f"checkpoint at step {VICTIM_STEP} failed")) == 1
    assert _valid_steps(run.memory) == [3, 7]  # step 7 retried the damaged save: one step lost, not four
    result, weights = _fit(run.memory)
    assert result.resumed_from == 7
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


def test_a_final_save_that_landed_short_fails_the_run_instead_of_reporting_it(run: Run, plan: FaultPlan) -> None:
    plan.faults.append(Fault("truncate", both(in_step(MAX_STEPS), named("model.safetensors"))))
    with pytest.raises(CheckpointError, match=r"step 12 failed.*last valid checkpoint is \S*/checkpoints/step-000000009"):
        _fit(run.faulty)
    assert _valid_steps(run.memory) == [6, 9]  # nothing was pruned on the strength of the damaged one


# -- the run's other files ------------------------------------------------------------------------------
def test_a_metrics_file_that_cannot_be_written_does_not_stop_training(
    run: Run, plan: FaultPlan, baseline: Baseline, logs: pytest.LogCaptureFixture
) -> None:
    plan.faults.append(Fault("fail_always", named("metrics.csv")))
    result, weights = _fit(run.faulty)
    assert [m for m in _warnings(logs, "") if "metrics" in m]
    assert plan.committed_steps() == [3, 6, 9, 12]
    _assert_finished_like_baseline(run.memory, result, weights, baseline)


def test_sigterm_with_an_unwritable_metrics_file_still_stops_with_code_75(run: Run, plan: FaultPlan) -> None:
    plan.faults.append(Fault("fail_always", named("metrics.csv"), nth=2))  # written at step 3, not at 5
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as stopped:
        _fit(run.faulty, sigterm_at=5, log_every_n_steps=1)
    assert stopped.value.code == 75 and stopped.value.step == 5
    assert _valid_steps(run.memory) == [3, 5]
    assert signal.getsignal(signal.SIGTERM) is handler_before


# -- retention that cannot delete -------------------------------------------------------------------------
def test_a_checkpoint_that_cannot_be_pruned_does_not_count_as_a_failed_save(
    run: Run, plan: FaultPlan, baseline: Baseline, logs: pytest.LogCaptureFixture
) -> None:
    plan.faults.append(Fault("fail_always", in_step(3), on="remove"))  # retention wants it gone at step 9
    result, weights = _fit(run.faulty)
    assert not _warnings(logs, "retries at the next step")
    assert plan.committed_steps() == [3, 6, 9, 12]  # no save had to be retried
    assert result.checkpoint is not None and result.checkpoint.endswith("step-000000012")
    assert 3 in _valid_steps(run.memory)  # kept, since it could not be deleted
    assert [m for m in _warnings(logs, "") if "prun" in m.lower()]  # but the user is told
    _assert_finished_like_baseline(run.memory, result, weights, baseline)
