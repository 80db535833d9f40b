"""The write-once commit protocol against late writers, crashes, full disks and its storage budget.

Issue 8, cases 1 and 6: a stale writer whose writes land after a newer session committed and
pruned must not damage anything; debris of dead writers is collected; a disk that holds
`keep_last` checkpoints but not one more still makes progress; one save costs a bounded number
of storage calls and never downloads what it just wrote.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any, Callable

import pytest

from ckpt_files import data_path, flip_byte
from faulty_fs import FaultPlan, forget, install
from resilient_train.checkpoint.collective import Collective
from resilient_train.checkpoint.lease import LEASE, Lease
from resilient_train.checkpoint.manager import COMMITTED, INCOMPLETE, CheckpointManager
from resilient_train.checkpoint.manifest import MANIFEST, step_dir
from resilient_train.checkpoint.protocol import CommitProtocol, Result
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.storage import Storage


def _files(step: int, who: str, size: int = 256) -> dict[str, bytes]:
    return {
        "model.safetensors": (who.encode() * size)[:size] + bytes([step % 256]),
        "state.json": f'{{"step": {step}, "who": "{who}"}}'.encode(),
        "rng-rank00000.json": b'{"python": 1}',
    }


def _session(run: Storage, keep_last: int = 1) -> CommitProtocol:
    """One incarnation of the run: takes the lease, saves through the real protocol."""
    return CommitProtocol(CheckpointManager(run), Collective(1, 0), RetentionPolicy(keep_last=keep_last), Lease.acquire(run))


def _save(session: CommitProtocol, step: int, who: str, files: Callable[[], dict[str, Any]] | None = None):
    return session.run(step, files or (lambda: _files(step, who)), {"epoch": 0})


def _logical(run: Storage, step: int) -> dict[str, bytes]:
    manager = CheckpointManager(run)
    return manager.load(manager.info(step)).files


@pytest.fixture
def run(storage: Storage) -> Storage:
    """The run folder: the shared `storage` fixture (storage_backends.py), on every backend."""
    return storage


# -- case 1: a stale writer ------------------------------------------------------------------------
def test_a_stale_writer_whose_writes_land_late_does_not_damage_the_newer_sessions_checkpoint(run: Storage) -> None:
    old = _session(run)
    assert _save(old, 5, "old").result is Result.COMMITTED
    release, writing = threading.Event(), threading.Event()

    def held_files() -> dict[str, bytes]:  # the old session is slow: its writes land later
        writing.set()
        assert release.wait(60)
        return _files(10, "old")

    outcome: dict[str, Any] = {}
    zombie = threading.Thread(target=lambda: outcome.update(result=_save(old, 10, "old", held_files)))
    zombie.start()
    assert writing.wait(60)

    new = _session(run)  # the run resumed elsewhere from step 5
    assert _save(new, 10, "new").result is Result.COMMITTED
    assert [i.step for i in new.manager.list() if i.status == COMMITTED] == [10]  # step 5 pruned
    release.set()
    zombie.join(60)

    assert outcome["result"].result is Result.FENCED, outcome
    manager = CheckpointManager(run)
    assert manager.verify(manager.info(10)) == []
    assert _logical(run, 10) == _files(10, "new")


def test_a_stale_writer_that_passed_the_lease_check_loses_the_commit_race(run: Storage) -> None:
    """Held between its last lease check and the manifest: the exclusive create refuses it."""
    old = _session(run)
    release, at_commit = threading.Event(), threading.Event()
    real_commit = old.manager.commit

    def held_commit(*args: Any, **kwargs: Any):
        at_commit.set()
        assert release.wait(60)
        return real_commit(*args, **kwargs)

    old.manager.commit = held_commit  # type: ignore[method-assign]
    outcome: dict[str, Any] = {}
    zombie = threading.Thread(target=lambda: outcome.update(result=_save(old, 10, "old")))
    zombie.start()
    assert at_commit.wait(60)
    new = _session(run)
    assert _save(new, 10, "new").result is Result.COMMITTED
    before = {e["basename"]: run.read_bytes("checkpoints", step_dir(10), e["basename"])
              for e in run.child("checkpoints").list_dir(step_dir(10))}
    release.set()
    zombie.join(60)

    assert outcome["result"].result is not Result.COMMITTED, outcome
    assert _logical(run, 10) == _files(10, "new")
    after = CheckpointManager(run).info(10)
    assert after.status == COMMITTED
    for name, data in before.items():  # not one byte of the committed checkpoint changed
        assert run.read_bytes("checkpoints", step_dir(10), name) == data


def test_a_commit_never_replaces_an_existing_manifest(run: Storage) -> None:
    manager = CheckpointManager(run)
    first = manager.write_files(7, _files(7, "first"))
    manager.commit(7, first, {"epoch": 0})
    second = manager.write_files(7, _files(7, "second"))
    with pytest.raises(FileExistsError):
        manager.commit(7, second, {"epoch": 0})
    assert _logical(run, 7) == _files(7, "first")
    removed = manager.collect_garbage()
    assert sorted(removed) == sorted(f"{step_dir(7)}/{r['path']}" for r in second.values())
    assert manager.verify(manager.info(7)) == []


# -- case 6: debris and full disks ----------------------------------------------------------------
def test_garbage_collection_removes_debris_below_the_newest_commit_and_never_a_checkpoint(tmp_path) -> None:
    run = Storage(str(tmp_path / "run"))
    session = _session(run, keep_last=3)
    for step in (2, 4):
        _save(session, step, "a")
    session.manager.write_files(5, _files(5, "dead"))  # a save that died before its manifest
    session.manager.write_files(9, _files(9, "dead"))  # ... and one above the newest commit
    flip_byte(run, 4, "state.json", offset=3)  # and a committed one that no longer verifies
    session.manager.write_files(4, _files(4, "loser"))  # a losing writer's files in a committed folder

    _save(session, 6, "a")
    left = {i.step: i.status for i in session.manager.list()}
    assert left == {2: COMMITTED, 4: COMMITTED, 6: COMMITTED, 9: INCOMPLETE}, left
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / step_dir(4)).iterdir()) == sorted(
        [MANIFEST, *(r["path"] for r in session.manager.info(4).manifest["files"].values())]
    )
    _save(session, 10, "a")
    assert 9 not in {i.step for i in session.manager.list()}


def test_a_failed_commit_leaves_nothing_that_blocks_the_next_save_of_that_step(tmp_path) -> None:
    run = Storage(str(tmp_path / "run"))
    session = _session(run, keep_last=2)
    _save(session, 3, "a")
    records = session.manager.write_files(6, _files(6, "a"))
    session.manager.commit(6, records, {"epoch": 0})
    os.unlink(data_path(run, 6, "state.json"))  # the commit of step 6 "failed": a manifest over nothing
    assert session.manager.info(6).status != COMMITTED
    outcome = _save(session, 6, "b")
    assert outcome.result is Result.COMMITTED, outcome
    assert _logical(run, 6) == _files(6, "b")


@pytest.mark.parametrize("keep_last", [2, 3])
def test_a_disk_that_holds_keep_last_checkpoints_but_not_one_more_still_makes_progress(keep_last: int) -> None:
    url = f"faulty://rt-full-{uuid.uuid4().hex}/run"
    run = Storage(url)
    size = 4096
    one = sum(len(b) for b in _files(1, "x", size).values())
    plan = FaultPlan(quota=keep_last * one + one // 2, quota_root=run.root)  # keep_last fit, not one more
    try:
        with install(plan):
            session = _session(run, keep_last=keep_last)
            for step in range(1, 8):
                outcome = _save(session, step, "x", lambda step=step: _files(step, "x", size))
                assert outcome.result is Result.COMMITTED, outcome
                committed = [i.step for i in session.manager.list() if i.status == COMMITTED]
                assert committed[-1] == step and len(committed) <= keep_last
        assert any(w.outcome == "nospace" for w in plan.writes)  # the disk really was full
    finally:
        forget(url)


def test_a_full_disk_never_costs_the_newest_valid_checkpoint() -> None:
    url = f"faulty://rt-full-{uuid.uuid4().hex}/run"
    run = Storage(url)
    one = sum(len(b) for b in _files(1, "x", 4096).values())
    plan = FaultPlan(quota=one + one // 2, quota_root=run.root)  # one checkpoint fits, never two
    try:
        with install(plan):
            session = _session(run, keep_last=1)
            assert _save(session, 1, "x", lambda: _files(1, "x", 4096)).result is Result.COMMITTED
            outcome = _save(session, 2, "x", lambda: _files(2, "x", 4096))
            assert outcome.result is Result.FAILED and "No space" in (outcome.error or "")
        manager = CheckpointManager(Storage(url.replace("faulty://", "memory://")))
        assert manager.load_latest().info.step == 1
    finally:
        forget(url)


# -- the storage-call budget of one save ------------------------------------------------------------
def _count_calls(monkeypatch) -> list[tuple[str, str]]:
    """Record every Storage call (method, path) from now on; the store itself is real."""
    calls: list[tuple[str, str]] = []
    for method in ("exists", "read_bytes", "read_buffer", "list_dir", "walk", "write_bytes",
                   "create_exclusive", "remove", "checksum_from_store"):
        real = getattr(Storage, method)

        def counted(self, *args, _real=real, _name=method, **kwargs):
            parts = [a for a in args if isinstance(a, str)]
            calls.append((_name, "/".join([self.path(), *parts])))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Storage, method, counted)
    return calls


# memory:// (like s3://) neither keeps checksums nor has trusted writes: prune reads the new save back
@pytest.mark.backends("local", "gcs")
def test_one_save_lists_once_reads_the_lease_at_most_twice_and_downloads_nothing_it_wrote(run: Storage, monkeypatch) -> None:
    session = _session(run, keep_last=2)
    for step in (1, 2):
        _save(session, step, "x")
    calls = _count_calls(monkeypatch)
    outcome = _save(session, 3, "x")  # commits, prunes step 1
    assert outcome.result is Result.COMMITTED

    def count(method: str, predicate: Callable[[str], bool] = lambda p: True) -> int:
        return sum(1 for m, p in calls if m == method and predicate(p))

    folder = f"/checkpoints/{step_dir(3)}/"
    assert count("read_bytes", lambda p: p.endswith("/" + LEASE)) <= 2, calls
    assert count("walk") <= 1, calls  # the listing of every checkpoint, once
    downloads = [p for m, p in calls if m in ("read_bytes", "read_buffer") and folder in p and not p.endswith(MANIFEST)]
    assert downloads == [], calls  # nothing just written is read back
    assert count("checksum_from_store") == 0, calls  # the listing carries the store's checksums
    assert [i.step for i in session.manager.list() if i.status == COMMITTED] == [2, 3]
