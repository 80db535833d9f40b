"""One flipped byte in the newest checkpoint: `verify` names it, resume falls back and heals the run.

A file whose size is unchanged but whose bytes differ (bit rot, a Drive upload that raced, a
hostile edit) still counts as an existing checkpoint (design guide, 2.3: sizes match), so `ls`
lists it; only the checksums tell. `verify` must name the broken file and exit 1, resume and
export must skip the checkpoint saying why, and the final save of the resumed run must rewrite the
broken step so the run verifies again, with the weights an uninterrupted run ends with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckpt_files import data_path, flip_byte, folder_names, listed_names
from conftest import TINY_TASK, error_lines
from helpers import assert_same_weights, run_cli_inprocess

SETTINGS = ["trainer.max_steps=12", "checkpoint.every_n_steps=3", "checkpoint.keep_last=3", "task.n=64"]
NEWEST, OLDER = "step-000000012", "step-000000009"
NEWEST_STEP, OLDER_STEP = 12, 9


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, trained_runs) -> tuple[Path, dict[str, torch.Tensor]]:
    """An uninterrupted run (never modified by the tests) and its exported weights."""
    tmp = tmp_path_factory.mktemp("verify_baseline")
    run_dir = tmp / "run"
    trained_runs.copy(run_dir, *SETTINGS)
    out = tmp / "final.safetensors"
    run_cli_inprocess("export", str(run_dir), str(out), check=True)
    return run_dir, load_file(str(out))


@pytest.fixture
def flipped(baseline, tmp_path: Path) -> Path:
    """A copy of the baseline run with one byte of the newest checkpoint's weights flipped."""
    run_dir = tmp_path / "run"
    shutil.copytree(baseline[0], run_dir)
    # one byte in the middle of a tensor's data (not the header): the file still parses, same size
    flip_byte(run_dir, NEWEST_STEP, "model.safetensors")
    return run_dir


def _one_error_line(proc, *fragments: str) -> str:
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _exported_step(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


def test_the_flip_really_changes_a_weight(baseline, flipped: Path) -> None:
    """Sanity check of the fixture: the broken file still decodes, to different weights."""
    original = load_file(data_path(baseline[0], NEWEST_STEP, "model.safetensors"))
    broken = load_file(data_path(flipped, NEWEST_STEP, "model.safetensors"))
    assert original.keys() == broken.keys()
    assert any(not torch.equal(original[k], broken[k]) for k in original)


def test_verify_run_exits_1_naming_the_broken_file(flipped: Path) -> None:
    proc = run_cli_inprocess("verify", str(flipped))
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    _one_error_line(proc, f"{NEWEST}/model.safetensors")
    status = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("step ")}
    assert status == {"step 6": "ok", "step 9": "ok", "step 12": "BROKEN"}, proc.stdout
    # the detail line says what is wrong with which file; the other files of step 12 are fine
    details = [line.strip() for line in proc.stdout.splitlines() if line.startswith(" ")]
    assert len(details) == 1 and details[0].startswith(f"{NEWEST}/model.safetensors"), proc.stdout
    assert "crc32c" in details[0] or "sha256" in details[0], details


def test_verify_one_checkpoint_folder(flipped: Path) -> None:
    proc = run_cli_inprocess("verify", str(flipped / "checkpoints" / OLDER))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "step 9: ok"
    assert not error_lines(proc.stderr)

    proc = run_cli_inprocess("verify", str(flipped / "checkpoints" / NEWEST) + "/")  # a trailing slash is fine
    assert proc.returncode == 1, proc.stderr
    _one_error_line(proc, f"{NEWEST}/model.safetensors")


