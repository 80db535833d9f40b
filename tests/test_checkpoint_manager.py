"""The commit protocol, listing, verification, fallback and retention, on local disk, memory:// and gs://."""

from __future__ import annotations

import logging

import pytest

from ckpt_files import flip_byte, folder_names, listed_names, write_data
from resilient_train.checkpoint.codec import dumps_json
from resilient_train.checkpoint.manager import COMMITTED, CORRUPT, INCOMPLETE, CheckpointManager
from resilient_train.checkpoint.retention import RetentionPolicy
from resilient_train.checkpoint.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, decode_manifest, file_record, step_dir
from resilient_train.errors import CheckpointError
from resilient_train.storage import Storage

def _prune(manager: CheckpointManager, keep_last, newest_step: int) -> list[int]:
    return manager.prune(RetentionPolicy(keep_last=keep_last), newest_step)


@pytest.fixture
def run(storage: Storage) -> Storage:
    """The run folder: the shared `storage` fixture (storage_backends.py), on every backend."""
    return storage


def _files(step: int) -> dict[str, bytes]:
    return {
        "model.safetensors": bytes([step % 256]) * 64 + b"weights",
        "state.json": dumps_json({"step": step}),
        "rng-rank00000.json": b'{"python":1}',
    }


def _save(manager: CheckpointManager, step: int, meta=None):
    files = _files(step)
    records = manager.write_files(step, files)
    return manager.commit(step, records, {"epoch": 0, "metrics": {"loss": 1.0 / step}, **(meta or {})})


def _steps(infos):
    return [info.step for info in infos]


def test_written_and_committed_checkpoint_is_listed_as_committed_with_its_bytes(run):
    manager = CheckpointManager(run)
    info = _save(manager, 100)
    assert info.status == COMMITTED
    (listed,) = manager.list()
    assert listed.step == 100
    assert listed.status == COMMITTED
    assert listed.path.endswith("checkpoints/step-000000100")
    assert listed.path.startswith(run.url)
    data_bytes = sum(len(v) for v in _files(100).values())
    manifest_bytes = len(run.read_bytes("checkpoints", step_dir(100), MANIFEST))
    assert listed.bytes == data_bytes + manifest_bytes
    assert listed.metrics == {"loss": 0.01}
    assert listed.manifest["files"]["state.json"]["bytes"] == len(_files(100)["state.json"])
    assert listed.to_json()["status"] == COMMITTED


def test_list_is_ordered_by_step_oldest_first(run):
    manager = CheckpointManager(run)
    for step in (300, 5, 1200, 40):
        _save(manager, step)
    assert _steps(manager.list()) == [5, 40, 300, 1200]


def test_empty_or_missing_run_folder_lists_nothing(run):
    assert CheckpointManager(run).list() == []
    assert CheckpointManager(run).load_latest() is None


def test_folder_without_manifest_is_incomplete(run):
    manager = CheckpointManager(run)
    manager.write_files(200, _files(200))
    (info,) = manager.list()
    assert info.status == INCOMPLETE
    assert "manifest" in info.reason
    with pytest.raises(CheckpointError):
        manager.load(info)


def test_manifest_listing_a_missing_file_is_corrupt(run):
    manager = CheckpointManager(run)
    records = manager.write_files(300, _files(300))
    records["extra.safetensors"] = {"bytes": 10, "crc32c": "00000000"}
    info = manager.commit(300, records, {})
    assert info.status == CORRUPT
    assert "extra.safetensors" in info.reason
    assert manager.list()[0].status == CORRUPT


def test_manifest_listing_a_wrong_size_is_corrupt(run):
    manager = CheckpointManager(run)
    _save(manager, 300)
    write_data(manager, 300, "model.safetensors", b"short")
    (info,) = manager.list()
    assert info.status == CORRUPT
    assert "model.safetensors" in info.reason


