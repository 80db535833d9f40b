"""The crash-consistency matrix: the process dies at each storage call of a save, a mirror copy
and a sync in turn; whatever was committed survives and the resume is bit-identical.

Every call the library makes through `faulty://` (list, exists, read, write, remove) is a crash
point: the process "dies" there (`SimulatedCrash`, and every later call from any thread dies
too, as when the process is killed). Points:
- save: every call from the start of step 6 to the start of step 7, i.e. the whole save of step
  6 (files, commit, retention pruning step 3 with keep_last=1, garbage collection, metrics);
- mirror: every call of the background mirror thread copying the run;
- sync: every call of `sync` copying a finished run.
After each crash an oracle that reads the raw store (not the library's listing) says which
checkpoints are valid; resume must start from the newest of them (no lost work) and end
bit-identical to an uninterrupted run; a sync run again must complete the copy. The table is
printed in the test output (run with `-s` or see the captured output) and in
docs/checkpoint-format.md. 2-process DDP crash points are covered by `make chaos` (ckpt-chaos).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from faulty_fs import FaultPlan, SimulatedCrash, forget, install
from resilient_train import Trainer, seed_everything
from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
from resilient_train.checkpoint.transfer import sync_run
from resilient_train.storage import Storage
from test_faults import _valid_steps

MAX_STEPS, EVERY_N = 9, 3


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


FROZEN = {"frozen": False}  # the model of the current matrix: with a frozen layer (shared files) or not


def _fit(url: str, on_step: Callable[[int], None] = lambda n: None, **overrides) -> tuple[object, dict[str, torch.Tensor]]:
    seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    if FROZEN["frozen"]:  # a frozen first layer and BatchNorm buffers: the save writes and references shared files
        model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
        model[0].requires_grad_(False)
    calls = [0]

    def step(model: nn.Module, batch) -> torch.Tensor:
        calls[0] += 1
        on_step(calls[0])
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    settings = dict(max_steps=MAX_STEPS, batch_size=8, every_n_steps=EVERY_N, keep_last=1, async_save="false",
                    progress_bar=False, accelerator="cpu")
    trainer = Trainer(run_dir=url, **{**settings, **overrides})
    result = trainer.fit(model, lambda params: torch.optim.AdamW(params, lr=0.01), _data(), training_step=step)
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _memory(url: str) -> str:
    return url.replace("faulty://", "memory://", 1)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class Row:
    point: int
    op: str
    path: str
    valid_at_crash: list[int]
    outcome: str

    def line(self) -> str:
        return f"{self.point:>4}  {self.op:<7} {self.path:<44} {str(self.valid_at_crash):<10} {self.outcome}"


def _short(path: str) -> str:
    parts = path.split("/")
    for anchor in ("checkpoints", "logs", "task"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])[-44:]
    return parts[-1][-44:]


def _print(capsys: pytest.CaptureFixture, title: str, rows: list[Row], full: bool = True) -> None:
    """The table in the test output: every row, or (`full=False`) counts per operation and any failure."""
    passed = sum(r.outcome.startswith("PASS") for r in rows)
    with capsys.disabled():
        print(f"\n{title}: {len(rows)} crash points, {passed} PASS")
        if not full:
            ops = sorted({r.op for r in rows})
            print("  by operation: " + ", ".join(
                f"{op} {sum(r.op == op and r.outcome.startswith('PASS') for r in rows)}/{sum(r.op == op for r in rows)}" for op in ops))
        shown = rows if full else [r for r in rows if not r.outcome.startswith("PASS")]
        if shown:
            print(f"{'#':>4}  {'op':<7} {'path':<44} {'valid':<10} outcome")
        for row in shown:
            print(row.line())


@pytest.fixture(scope="module", params=["plain", "frozen"])
def straight(request: pytest.FixtureRequest) -> Iterator[dict[str, torch.Tensor]]:
    """The uninterrupted run, for a plain model and for one whose frozen layer lives in shared files."""
    FROZEN["frozen"] = request.param == "frozen"
    url = f"memory://rt-matrix-straight-{uuid.uuid4().hex}/run"
    try:
        yield _fit(url)[1]
    finally:
        forget(url)
        FROZEN["frozen"] = False


def test_a_crash_at_any_storage_call_of_a_save_loses_nothing_committed(straight, capsys) -> None:
    record_url = f"faulty://rt-matrix-rec-{uuid.uuid4().hex}/run"
    record = FaultPlan()
    marks: dict[int, int] = {}
    with install(record):
        _fit(record_url, on_step=lambda n: marks.setdefault(n, len(record.calls)))
    forget(record_url)
    first, last = marks[6], marks[7]  # the calls of step 6's save (and its metrics flush)
    assert last - first >= 8, record.calls[first:last]
    points = list(range(first + 1, last + 1))
    if FROZEN["frozen"]:  # and the first save, which creates the shared files
        points = list(range(marks[3] + 1, marks[4] + 1)) + points
        assert any("/shared/" in path and op == "write" for op, path in record.calls[marks[3]:marks[4]])

    rows: list[Row] = []
    for point in points:
        url = f"faulty://rt-matrix-{uuid.uuid4().hex}/run"
        plan = FaultPlan(crash_at=point)
        try:
            with install(plan):
                with pytest.raises(SimulatedCrash):
                    _fit(url)
            op, path, _ = plan.crashed
            valid = _valid_steps(url)
            result, weights = _fit(_memory(url))
            problems = []
            newest = max(valid) if valid else None  # a crash in the first save leaves nothing to resume
            if result.resumed_from != newest:
                problems.append(f"resumed from {result.resumed_from}, newest valid {newest}")
            if not _same(weights, straight):
                problems.append("weights differ")
            manager = CheckpointManager(Storage(_memory(url)))
            if any(manager.verify(i) for i in manager.list() if i.status == COMMITTED):
                problems.append("a committed checkpoint does not verify")
            rows.append(Row(point - marks[3] if point <= marks[4] and FROZEN["frozen"] else point - first, op, _short(path), valid,
                            "PASS (resumed from %s, bit-identical)" % result.resumed_from if not problems else "FAIL: " + "; ".join(problems)))
        finally:
            forget(url)
    what = "saves of steps 3 and 6, shared files" if FROZEN["frozen"] else "save of step 6"
    _print(capsys, f"crash matrix: {what} (write files, commit, prune step 3, collect, metrics)", rows)
    assert all(r.outcome.startswith("PASS") for r in rows), [r.line() for r in rows if not r.outcome.startswith("PASS")]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the mirror thread "dies"
def test_a_crash_at_any_storage_call_of_the_mirror_loses_nothing_committed(straight, capsys) -> None:
    mirror_thread = lambda op, path, thread: thread == "checkpoint-mirror"  # noqa: E731
    record_url, record_mirror = f"faulty://rt-mrec-{uuid.uuid4().hex}/run", f"faulty://rt-mrec-{uuid.uuid4().hex}/mirror"
    record = FaultPlan()
    with install(record):
        _fit(record_url, mirror=record_mirror)
    count = sum(1 for t in record.threads if t == "checkpoint-mirror")
    forget(record_url), forget(record_mirror)
    assert count >= 10

    rows: list[Row] = []
    for point in range(1, count + 1):
        url, mirror = f"faulty://rt-mx-{uuid.uuid4().hex}/run", f"faulty://rt-mx-{uuid.uuid4().hex}/mirror"
        plan = FaultPlan(crash_at=point, crash_where=mirror_thread)
        try:
            with install(plan):
                try:
                    _fit(url, mirror=mirror)
                except SimulatedCrash:
                    pass
            if plan.crashed is None:  # the run ended before the mirror made this many calls
                continue
            op, path, _ = plan.crashed
            valid, at_mirror = _valid_steps(url), _valid_steps(mirror)
            problems = []
            mirror_manager = CheckpointManager(Storage(_memory(mirror)))
            committed_mirror = [i.step for i in mirror_manager.list() if i.status == COMMITTED]
            if committed_mirror != at_mirror:
                problems.append(f"mirror lists {committed_mirror} committed, valid {at_mirror}")
            result, weights = _fit(_memory(url), mirror=_memory(mirror))
            newest = max(valid + at_mirror)
            if result.resumed_from != newest:
                problems.append(f"resumed from {result.resumed_from}, newest valid {newest}")
            if not _same(weights, straight):
                problems.append("weights differ")
            rows.append(Row(point, op, _short(path), sorted(set(valid) | set(at_mirror)),
                            "PASS (resumed from %s, bit-identical)" % result.resumed_from if not problems else "FAIL: " + "; ".join(problems)))
        finally:
            forget(url), forget(mirror)
    _print(capsys, "crash matrix: background mirror copying the run", rows, full=False)
    assert rows and all(r.outcome.startswith("PASS") for r in rows), [r.line() for r in rows if not r.outcome.startswith("PASS")]


def test_a_crash_at_any_storage_call_of_sync_leaves_a_destination_that_a_second_sync_completes(straight, capsys) -> None:
    src = f"memory://rt-sync-src-{uuid.uuid4().hex}/run"
    _fit(src, keep_last=None)
    source_steps = [i.step for i in CheckpointManager(Storage(src)).list() if i.status == COMMITTED]
    record_dst = f"faulty://rt-sync-rec-{uuid.uuid4().hex}/run"
    record = FaultPlan()
    with install(record):
        sync_run(Storage(src), Storage(record_dst))
    count = len(record.calls)
    forget(record_dst)

    rows: list[Row] = []
    for point in range(1, count + 1):
        dst = f"faulty://rt-sync-{uuid.uuid4().hex}/run"
        plan = FaultPlan(crash_at=point)
        try:
            with install(plan), pytest.raises(SimulatedCrash):
                sync_run(Storage(src), Storage(dst))
            op, path, _ = plan.crashed
            valid = _valid_steps(dst)
            problems = []
            listed = [i.step for i in CheckpointManager(Storage(_memory(dst))).list() if i.status == COMMITTED]
            if listed != valid:
                problems.append(f"lists {listed} committed, valid {valid}")
            report = sync_run(Storage(src), Storage(_memory(dst)))
            after = [i.step for i in CheckpointManager(Storage(_memory(dst))).list() if i.status == COMMITTED]
            if after != source_steps or report.conflicts or report.corrupt:
                problems.append(f"second sync left {after}, conflicts {report.conflicts}")
            rows.append(Row(point, op, _short(path), valid, "PASS (second sync complete)" if not problems else "FAIL: " + "; ".join(problems)))
        finally:
            forget(dst)
    forget(src)
    _print(capsys, "crash matrix: sync of a finished run", rows, full=False)
    assert all(r.outcome.startswith("PASS") for r in rows), [r.line() for r in rows if not r.outcome.startswith("PASS")]