def test_ls_still_lists_the_flipped_checkpoint_as_committed(baseline, flipped: Path) -> None:
    """`ls` checks sizes (existence), not checksums (validity): the flip is invisible to it."""
    before = {r["step"]: r for r in json.loads(run_cli_inprocess("ls", str(baseline[0]), "--json", check=True).stdout)}
    after = {r["step"]: r for r in json.loads(run_cli_inprocess("ls", str(flipped), "--json", check=True).stdout)}
    assert sorted(after) == [6, 9, 12]
    assert after[12]["status"] == "committed"
    assert after[12]["bytes"] == before[12]["bytes"]
    assert after[12]["path"].endswith(f"checkpoints/{NEWEST}")
    table = run_cli_inprocess("ls", str(flipped), check=True).stdout.splitlines()
    rows = {int(line.split()[0]): line.split()[1] for line in table[1:]}
    assert rows == {6: "committed", 9: "committed", 12: "committed"}


def test_export_falls_back_past_the_broken_checkpoint(baseline, flipped: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    proc = run_cli_inprocess("export", str(flipped), str(out))
    assert proc.returncode == 0, proc.stderr
    assert _exported_step(out) == 9
    skip = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skip) == 1 and NEWEST in skip[0] and "model.safetensors" in skip[0], proc.stderr
    reference = tmp_path / "ref.safetensors"
    run_cli_inprocess("export", str(baseline[0] / "checkpoints" / OLDER), str(reference), check=True)
    assert_same_weights(load_file(str(out)), load_file(str(reference)))

    # asked for the broken checkpoint itself: exit 1, one line naming the file, nothing written
    out12 = tmp_path / "w12.safetensors"
    proc = run_cli_inprocess("export", str(flipped / "checkpoints" / NEWEST), str(out12))
    assert proc.returncode == 1, proc.stderr
    _one_error_line(proc, "model.safetensors")
    assert not out12.exists()


def test_resume_falls_back_to_step_9_and_ends_bit_identical(baseline, flipped: Path, tmp_path: Path) -> None:
    proc = run_cli_inprocess("resume", str(flipped))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_lines(proc.stderr) and "Traceback" not in proc.stderr

    skip = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skip) == 1, proc.stderr
    assert NEWEST in skip[0] and "model.safetensors" in skip[0], skip[0]
    assert "crc32c" in skip[0] or "sha256" in skip[0] or "corrupt" in skip[0], skip[0]  # says why
    resumed = [line for line in proc.stderr.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and OLDER in resumed[0] and "step 9" in resumed[0], proc.stderr
    assert "done: step 12" in proc.stderr

    out = tmp_path / "final.safetensors"
    run_cli_inprocess("export", str(flipped), str(out), check=True)
    assert _exported_step(out) == 12
    assert_same_weights(load_file(str(out)), baseline[1])

    # the final save rewrote step 12 because it failed verification: the whole run verifies now
    proc = run_cli_inprocess("verify", str(flipped))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout
    assert "step 12: ok" in proc.stdout
    rewritten = Path(data_path(flipped, NEWEST_STEP, "model.safetensors")).read_bytes()
    assert rewritten == Path(data_path(baseline[0], NEWEST_STEP, "model.safetensors")).read_bytes()
    # the broken step's old files were debris of the replaced commit: collected, not left behind
    assert folder_names(flipped, NEWEST_STEP) == listed_names(flipped, NEWEST_STEP)


def test_resume_when_every_checkpoint_but_the_oldest_is_broken(baseline, flipped: Path, tmp_path: Path) -> None:
    """Two broken checkpoints in a row: each is skipped in its own line, the oldest one is used."""
    flip_byte(flipped, OLDER_STEP, "state.safetensors")
    proc = run_cli_inprocess("verify", str(flipped))
    assert proc.returncode == 1
    _one_error_line(proc, f"{NEWEST}/model.safetensors", f"{OLDER}/state.safetensors")

    proc = run_cli_inprocess("resume", str(flipped))
    assert proc.returncode == 0, proc.stderr[-3000:]
    skip = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skip) == 2 and NEWEST in skip[0] and OLDER in skip[1], proc.stderr
    assert "state.safetensors" in skip[1]
    assert any("resumed from" in line and "step-000000006" in line for line in proc.stderr.splitlines()), proc.stderr
    out = tmp_path / "final.safetensors"
    run_cli_inprocess("export", str(flipped), str(out), check=True)
    assert_same_weights(load_file(str(out)), baseline[1])
    assert run_cli_inprocess("verify", str(flipped)).returncode == 0
