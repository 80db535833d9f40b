"""The lost-work rule of the ckpt-chaos driver: checkpoints match their fault-free twin by logical name."""

from __future__ import annotations

from pathlib import Path

from resume import checkpoints, logical_name, newest_complete


def _checkpoint(run: Path, step: int, files: dict[str, int]) -> None:
    folder = run / "checkpoints" / f"step-{step:09d}"
    folder.mkdir(parents=True)
    for name, size in files.items():
        (folder / name).write_bytes(b"x" * size)


def test_logical_name_drops_the_tokens_unique_to_a_save_attempt() -> None:
    assert logical_name("model.3f9a1c2b7d.safetensors") == "model.safetensors"
    assert logical_name("rng-rank00001.3f9a1c2b7d.json") == "rng-rank00001.json"
    assert logical_name(".model.3f9a1c2b7d.safetensors.421eadab.tmp") == ".model.safetensors.tmp"
    assert logical_name("manifest.json") == "manifest.json"


def test_a_checkpoint_with_other_tokens_but_the_same_files_and_sizes_is_complete(tmp_path: Path) -> None:
    ref, got = tmp_path / "ref", tmp_path / "got"
    for step, token in ((5, "aaaaaaaaaa"), (10, "bbbbbbbbbb")):
        _checkpoint(ref, step, {f"model.{token}.safetensors": 40, "manifest.json": 9})
    _checkpoint(got, 5, {"model.0123456789.safetensors": 40, "manifest.json": 9, ".manifest.json.89abcdef.tmp": 9})
    _checkpoint(got, 10, {"model.fedcba9876.safetensors": 40})  # no manifest: the crash came first
    assert newest_complete(checkpoints(ref), checkpoints(got)) == 5


def test_a_torn_file_makes_a_checkpoint_incomplete(tmp_path: Path) -> None:
    ref, got = tmp_path / "ref", tmp_path / "got"
    _checkpoint(ref, 5, {"model.aaaaaaaaaa.safetensors": 40, "manifest.json": 9})
    _checkpoint(got, 5, {"model.bbbbbbbbbb.safetensors": 20, "manifest.json": 9})
    assert newest_complete(checkpoints(ref), checkpoints(got)) == 0
