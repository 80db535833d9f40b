"""Iterable train_data: Hugging Face streaming, plain torch IterableDatasets and StatefulDataLoader.

A source with state (HF `datasets.IterableDataset`, torchdata's StatefulDataLoader) has its state
per rank in the checkpoint and resumes at the exact sample; a plain IterableDataset is resumed by
skipping what each rank consumed and the resume says so. The end-to-end tests run the real CLI on
tests/tasks/stream.py over text files written here (nothing is downloaded), SIGKILL the whole
process group at a training-step call, resume, and compare the final weights and every rank's
per-step batches with an uninterrupted run, on 1 and 2 (DDP, gloo) processes.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, committed_steps_on_disk, run_cli, start_cli
from safetensors.torch import load_file
from torch import nn

from resilient_train import Trainer, UsageError
from resilient_train.checkpoint import format as fmt
from resilient_train.data import build_stream
from resilient_train.data.iterable import IterableStream, fingerprint, world_size_refusal
from resilient_train.data.shards import RankShard
from resilient_train.errors import CheckpointError

STREAM_TASK = str(REPO / "tests" / "tasks" / "stream.py")
WORDS = ["alpha", "beta", "gamma", "7up", "42", "x9", "delta", "q1", "zz", "omega"]
LINES_PER_FILE = 25  # 3 files: 75 lines, 19 batches of 4 per epoch on one process (the last one of 3)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing may be downloaded; HF's caches stay in the test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _write_text(folder: Path, files: int = 3, lines: int = LINES_PER_FILE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    for i in range(files):
        with open(folder / f"part{i}.txt", "w") as f:
            for j in range(lines):
                f.write(f"f{i} l{j} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) + "\n")
    return folder


# -- end to end: kill, resume, compare -----------------------------------------------------------


def _args(run_dir: Path, data: Path, log: Path, *extra: str) -> list[str]:
    return ["run", STREAM_TASK, "--run-dir", str(run_dir), f"task.data_dir={data}", f"task.order_log={log}", *extra]


def _ranks(log: Path) -> list[Path]:
    return sorted(log.parent.glob(log.name + ".rank*"))


def _straight_and_killed(tmp_path: Path, kill_at: int, *extra: str) -> tuple[Path, Path, Any]:
    """An uninterrupted run and one SIGKILLed at `kill_at` then resumed; (straight dir, resumed dir, resume)."""
    data = _write_text(tmp_path / "data")
    straight = run_cli(*_args(tmp_path / "straight", data, tmp_path / "straight.log", *extra), timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir, log = tmp_path / "killed", tmp_path / "killed.log"
    marker = tmp_path / "killed.marker"
    proc = start_cli(*_args(run_dir, data, log, *extra, f"task.kill_at={kill_at}", f"task.kill_marker={marker}"))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9 and marker.exists(), err[-3000:]  # SIGKILL, from inside the training step
    committed = committed_steps_on_disk(run_dir)
    assert committed and committed[-1] < 30, committed
    for path in _ranks(log):  # the steps after the checkpoint are trained again by the resume
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[: committed[-1]]))

    resumed = run_cli("resume", str(run_dir), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {committed[-1]}," in resumed.stderr
    return tmp_path / "straight", run_dir, resumed


def _assert_same_run(tmp_path: Path, a: Path, b: Path) -> None:
    wa = _export(a, tmp_path / "a.safetensors")
    wb = _export(b, tmp_path / "b.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"weights differ at {key}"
    logs_a, logs_b = _ranks(tmp_path / "straight.log"), _ranks(tmp_path / "killed.log")
    assert [p.name.split(".")[-1] for p in logs_a] == [p.name.split(".")[-1] for p in logs_b] and logs_a
    for pa, pb in zip(logs_a, logs_b, strict=True):
        assert pa.read_text().splitlines() == pb.read_text().splitlines(), f"batches differ on {pa.name}"


def _export(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    run_cli("export", str(run_dir), str(out), check=True)
    return load_file(str(out))


@pytest.mark.slow
def test_hf_streaming_sigkilled_and_resumed_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    # killed at step 22 (epoch 1), resumed from step 20: the HF state crosses an epoch boundary too
    straight, killed, resumed = _straight_and_killed(tmp_path, 22, "task.source=hf")
    assert "resume is bit-exact" in resumed.stderr, resumed.stderr[-3000:]
    assert "skipped" not in resumed.stderr  # the state was loaded: nothing iterated to get there
    _assert_same_run(tmp_path, straight, killed)
    manifest = (killed / "checkpoints" / "step-000000030" / "manifest.json").read_text()
    assert '"data-rank00000.json"' in manifest and '"data_position":"state"' in manifest.replace(" ", "")


@pytest.mark.slow
def test_stateful_dataloader_with_two_workers_resumes_exactly(tmp_path: Path) -> None:
    straight, killed, resumed = _straight_and_killed(tmp_path, 14, "task.source=stateful_loader", "task.workers=2")
    assert "resume is bit-exact" in resumed.stderr, resumed.stderr[-3000:]
    _assert_same_run(tmp_path, straight, killed)


@pytest.mark.slow
def test_plain_iterable_dataset_is_resumed_by_skipping_and_labelled_so(tmp_path: Path) -> None:
    straight, killed, resumed = _straight_and_killed(tmp_path, 14, "task.source=torch")
    assert "resume is approximate (train_data has no state_dict(): each rank skips the batches it had consumed" \
        in resumed.stderr, resumed.stderr[-3000:]
    step = int(re.search(r"\(step (\d+),", resumed.stderr).group(1))  # a save in flight at the kill may not have committed
    assert f"data: skipped {step} consumed batch(es) of epoch 0 in" in resumed.stderr, resumed.stderr[-3000:]
    assert "the last one matches the batch the checkpoint recorded" in resumed.stderr
    _assert_same_run(tmp_path, straight, killed)  # a deterministic stream: the skip repeats the run exactly


DDP = ["trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=20",
       "checkpoint.every_n_steps=4"]


@pytest.mark.slow
def test_hf_streaming_on_two_processes_sigkilled_and_resumed_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, killed, resumed = _straight_and_killed(tmp_path, 11, "task.source=hf", *DDP)
    assert "resume is bit-exact" in resumed.stderr, resumed.stderr[-3000:]
    _assert_same_run(tmp_path, straight, killed)
    rank0, rank1 = (p.read_text() for p in _ranks(tmp_path / "straight.log"))
    assert not set(rank0.replace("\n", " | ").split(" | ")) & set(rank1.replace("\n", " | ").split(" | ")) - {""}

    again = run_cli("resume", str(killed), "--allow-change", "trainer.devices", "trainer.devices=1",
                    "trainer.strategy=auto", "trainer.max_steps=24")
    assert again.returncode == 2, again.stderr[-3000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train_data is iterable" in errors[0] and "resume with 2 processes" in errors[0], errors


@pytest.mark.slow
def test_plain_iterable_dataset_on_two_processes_is_sharded_and_resumed(tmp_path: Path) -> None:
    straight, killed, resumed = _straight_and_killed(tmp_path, 11, "task.source=torch", *DDP)
    assert "resume is approximate (train_data has no state_dict()" in resumed.stderr, resumed.stderr[-3000:]
    _assert_same_run(tmp_path, straight, killed)
    rank0, rank1 = (p.read_text().splitlines() for p in _ranks(tmp_path / "straight.log"))
    assert rank0[0].startswith("f0 l0 ") and rank1[0].startswith("f0 l1 ")  # rank r keeps item r of every 2


# -- in process: Trainer.fit twice on one run folder is an interrupted run -----------------------


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 8), nn.Flatten(), nn.Dropout(0.2), nn.Linear(24 * 8, 1))


def _step(model: nn.Module, batch: Any) -> torch.Tensor:
    from tasks.stream import encode

    texts = list(batch["text"])
    target = torch.tensor([[len(t) % 5 / 5.0] for t in texts])
    return nn.functional.mse_loss(model(encode(texts)), target)


def _fit(run_dir: Path, data: Any, max_steps: int, **overrides: Any) -> dict[str, torch.Tensor]:
    model = _model()
    settings = dict(run_dir=str(run_dir), max_steps=max_steps, batch_size=4, every_n_steps=100, progress_bar=False,
                    accelerator="cpu", devices=1, seed=0)
    Trainer(**{**settings, **overrides}).fit(model, lambda p: torch.optim.SGD(p, lr=0.01), data, training_step=_step)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _lines(data: Path) -> list[str]:
    return [line.rstrip("\n") for path in sorted(data.glob("*.txt")) for line in open(path)]


def _to_iterable(data: Path) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"text": _lines(data)}).to_iterable_dataset(num_shards=3)


def _upper(items: list[dict]) -> dict:
    return {"text": [item["text"].upper() for item in items]}


@pytest.mark.parametrize("wrapped", [False, True], ids=["dataset", "dataloader"])
def test_to_iterable_dataset_resumed_in_process_equals_an_uninterrupted_run(tmp_path: Path, caplog, wrapped: bool) -> None:
    from torch.utils.data import DataLoader

    data = _write_text(tmp_path / "data")

    def source() -> Any:  # a given DataLoader keeps its batch size (5) and collate_fn
        return DataLoader(_to_iterable(data), batch_size=5, collate_fn=_upper) if wrapped else _to_iterable(data)

    straight = _fit(tmp_path / "a", source(), max_steps=23)
    _fit(tmp_path / "b", source(), max_steps=13)  # epoch 0 has 19 (15) batches: resumed across the boundary
    with caplog.at_level(logging.INFO, logger="resilient_train"):
        resumed = _fit(tmp_path / "b", source(), max_steps=23)
    _assert_same(straight, resumed)
    assert "resume is bit-exact" in caplog.text


def test_hf_shuffle_buffer_resume_is_labelled_approximate(tmp_path: Path, caplog) -> None:
    data = _write_text(tmp_path / "data")
    _fit(tmp_path / "run", _to_iterable(data).shuffle(seed=1, buffer_size=8), max_steps=3)
    with caplog.at_level(logging.INFO, logger="resilient_train"):
        _fit(tmp_path / "run", _to_iterable(data).shuffle(seed=1, buffer_size=8), max_steps=5)
    assert "resume is approximate (the Hugging Face shuffle buffer" in caplog.text


def test_max_epochs_stops_after_an_iterable_pass(tmp_path: Path) -> None:
    data = _write_text(tmp_path / "data")
    from resilient_train.checkpoint import CheckpointManager
    from resilient_train.storage import Storage

    _fit(tmp_path / "run", _to_iterable(data), max_steps=1000, max_epochs=1)
    steps = [info.step for info in CheckpointManager(Storage(str(tmp_path / "run"))).list()]
    assert steps[-1] == 19  # 75 lines in batches of 4: the 19th holds the last 3


def test_a_stateless_source_that_changed_its_order_is_reported_on_resume(tmp_path: Path, caplog) -> None:
    from tasks.stream import TextLines

    data = _write_text(tmp_path / "data")
    files = sorted(data.glob("*.txt"))
    _fit(tmp_path / "run", TextLines(files), max_steps=3)
    with caplog.at_level(logging.INFO, logger="resilient_train"):
        _fit(tmp_path / "run", TextLines(files[::-1]), max_steps=5)  # another order on the second pass
    assert "resume is approximate (train_data has no state_dict()" in caplog.text
    assert "data: skipped 3 consumed batch(es) of epoch 0" in caplog.text
    assert "the last skipped batch differs from the one the checkpoint recorded" in caplog.text
    assert "matches the batch the checkpoint recorded" not in caplog.text


def test_hf_dataset_behind_a_dataloader_with_workers_is_refused(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    loader = DataLoader(_to_iterable(_write_text(tmp_path / "data")), batch_size=4, num_workers=2)
    with pytest.raises(UsageError, match="StatefulDataLoader"):
        build_stream(loader, 4, seed=0, rank=0, world_size=1)


def test_max_epochs_with_an_iterable_under_ddp_is_refused_on_rank_0_only(tmp_path: Path) -> None:
    data = _to_iterable(_write_text(tmp_path / "data"))
    with pytest.raises(UsageError, match="trainer.max_steps"):
        build_stream(data, 4, seed=0, rank=0, world_size=2, max_epochs=1)
    with pytest.raises(SystemExit) as exc:
        build_stream(data, 4, seed=0, rank=1, world_size=2, max_epochs=1)
    assert exc.value.code == 2


# -- the stream on its own -----------------------------------------------------------------------


def _texts(stream: IterableStream, n: int) -> list[list[str]]:
    return [list(stream.next()["text"]) for _ in range(n)]


def test_a_given_dataloader_keeps_its_batch_size_and_collate_fn(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    loader = DataLoader(_to_iterable(_write_text(tmp_path / "data")), batch_size=5, collate_fn=_upper)
    stream, layout = build_stream(loader, 4, seed=0, rank=0, world_size=1)
    texts = stream.next()["text"]
    assert layout.batch_size == 5 and len(texts) == 5 and all(t == t.upper() for t in texts)
    assert layout.layout()["order"] == "iterable" and layout.layout()["data_position"] == "state"


def test_the_state_saved_is_that_of_the_batches_returned_not_of_the_read_ahead(tmp_path: Path) -> None:
    data = _write_text(tmp_path / "data")
    stream, _ = build_stream(_to_iterable(data), 4, seed=0, rank=0, world_size=1)
    _texts(stream, 5)
    saved = stream.state_dict()
    rest = _texts(stream, 20)  # crosses into epoch 1
    again, _ = build_stream(_to_iterable(data), 4, seed=0, rank=0, world_size=1)
    again.seek(0, 0, saved)
    assert _texts(again, 20) == rest
    assert (again.epoch, again.batches) == (stream.epoch, stream.batches) == (1, 6)


def test_completed_epochs_counts_an_epoch_once_its_last_batch_is_taken(tmp_path: Path) -> None:
    stream, _ = build_stream(_to_iterable(_write_text(tmp_path / "data")), 4, seed=0, rank=0, world_size=1)
    _texts(stream, 18)
    assert stream.completed_epochs == 0
    assert len(_texts(stream, 1)[0]) == 3  # the last batch of the pass
    assert stream.completed_epochs == 1 and stream.epoch == 0
    saved = stream.state_dict()
    assert saved["epoch_ended"]
    _texts(stream, 1)
    assert (stream.epoch, stream.batches) == (1, 1)


def test_reading_ahead_and_skipping_do_not_move_the_training_rng(tmp_path: Path) -> None:
    from tasks.stream import TextLines

    stream, _ = build_stream(TextLines(sorted(_write_text(tmp_path / "data").glob("*.txt"))), 4, seed=0, rank=0,
                             world_size=1)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = [stream.next()["noise"] for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), before)
    saved = stream.state_dict()
    assert saved["position"] == "skip" and saved["source"] is None and saved["last_batch"]
    again, _ = build_stream(TextLines(sorted((tmp_path / "data").glob("*.txt"))), 4, seed=0, rank=0, world_size=1)
    again.seek(0, 0, {**saved, "batches": 2, "last_batch": None})
    assert torch.equal(again.next()["noise"], first[2])  # the noise drawn while reading repeats after a skip
    assert torch.equal(torch.get_rng_state(), before)


def test_rank_shards_are_disjoint_and_equally_long() -> None:
    shards = [list(RankShard(range(11), rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 9 and 10 would make the shards uneven: dropped


def test_a_foreign_data_position_is_a_checkpoint_error(tmp_path: Path) -> None:
    stream, _ = build_stream(_to_iterable(_write_text(tmp_path / "data")), 4, seed=0, rank=0, world_size=1)
    with pytest.raises(CheckpointError, match="not ours"):
        stream.seek(0, 0, {"format": "something else"})
    with pytest.raises(CheckpointError, match="not a plausible count"):
        stream.seek(0, 0, {"format": "resilient_train.data-position", "version": 1, "epoch": -1, "batches": 0, "cursor": 0})
    with pytest.raises(CheckpointError, match="upgrade"):
        stream.seek(0, 0, {"format": "resilient_train.data-position", "version": 99})


def test_world_size_refusal_only_for_an_iterable_on_another_world_size() -> None:
    saved = {"order": "iterable", "world_size": 2}
    assert world_size_refusal(saved, {"order": "iterable", "world_size": 2}) is None
    assert world_size_refusal({"order": "feistel-v1", "world_size": 2}, {"order": "feistel-v1", "world_size": 1}) is None
    line = world_size_refusal(saved, {"order": "iterable", "world_size": 1})
    assert line is not None and "resume with 2 processes" in line and "\n" not in line


def test_data_position_round_trips_through_the_rank_files() -> None:
    data = {"format": "x", "source": {"pos": 3, "rng": torch.arange(4, dtype=torch.uint8), "t": (1, 2)}}
    snapshot = fmt.Snapshot(model={"w": torch.zeros(2)}, train={"progress": {}}, rng={"python": 1}, data=data)
    files = fmt.encode_files(snapshot, 1, shared=True).to_bytes()
    assert {fmt.data_file(1), fmt.data_tensors_file(1)} <= set(files)
    back = fmt.decode(files, 1).data
    assert back is not None and back["source"]["pos"] == 3 and back["source"]["t"] == (1, 2)
    assert torch.equal(back["source"]["rng"], data["source"]["rng"])
    assert fmt.decode(files, 0).data is None  # another rank's position is not this one's
    plain = fmt.encode_files(fmt.Snapshot(model={"w": torch.zeros(2)}, train={"progress": {}}), 0, shared=True).to_bytes()
    assert not any(name.startswith("data-") for name in plain)  # map-style runs write no data files


def test_fingerprint_tells_batches_apart() -> None:
    a = {"text": ["a", "b"], "x": torch.arange(4)}
    assert fingerprint(a) == fingerprint({"text": ["a", "b"], "x": torch.arange(4)})
    assert fingerprint(a) != fingerprint({"text": ["a", "c"], "x": torch.arange(4)})
    assert fingerprint(a) != fingerprint({"text": ["a", "b"], "x": torch.arange(1, 5)})


def _tamper_data_file(checkpoint: Path, change: Any) -> None:
    """Rewrite rank 0's data position and fix up the manifest, so the checksums still pass."""
    import json

    from resilient_train.checkpoint.manifest import file_record

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    record = manifest["files"]["data-rank00000.json"]
    path = checkpoint / record["path"]
    data = change(json.loads(path.read_text()))
    raw = json.dumps(data).encode()
    path.write_bytes(raw)
    manifest["files"]["data-rank00000.json"] = {**file_record(raw), "path": record["path"]}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_a_garbled_data_position_that_passes_checksums_falls_back_to_the_older_checkpoint(tmp_path: Path, caplog) -> None:
    data = _write_text(tmp_path / "data")
    straight = _fit(tmp_path / "a", _to_iterable(data), max_steps=12)
    _fit(tmp_path / "b", _to_iterable(data), max_steps=8, every_n_steps=4)
    newest = tmp_path / "b" / "checkpoints" / "step-000000008"
    _tamper_data_file(newest, lambda d: {**d, "epoch": 10**30})
    with caplog.at_level(logging.INFO, logger="resilient_train"):
        resumed = _fit(tmp_path / "b", _to_iterable(data), max_steps=12, every_n_steps=4)
    assert "step-000000004" in caplog.text and "not a plausible count" in caplog.text
    _assert_same(straight, resumed)


def test_a_source_state_the_source_cannot_take_is_one_checkpoint_error(tmp_path: Path) -> None:
    data = _write_text(tmp_path / "data")
    _fit(tmp_path / "b", _to_iterable(data), max_steps=4, every_n_steps=4)
    _tamper_data_file(tmp_path / "b" / "checkpoints" / "step-000000004", lambda d: {**d, "source": {"x": 1}})
    with pytest.raises(CheckpointError, match="does not fit train_data"):
        _fit(tmp_path / "b", _to_iterable(data), max_steps=8)