def test_manifest_with_another_step_is_corrupt(run):
    manager = CheckpointManager(run)
    records = manager.write_files(10, _files(10))
    manager.root.write_bytes(dumps_json({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": 20, "files": records}),
                             step_dir(10), MANIFEST)
    assert manager.info(10).status == CORRUPT


def test_unreadable_manifest_is_corrupt(run):
    manager = CheckpointManager(run)
    manager.write_files(10, _files(10))
    manager.root.write_bytes(b"{truncated", step_dir(10), MANIFEST)
    info = manager.info(10)
    assert info.status == CORRUPT
    assert MANIFEST in info.reason


def test_load_returns_every_file_verified(run):
    manager = CheckpointManager(run)
    _save(manager, 100)
    loaded = manager.load(manager.info(100))
    assert loaded.files == _files(100)
    assert loaded.manifest["step"] == 100


def test_load_can_read_only_the_wanted_files(run):
    manager = CheckpointManager(run)
    _save(manager, 100)
    loaded = manager.load(manager.info(100), wanted={"state.json"})
    assert set(loaded.files) == {"state.json"}


def test_flipped_byte_of_the_same_size_fails_load_naming_the_file(run):
    manager = CheckpointManager(run)
    _save(manager, 100)
    flip_byte(manager, 100, "model.safetensors", offset=3)
    info = manager.info(100)
    assert info.status == COMMITTED  # sizes still match: only the checksum can tell
    with pytest.raises(CheckpointError, match="model.safetensors"):
        manager.load(info)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_load_latest_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(run):
    manager = CheckpointManager(run)
    _save(manager, 100)
    _save(manager, 200)
    flip_byte(manager, 200, "state.json", offset=1)
    # listen on the manager's own logger: a parent logger may have propagation turned off
    logger = logging.getLogger("resilient_train.checkpoint.manager")
    records = _Records()
    logger.addHandler(records)
    try:
        loaded = manager.load_latest()
    finally:
        logger.removeHandler(records)
    assert loaded is not None
    assert loaded.info.step == 100
    assert loaded.files == _files(100)
    assert any("step-000000200" in m and "state.json" in m for m in records.messages)


def test_load_latest_skips_incomplete_and_corrupt_checkpoints(run):
    manager = CheckpointManager(run)
    _save(manager, 100)
    _save(manager, 200)
    write_data(manager, 200, "model.safetensors", b"x")  # wrong size: corrupt
    manager.write_files(300, _files(300))  # never committed: incomplete
    loaded = manager.load_latest()
    assert loaded.info.step == 100


def test_load_latest_returns_none_when_nothing_verifies(run):
    manager = CheckpointManager(run)
    _save(manager, 100)
    flip_byte(manager, 100, "model.safetensors", offset=3)
    assert manager.load_latest() is None


# -- retention -----------------------------------------------------------------------------------


def _add_foreign_folders(manager: CheckpointManager) -> None:
    for name in ("my-notes", "step-12", "step-0000001000", "step-00000010x"):
        manager.root.makedirs(name)
        manager.root.write_bytes(b"keep me", name, "note.txt")


def test_prune_keeps_the_newest_two_and_ignores_folders_it_did_not_write(run):
    manager = CheckpointManager(run)
    _add_foreign_folders(manager)
    for step in (100, 200, 300, 400):
        _save(manager, step)
    removed = _prune(manager, 2, newest_step=400)
    assert sorted(removed) == [100, 200]
    assert _steps(manager.list()) == [300, 400]
    assert all(info.status == COMMITTED for info in manager.list())
    for name in ("my-notes", "step-12", "step-0000001000", "step-00000010x"):
        assert manager.root.read_bytes(name, "note.txt") == b"keep me"
    assert not manager.root.exists(step_dir(100))


def test_prune_orders_by_step_not_by_write_order(run):
    manager = CheckpointManager(run)
    for step in (300, 100, 400, 200):
        _save(manager, step)
    assert sorted(_prune(manager, 2, newest_step=400)) == [100, 200]
    assert _steps(manager.list()) == [300, 400]


def test_prune_with_keep_last_one_never_deletes_the_newest(run):
    manager = CheckpointManager(run)
    for step in (1, 2, 3):
        _save(manager, step)
    _prune(manager, 1, newest_step=3)
    assert _steps(manager.list()) == [3]
    assert manager.load_latest().info.step == 3


def test_prune_with_keep_last_none_keeps_everything(run):
    manager = CheckpointManager(run)
    for step in (1, 2, 3):
        _save(manager, step)
    assert _prune(manager, None, newest_step=3) == []
    assert _steps(manager.list()) == [1, 2, 3]


def test_prune_deletes_nothing_when_the_newest_step_is_not_committed(run):
    manager = CheckpointManager(run)
    for step in (1, 2, 3):
        _save(manager, step)
    manager.write_files(4, _files(4))  # step 4 never got its manifest
    assert _prune(manager, 1, newest_step=4) == []
    assert _steps(manager.list()) == [1, 2, 3, 4]


def test_prune_leaves_incomplete_and_newer_folders_alone(run):
    manager = CheckpointManager(run)
    for step in (10, 20, 30):
        _save(manager, step)
    manager.write_files(25, _files(25))  # debris below the newest step
    _save(manager, 50)  # a newer incarnation's checkpoint above it
    assert _prune(manager, 1, newest_step=30) == [10, 20]
    assert _steps(manager.list()) == [25, 30, 50]
    assert manager.info(25).status == INCOMPLETE


def test_prune_never_deletes_the_newest_valid_checkpoint_when_the_newest_does_not_verify(run):
    manager = CheckpointManager(run)
    _save(manager, 1)
    _save(manager, 2)
    flip_byte(manager, 2, "model.safetensors", offset=3)
    _prune(manager, 1, newest_step=2)
    loaded = manager.load_latest()
    assert loaded is not None and loaded.info.step == 1


# -- prepare -------------------------------------------------------------------------------------


def test_prepare_leaves_an_interrupted_attempts_files_to_garbage_collection(run):
    """An interrupted attempt's files are not prepare's to delete (it may be a live writer's);
    the new attempt writes names of its own, commits, and garbage collection removes the old ones."""
    manager = CheckpointManager(run)
    manager.write_files(500, _files(500))
    interrupted = folder_names(manager, 500)
    assert manager.prepare(500) is True
    assert folder_names(manager, 500) == interrupted
    assert manager.info(500).status == INCOMPLETE
    _save(manager, 500)
    assert manager.load(manager.info(500)).files == _files(500)
    assert manager.collect_garbage()
    assert folder_names(manager, 500) == listed_names(manager, 500)
    assert manager.load(manager.info(500)).files == _files(500)


def test_prepare_removes_only_the_manifest_of_a_corrupt_checkpoint_so_a_save_commits_in_its_place(run):
    manager = CheckpointManager(run)
    _save(manager, 500)
    write_data(manager, 500, "model.safetensors", b"x")
    assert manager.info(500).status == CORRUPT
    assert manager.prepare(500) is True
    info = manager.info(500)
    assert info.status == INCOMPLETE and MANIFEST not in info.names
    assert manager.load_latest() is None
    _save(manager, 500)
    assert manager.load(manager.info(500)).files == _files(500)
    manager.collect_garbage()
    assert folder_names(manager, 500) == listed_names(manager, 500)


def test_prepare_removes_the_manifest_of_a_checkpoint_whose_checksums_differ(run):
    manager = CheckpointManager(run)
    _save(manager, 500)
    flip_byte(manager, 500, "model.safetensors", offset=3)
    assert manager.info(500).status == COMMITTED  # sizes match
    assert manager.prepare(500) is True
    assert manager.info(500).status == INCOMPLETE


def test_prepare_returns_false_for_a_committed_step_and_keeps_it(run):
    manager = CheckpointManager(run)
    _save(manager, 500)
    assert manager.prepare(500) is False
    assert manager.info(500).status == COMMITTED
    assert manager.load(manager.info(500)).files == _files(500)


def test_prepare_on_a_fresh_step_is_true(run):
    assert CheckpointManager(run).prepare(7) is True


def test_a_save_after_an_interrupted_attempt_commits_and_garbage_collection_removes_the_attempts_files(run):
    manager = CheckpointManager(run)
    manager.write_files(600, {"leftover.bin": b"half"})
    manager.prepare(600)
    _save(manager, 600)
    assert len(folder_names(manager, 600)) == len(_files(600)) + 2  # the leftover is still there
    removed = manager.collect_garbage()
    assert len(removed) == 1 and removed[0].startswith(step_dir(600) + "/leftover.")
    assert folder_names(manager, 600) == listed_names(manager, 600)
    assert manager.load(manager.info(600)).files == _files(600)


# -- write-once names and the exclusive commit ---------------------------------------------------


def test_each_attempt_writes_its_own_names_recorded_in_the_manifest(run):
    manager = CheckpointManager(run)
    first = manager.write_files(700, _files(700))
    second = manager.write_files(700, _files(700))
    for name in _files(700):
        assert first[name]["path"] != second[name]["path"]
        assert first[name]["path"] != name
    assert len(folder_names(manager, 700)) == 2 * len(_files(700))


def test_a_second_commit_of_a_step_fails_and_leaves_the_first_intact(run):
    manager = CheckpointManager(run)
    _save(manager, 800)
    late = manager.write_files(800, {name: b"stale " + data for name, data in _files(800).items()})
    with pytest.raises(FileExistsError):
        manager.commit(800, late, {"epoch": 0})
    assert manager.load(manager.info(800)).files == _files(800)
    assert manager.collect_garbage()  # the loser's files are debris
    assert folder_names(manager, 800) == listed_names(manager, 800)


def test_a_checkpoint_without_physical_names_in_its_manifest_still_reads(run):
    """Format-1 checkpoints store each file under its logical name and have no `path` records."""
    manager = CheckpointManager(run)
    files = _files(900)
    for name, data in files.items():
        manager.root.write_bytes(data, step_dir(900), name)
    records = {name: file_record(data) for name, data in files.items()}
    manager.root.write_bytes(dumps_json({"format": FORMAT_NAME, "format_version": 1, "step": 900, "files": records}),
                             step_dir(900), MANIFEST)
    info = manager.info(900)
    assert info.status == COMMITTED
    assert manager.load(info).files == files
    assert manager.verify(info) == []
    assert manager.debris() == []  # logical names are listed, never debris


# -- format version ------------------------------------------------------------------------------


def test_manifest_of_a_newer_format_version_is_rejected_saying_to_upgrade(run):
    manager = CheckpointManager(run)
    records = manager.write_files(100, _files(100))
    newer = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION + 1, "step": 100, "files": records}
    manager.root.write_bytes(dumps_json(newer), step_dir(100), MANIFEST)
    info = manager.info(100)
    assert info.status != COMMITTED
    assert "upgrade" in info.reason
    with pytest.raises(CheckpointError, match="upgrade"):
        manager.load(info)
    with pytest.raises(CheckpointError, match="upgrade"):
        decode_manifest(dumps_json(newer))


def test_manifest_of_another_format_is_rejected():
    with pytest.raises(CheckpointError, match="not a resilient_train manifest"):
        decode_manifest(dumps_json({"format": "something-else", "step": 1, "files": {}}))


def test_manifest_records_format_version_and_checksums(run):
    manager = CheckpointManager(run)
    _save(manager, 100)
    manifest = decode_manifest(run.read_bytes("checkpoints", step_dir(100), MANIFEST))
    assert manifest["format"] == FORMAT_NAME
    assert manifest["format_version"] == FORMAT_VERSION
    for record in manifest["files"].values():
        assert "crc32c" in record or "sha256" in record
