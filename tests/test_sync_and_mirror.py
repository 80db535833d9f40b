"""Moving runs between storages: `sync` (local -> gs:// -> local), the background mirror, and the
read-only commands around them (`inspect`, `env`, bad input).

The gs:// side is the session's GCS emulator (`gcs_url`); STORAGE_EMULATOR_HOST is in os.environ,
so the CLI subprocesses talk to it too.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_TASK, error_lines, run_cli, run_cli_fast
from helpers import assert_same_weights, run_cli_inprocess

SETTINGS = ["trainer.max_steps=12", "checkpoint.every_n_steps=3", "checkpoint.keep_last=3", "task.n=64"]
LONGER = "trainer.max_steps=15"


def _assert_one_error_line(proc, code: int, *fragments: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _export(target: str | Path, out: Path) -> dict[str, torch.Tensor]:
    run_cli_fast("export", str(target), str(out), check=True)
    return load_file(str(out))


def _exported_step(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


def _ls(target: str | Path) -> dict[int, dict]:
    return {row["step"]: row for row in json.loads(run_cli_fast("ls", str(target), "--json", check=True).stdout)}


def _committed(target: str | Path) -> list[int]:
    return sorted(step for step, row in _ls(target).items() if row["status"] == "committed")


def _data_path(run: Path, step: int, logical: str) -> Path:
    """Where a checkpoint keeps a logical file (data files carry their writer's token)."""
    folder = run / "checkpoints" / f"step-{step:09d}"
    record = json.loads((folder / "manifest.json").read_text())["files"][logical]
    return folder / record.get("path", logical)


def _logical_files(run: Path, step: int) -> dict[str, bytes]:
    folder = run / "checkpoints" / f"step-{step:09d}"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return {name: _data_path(run, step, name).read_bytes() for name in files}


def _gs_files(url: str) -> set[str]:
    """Every object under a gs:// prefix, relative to it (fresh listing)."""
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    root = url[len("gs://"):].rstrip("/")
    return {name[len(root) + 1:] for name in fs.find(root)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, trained_runs) -> dict:
    """A finished local run (never modified by tests), its final weights, and those of the same
    run carried on uninterrupted to step 15 (what every resume to 15 must reproduce)."""
    tmp = tmp_path_factory.mktemp("sync")
    run_dir, longer = tmp / "run", tmp / "run15"
    trained_runs.copy(run_dir, *SETTINGS)
    trained_runs.copy(longer, *SETTINGS, LONGER)
    return {
        "run": run_dir,
        "weights": _export(run_dir, tmp / "w12.safetensors"),
        "weights15": _export(longer, tmp / "w15.safetensors"),
    }


# -- sync ----------------------------------------------------------------------------------------
def test_sync_local_to_gcs_to_local(finished, gcs_url: str, tmp_path: Path) -> None:
    src, back = tmp_path / "src", tmp_path / "back"
    shutil.copytree(finished["run"], src)
    debris = src / "checkpoints" / "step-000000015"  # a save interrupted before its manifest
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"half a file")

    proc = run_cli("sync", str(src), gcs_url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_lines(proc.stderr)
    assert "3 checkpoint(s) copied" in proc.stderr and "1 not committed" in proc.stderr, proc.stderr
    assert any(line.startswith("step 15: incomplete, not copied") for line in proc.stderr.splitlines()), proc.stderr

    remote = _ls(gcs_url)
    assert sorted(remote) == [6, 9, 12], remote  # the incomplete folder did not travel
    assert all(row["status"] == "committed" for row in remote.values())
    assert all(row["path"].startswith(gcs_url) for row in remote.values())
    objects = _gs_files(gcs_url)
    assert {"run.yaml", "sessions.json", "task/task.json", "task/tiny.py", "logs/metrics.csv"} <= objects, objects
    assert not any(name.startswith("checkpoints/step-000000015") for name in objects), objects
    proc = run_cli("verify", gcs_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == 3

    proc = run_cli("sync", gcs_url, str(back))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 checkpoint(s) copied" in proc.stderr and "0 not committed" in proc.stderr, proc.stderr
    local = _ls(back)
    assert sorted(local) == sorted(remote) == _committed(src)
    assert {s: r["bytes"] for s, r in local.items()} == {s: r["bytes"] for s, r in remote.items()}
    assert run_cli_inprocess("verify", str(back)).returncode == 0
    for step in local:  # every file arrived byte for byte
        assert _logical_files(back, step) == _logical_files(src, step)
    assert (back / "task" / "tiny.py").read_bytes() == Path(TINY_TASK).read_bytes()
    assert (back / "run.yaml").read_bytes() == (src / "run.yaml").read_bytes()

    assert_same_weights(_export(back, tmp_path / "back.safetensors"), finished["weights"])
    assert_same_weights(_export(gcs_url, tmp_path / "gcs.safetensors"), finished["weights"])

    # a second sync finds everything already there
    for a, b in ((src, gcs_url), (gcs_url, back)):
        proc = run_cli("sync", str(a), str(b))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "0 checkpoint(s) copied" in proc.stderr and "3 already there" in proc.stderr, proc.stderr

    # the synced-back folder is a complete run: resume needs nothing else (config + task travelled)
    proc = run_cli_inprocess("resume", str(back), LONGER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [line for line in proc.stderr.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and str(back / "checkpoints" / "step-000000012") in resumed[0], proc.stderr
    out = tmp_path / "final.safetensors"
    assert_same_weights(_export(back, out), finished["weights15"])
    assert _exported_step(out) == 15


def test_sync_never_writes_a_checkpoint_that_differs_at_the_destination(finished, tmp_path: Path) -> None:
    """A committed checkpoint at DST is never written again: a different one is reported, kept."""
    src, dst = finished["run"], tmp_path / "dst"
    run_cli_inprocess("sync", str(src), str(dst), check=True)
    folder = dst / "checkpoints" / "step-000000012"
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    record = manifest["files"]["model.safetensors"]
    flipped = folder / record["path"]
    data = bytearray(flipped.read_bytes())
    data.extend(b"\0")  # a different, size-consistent file and manifest at the destination
    flipped.write_bytes(bytes(data))
    record["bytes"] += 1
    manifest_path.write_text(json.dumps(manifest))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = run_cli_inprocess("sync", str(src), str(dst))
    line = _assert_one_error_line(proc, 1, "12")
    assert "left as they are" in line, line
    assert "2 already there" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_sync_copies_the_valid_checkpoints_around_a_corrupt_one(finished, tmp_path: Path) -> None:
    """Bit rot in an older source checkpoint (sizes fine, checksum not) must not cost the newest.

    Either outcome is acceptable for the exit code (0 with a line about the skipped checkpoint, or
    1 with one error line naming it), but the valid checkpoints, step 12 above all, must arrive,
    and the broken one must not be committed at the destination.
    """
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(finished["run"], src)
    broken = _data_path(src, 9, "state.safetensors")
    data = bytearray(broken.read_bytes())
    data[-2] ^= 0xFF
    broken.write_bytes(bytes(data))
    proc = run_cli_inprocess("sync", str(src), str(dst))
    assert "Traceback" not in proc.stderr
    if proc.returncode != 0:
        line = _assert_one_error_line(proc, 1)
        assert re.search(r"step.*\b0*9\b", line), line  # names the broken checkpoint
    else:
        assert any(re.search(r"step.*\b0*9\b", line) and "not copied" in line for line in proc.stderr.splitlines()), proc.stderr
    assert _committed(dst) == [6, 12]
    assert run_cli_inprocess("verify", str(dst)).returncode == 0


# -- mirror --------------------------------------------------------------------------------------
def test_mirror_holds_the_run_and_resume_takes_it_from_there(finished, gcs_url: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # task.sleep keeps training slower than the mirror's uploads, so the mirror copies most
    # checkpoints (a copy overtaken by the primary's retention is cleared, see the test below)
    proc = run_cli("run", TINY_TASK, "--run-dir", str(run_dir), *SETTINGS, "task.sleep=0.05", f"checkpoint.mirror={gcs_url}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    remote = _ls(gcs_url)
    assert max(remote) == 12 and remote[12]["status"] == "committed", remote
    committed = [step for step, row in remote.items() if row["status"] == "committed"]
    assert len(committed) <= 3  # retention applies at the mirror too (keep_last=3)
    proc = run_cli("verify", gcs_url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    objects = _gs_files(gcs_url)
    assert {"run.yaml", "task/task.json", "task/tiny.py"} <= objects, objects
    assert_same_weights(_export(gcs_url, tmp_path / "mirror.safetensors"), finished["weights"])

    # the local disk loses every checkpoint: resume finds the newest one at the mirror
    shutil.rmtree(run_dir / "checkpoints")
    proc = run_cli("resume", str(run_dir), LONGER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [line for line in proc.stderr.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and resumed[0].split("resumed from ")[1].startswith(f"{gcs_url}/checkpoints/step-000000012"), proc.stderr
    assert _committed(run_dir) == [15]
    assert 15 in _committed(gcs_url)  # and the new checkpoint went to the mirror as well
    out = tmp_path / "final.safetensors"
    assert_same_weights(_export(run_dir, out), finished["weights15"])


def test_mirror_leaves_no_debris_when_the_primary_prunes_the_checkpoint_in_copy(finished, tmp_path: Path) -> None:
    """In-process and deterministic: the mirror's first upload is held until the primary's
    retention has deleted that checkpoint, as happens when training outpaces a slow mirror."""
    from resilient_train.checkpoint.manager import CheckpointManager
    from resilient_train.checkpoint.mirror import Mirror
    from resilient_train.checkpoint.retention import RetentionPolicy
    from resilient_train.storage import Storage

    run_dir = tmp_path / "run"
    shutil.copytree(finished["run"], run_dir)
    primary, target = Storage(str(run_dir)), Storage(f"memory://mirror-{uuid.uuid4().hex}")
    mirror = Mirror(primary, target, RetentionPolicy(keep_last=3))
    uploading, pruned = threading.Event(), threading.Event()
    real_write = mirror.target.root.write_bytes

    def slow_write(data, *parts):
        real_write(data, *parts)
        if parts[-1] != "manifest.json" and not uploading.is_set():
            uploading.set()
            pruned.wait(30)

    mirror.target.root.write_bytes = slow_write
    mirror.submit(6)
    assert uploading.wait(30)
    CheckpointManager(primary).delete(6)  # what the primary's keep_last does once step 15 is committed
    pruned.set()
    mirror.close()
    mirror.submit(12)
    mirror.close()

    left = {info.step: info.status for info in CheckpointManager(target).list()}
    assert left == {12: "committed"}, left


def test_resume_prefers_the_local_copy_when_both_hold_the_newest_step(finished, gcs_url: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli("run", TINY_TASK, "--run-dir", str(run_dir), *SETTINGS, f"checkpoint.mirror={gcs_url}", check=True)
    proc = run_cli("resume", str(run_dir), LONGER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [line for line in proc.stderr.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and str(run_dir / "checkpoints" / "step-000000012") in resumed[0], proc.stderr
    assert_same_weights(_export(run_dir, tmp_path / "w.safetensors"), finished["weights15"])


# -- inspect and env -----------------------------------------------------------------------------
def test_inspect_table_and_json(finished) -> None:
    run_dir = finished["run"]
    proc = run_cli_inprocess("inspect", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"run: {run_dir}" in text
    assert "session 1: from step 0" in text and "world size 1" in text
    assert f"checkpoint: {run_dir / 'checkpoints' / 'step-000000012'} (committed)" in text
    for line in ("step: 12", "world_size: 1", "precision: ", "written on: "):
        assert line in text, text

    report = json.loads(run_cli_inprocess("inspect", str(run_dir), "--json", check=True).stdout)
    assert report["run"] == str(run_dir)
    assert report["config"]["trainer"]["max_steps"] == 12 and report["config"]["task"]["n"] == 64
    assert len(report["sessions"]) == 1
    session = report["sessions"][0]
    assert session["world_size"] == 1 and session["start_step"] == 0 and session["session"] == 1
    assert [c["step"] for c in report["checkpoints"]] == [6, 9, 12]
    ck = report["checkpoint"]
    assert ck["step"] == 12 and ck["status"] == "committed" and ck["world_size"] == 1
    assert ck["precision"] in ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
    env = ck["environment"]
    assert env["torch"] == torch.__version__ and isinstance(env["gpus"], list) and env["host"]
    assert set(ck["files"]) >= {"model.safetensors", "state.json"}

    # one checkpoint folder: that checkpoint, not the newest
    one = json.loads(run_cli_inprocess("inspect", str(run_dir / "checkpoints" / "step-000000009"), "--json", check=True).stdout)
    assert one["checkpoint"]["step"] == 9 and one["run"] == str(run_dir)


def test_inspect_a_gcs_run(finished, gcs_url: str) -> None:
    run_cli("sync", str(finished["run"]), gcs_url, check=True)
    report = json.loads(run_cli("inspect", gcs_url, "--json", check=True).stdout)
    assert report["run"] == gcs_url
    assert report["checkpoint"]["step"] == 12
    assert report["checkpoint"]["path"] == f"{gcs_url}/checkpoints/step-000000012"
    assert report["sessions"][0]["world_size"] == 1


def test_env_table_and_json() -> None:
    proc = run_cli_inprocess("env")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if ":" in line}
    assert rows["torch"] == torch.__version__
    assert "gpus" in rows and "host" in rows and "precision_auto" in rows

    info = json.loads(run_cli_inprocess("env", "--json", check=True).stdout)
    assert info["torch"] == torch.__version__
    assert isinstance(info["gpus"], list) and len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for gpu in info["gpus"]:
        assert {"name", "memory_gib", "capability"} <= set(gpu)
    assert info["host"] in ("local", "colab", "kaggle")  # the tests strip COLAB_RELEASE_TAG
    assert info["precision_auto"] in ("32-true", "bf16-mixed", "16-mixed")
    if not torch.cuda.is_available():
        assert info["precision_auto"] == "32-true" and rows["gpus"] == "none"


# -- bad input -----------------------------------------------------------------------------------
def test_missing_targets_exit_3_with_one_error_line(finished, tmp_path: Path, gcs_emulator) -> None:
    missing = tmp_path / "missing"
    missing_gs = gcs_emulator.url(uuid.uuid4().hex)
    cases = [
        (("verify", str(missing)), "missing"),
        (("verify", str(missing / "checkpoints" / "step-000000003")), "step-000000003"),
        (("verify", str(finished["run"] / "checkpoints" / "step-000000099")), "step-000000099"),
        (("verify", missing_gs), missing_gs),
        (("inspect", str(missing)), "missing"),
        (("inspect", str(missing), "--json"), "missing"),
        (("inspect", str(finished["run"] / "checkpoints" / "step-000000099")), "step-000000099"),
        (("sync", str(missing), str(tmp_path / "dst")), "missing"),
        (("sync", missing_gs, str(tmp_path / "dst")), missing_gs),
    ]
    for args, fragment in cases:
        _assert_one_error_line(run_cli_fast(*args), 3, fragment)
    assert not (tmp_path / "dst").exists()  # a failed sync creates nothing


def test_verify_of_a_run_without_checkpoints_exits_3(tmp_path: Path, finished) -> None:
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    shutil.copy(finished["run"] / "run.yaml", run_dir / "run.yaml")
    _assert_one_error_line(run_cli_inprocess("verify", str(run_dir)), 3, "no checkpoints")


def test_missing_arguments_are_usage_errors() -> None:
    for args in (("verify",), ("sync", "only-one"), ("inspect",), ("env", "extra")):
        _assert_one_error_line(run_cli_inprocess(*args), 2)


def test_unknown_url_scheme_is_bad_input(finished, tmp_path: Path) -> None:
    _assert_one_error_line(run_cli_inprocess("sync", str(finished["run"]), "nosuchproto://bucket/run"), 2, "nosuchproto")
    _assert_one_error_line(run_cli_inprocess("verify", "nosuchproto://bucket/run"), 2, "nosuchproto")
