"""A checkpoint folder controlled by an attacker must be unable to run code (design guide, section 4).

Files replaced by pickle payloads (plain pickle and `torch.save` format) are never executed by
`ls`, `inspect`, `verify`, `export` or `resume`. The worst case is modelled: the attacker also
rewrites `manifest.json` so sizes and checksums match the payloads, i.e. every checksum check
passes. Each payload, if ever unpickled, creates a marker file; the marker must never appear.

`export` and `resume` must then either fall back to an older valid checkpoint or fail with an
exit code other than 0, exactly one `error:` line and no traceback.

Two more guards: a static one (the package source never calls an unpickler, and `torch.load` only
with `weights_only=True`), and a runtime one (an audit hook in the CLI subprocess records every
`pickle.find_class`, which any pickle that could run code must go through).

Not covered, by design: `resume` executes the run's task snapshot (`task/*.py`); whoever controls
the folder controls that code. The promise is about checkpoint data.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckpt_files import data_path, read_manifest
from conftest import REPO, TINY_TASK, cli_env, error_lines, run_cli
from helpers import assert_same_weights, run_cli_inprocess

SETTINGS = ["trainer.max_steps=12", "checkpoint.every_n_steps=3", "checkpoint.keep_last=3", "task.n=64"]
DATA_FILES = ("model.safetensors", "state.safetensors", "state.json", "rng-rank00000.json")
NEWEST, OLDER = "step-000000012", "step-000000009"

try:
    import google_crc32c
except ImportError:  # pragma: no cover - a dependency of resilient_train
    google_crc32c = None


class _Payload:
    """Unpickling this calls `open(marker, "w")`: the marker file appears. No shell involved."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload(kind: str, marker: Path) -> bytes:
    obj = {"state": _Payload(str(marker)), "step": 12}
    if kind == "pickle":
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if kind == "pickle0":  # protocol 0 is ASCII: valid UTF-8, so JSON readers see text, not bytes
        return pickle.dumps(obj, protocol=0)
    if kind == "torch":  # the zip format of torch.save, what a `.pt` / `.ckpt` file holds
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    raise ValueError(kind)


def _record(data: bytes, like: dict) -> dict:
    """A manifest record that matches `data`, with the checksum kind (and physical name) of `like`."""
    where = {"path": like["path"]} if "path" in like else {}
    if "crc32c" in like:
        assert google_crc32c is not None
        return {"bytes": len(data), "crc32c": f"{google_crc32c.value(data):08x}", **where}
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **where}


KINDS = ("pickle", "pickle0", "torch")


def plant(run_dir: Path, kind: str, scope: str, marker: Path, files: tuple[str, ...] = DATA_FILES) -> list[str]:
    """Replace data files of the newest (or every) checkpoint by payloads; rewrite manifests to match.

    `kind="mixed"` rotates the three payload kinds over files and checkpoints.
    """
    root = run_dir / "checkpoints"
    folders = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    chosen = folders[-1:] if scope == "newest" else folders
    for i, name in enumerate(chosen):
        step = int(name[len("step-"):])
        manifest = read_manifest(run_dir, step)
        for j, fname in enumerate(files):
            assert fname in manifest["files"], manifest["files"].keys()
            data = payload(KINDS[(i + j) % len(KINDS)] if kind == "mixed" else kind, marker)
            Path(data_path(run_dir, step, fname)).write_bytes(data)  # the file the manifest points at
            manifest["files"][fname] = _record(data, manifest["files"][fname])
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    return chosen


def _assert_clean_failure(proc) -> None:
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def _exported_step(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


AUDIT_HOOK = """
import os, sys

_LOG = os.environ.get("RT_PICKLE_AUDIT_LOG")

def _hook(event, args):
    if event == "pickle.find_class" and _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{args[0]}.{args[1]}\\n")

sys.addaudithook(_hook)
"""


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hook_dir = tmp_path_factory.mktemp("pickle_audit")
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    return hook_dir


@pytest.fixture(autouse=True)
def audited(audit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Runtime guard around every test: each CLI subprocess records every global a pickle resolves
    (`pickle.find_class`, the step any code execution from a pickle needs); none may happen."""
    log = tmp_path / "find_class.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(audit_dir), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RT_PICKLE_AUDIT_LOG", str(log))
    yield log
    assert not log.exists(), f"a CLI process unpickled: {log.read_text()}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, trained_runs) -> dict:
    """A finished run (never modified) and the exports of its two newest checkpoints (set up before
    the audit, in this process; the tests' own CLI calls are the audited subprocesses)."""
    tmp = tmp_path_factory.mktemp("nopickle_baseline")
    run_dir = trained_runs.copy(tmp / "run", *SETTINGS)
    exports = {}
    for step, folder in ((12, NEWEST), (9, OLDER)):
        out = tmp / f"step{step}.safetensors"
        run_cli_inprocess("export", str(run_dir / "checkpoints" / folder), str(out), check=True)
        exports[step] = load_file(str(out))
    return {"run": run_dir, "exports": exports}


@pytest.fixture
def hostile(baseline, tmp_path: Path, request) -> tuple[Path, Path, str]:
    kind, scope = request.param
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(baseline["run"], run_dir)
    plant(run_dir, kind, scope, marker)
    return run_dir, marker, scope


# -- the payloads have teeth, the guards work ----------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_payloads_run_code_when_loaded_unsafely(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    data = payload(kind, marker)
    if kind == "torch":
        with pytest.raises(Exception):
            torch.load(io.BytesIO(data), weights_only=True)  # the safe loader refuses it
        assert not marker.exists()
        torch.load(io.BytesIO(data), weights_only=False)
    else:
        pickle.loads(data)
    assert marker.exists(), "the payload would not have detected an unpickle"


def test_the_audit_hook_sees_an_unpickling_subprocess(audited: Path) -> None:
    code = "import pickle, collections; pickle.loads(pickle.dumps(collections.OrderedDict()))"
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env())
    assert "collections.OrderedDict" in audited.read_text()
    audited.unlink()


# -- the commands --------------------------------------------------------------------------------
def test_ls_inspect_verify_never_unpickle(baseline, tmp_path: Path) -> None:
    """Every checkpoint hostile, all payload kinds mixed; every checksum still matches."""
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(baseline["run"], run_dir)
    plant(run_dir, "mixed", "all", marker)
    newest = str(run_dir / "checkpoints" / NEWEST)
    outputs = {}
    for args in (
        ("ls", str(run_dir)),
        ("ls", str(run_dir), "--json"),
        ("inspect", str(run_dir)),
        ("inspect", str(run_dir), "--json"),
        ("inspect", newest, "--json"),
        ("verify", str(run_dir)),
        ("verify", newest),
    ):
        proc = run_cli(*args)
        assert not marker.exists(), f"`{' '.join(args)}` executed a pickle payload"
        assert proc.returncode == 0, (args, proc.stderr)  # the attacker made every checksum match
        assert "Traceback" not in proc.stderr and not error_lines(proc.stderr), proc.stderr
        outputs[args] = proc.stdout
    rows = json.loads(outputs[("ls", str(run_dir), "--json")])
    assert [(r["step"], r["status"]) for r in rows] == [(6, "committed"), (9, "committed"), (12, "committed")]
    assert json.loads(outputs[("inspect", str(run_dir), "--json")])["checkpoint"]["step"] == 12
    assert json.loads(outputs[("inspect", newest, "--json")])["checkpoint"]["step"] == 12
    assert outputs[("verify", str(run_dir))].count(": ok") == 3


EXPORT_VARIANTS = [
    pytest.param(("pickle", "newest"), id="pickle-newest"),
    pytest.param(("pickle0", "newest"), id="pickle0-newest"),
    pytest.param(("torch", "newest"), id="torch-newest"),
    pytest.param(("mixed", "all"), id="mixed-all"),
]


@pytest.mark.parametrize("hostile", EXPORT_VARIANTS, indirect=True)
def test_export_never_unpickles_and_falls_back_or_fails_cleanly(hostile, baseline, tmp_path: Path) -> None:
    run_dir, marker, scope = hostile
    out = tmp_path / "w.safetensors"
    proc = run_cli("export", str(run_dir), str(out))
    assert not marker.exists(), "export executed a pickle payload"
    if proc.returncode == 0:  # fell back to an older checkpoint that really is ours
        assert scope == "newest", "every checkpoint is hostile, yet export claims success"
        step = _exported_step(out)
        assert step in baseline["exports"] and step < 12, step
        assert_same_weights(load_file(str(out)), baseline["exports"][step])
    else:
        _assert_clean_failure(proc)
        assert not out.exists()

    # asked for the hostile checkpoint itself: a clean failure, nothing written
    out12 = tmp_path / "w12.safetensors"
    proc = run_cli("export", str(run_dir / "checkpoints" / NEWEST), str(out12))
    assert not marker.exists(), "export of one checkpoint executed a pickle payload"
    _assert_clean_failure(proc)
    assert not out12.exists()


RESUME_VARIANTS = [
    pytest.param(("pickle", "newest"), id="pickle-newest"),
    pytest.param(("torch", "newest"), id="torch-newest"),
    pytest.param(("mixed", "all"), id="mixed-all"),
]


@pytest.mark.parametrize("hostile", RESUME_VARIANTS, indirect=True)
def test_resume_never_unpickles_and_falls_back_or_fails_cleanly(hostile) -> None:
    run_dir, marker, scope = hostile
    proc = run_cli("resume", str(run_dir))
    assert not marker.exists(), "resume executed a pickle payload"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    skipped = [line for line in lines if "skipping checkpoint" in line]
    if scope == "newest":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(skipped) == 1 and NEWEST in skipped[0], proc.stderr
        assert any("resumed from" in line and OLDER in line for line in lines), proc.stderr
    else:
        assert not any("resumed from" in line for line in lines), proc.stderr
        if proc.returncode != 0:
            _assert_clean_failure(proc)
        else:  # it trained from scratch: it must at least have said what it skipped
            assert [NEWEST in skipped[0], OLDER in skipped[1], "step-000000006" in skipped[2]] == [True] * 3, proc.stderr


@pytest.mark.parametrize("fname", ["state.safetensors", "rng-rank00000.json"])
def test_resume_decodes_no_single_hostile_file(fname: str, baseline, tmp_path: Path) -> None:
    """One file replaced at a time, so each payload really reaches its decoder (state.json, read
    first, would otherwise stop decoding before the tensor files are parsed)."""
    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(baseline["run"], run_dir)
    plant(run_dir, "torch" if fname.endswith(".safetensors") else "pickle0", "newest", marker, files=(fname,))
    proc = run_cli("resume", str(run_dir))
    assert not marker.exists(), f"resume executed a pickle payload in {fname}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and NEWEST in skipped[0] and fname in skipped[0], proc.stderr
    assert any("resumed from" in line and OLDER in line for line in proc.stderr.splitlines()), proc.stderr


@pytest.mark.parametrize("hostile", [RESUME_VARIANTS[1], RESUME_VARIANTS[2]], indirect=True)
def test_a_resume_that_succeeds_leaves_a_usable_run(hostile, baseline, tmp_path: Path) -> None:
    """Exit 0 from resume promises a finished run: its newest checkpoint decodes and is right.

    With only the newest checkpoint hostile, the resumed run re-trains steps 10-12 from step 9 and
    must store them (rewriting the foreign step 12), ending bit-identical to the uninterrupted run.
    With every checkpoint hostile there is nothing to resume: either stop with a clean error, or
    train from scratch and store real checkpoints; never exit 0 leaving the foreign files behind.
    """
    run_dir, marker, scope = hostile
    proc = run_cli("resume", str(run_dir))
    assert not marker.exists()
    if proc.returncode != 0:
        assert scope == "all", proc.stderr[-3000:]
        _assert_clean_failure(proc)
        return
    out = tmp_path / "final.safetensors"
    exported = run_cli("export", str(run_dir), str(out))
    assert exported.returncode == 0, exported.stderr
    assert _exported_step(out) == 12
    assert_same_weights(load_file(str(out)), baseline["exports"][12])
    assert not marker.exists()


def test_foreign_manifest_and_yaml_payloads_are_never_executed(baseline, tmp_path: Path) -> None:
    """manifest.json itself a pickle; run.yaml a YAML python-object payload: both stay data."""
    run_dir, marker, yaml_marker = tmp_path / "run", tmp_path / "PWNED", tmp_path / "PWNED_YAML"
    shutil.copytree(baseline["run"], run_dir)
    (run_dir / "checkpoints" / NEWEST / "manifest.json").write_bytes(payload("pickle0", marker))
    rows = {r["step"]: r for r in json.loads(run_cli("ls", str(run_dir), "--json", check=True).stdout)}
    assert rows[12]["status"] == "corrupt"
    proc = run_cli("export", str(run_dir), str(tmp_path / "w.st"))
    assert proc.returncode == 0, proc.stderr
    assert _exported_step(tmp_path / "w.st") == 9
    assert not marker.exists()

    (run_dir / "run.yaml").write_text(f"!!python/object/apply:builtins.open ['{yaml_marker}', 'w']\n")
    proc = run_cli("resume", str(run_dir))
    assert not yaml_marker.exists(), "resume executed a YAML payload in run.yaml"
    _assert_clean_failure(proc)
    assert proc.returncode == 2 and "run.yaml" in error_lines(proc.stderr)[0], proc.stderr


# -- static guard ---------------------------------------------------------------------------------
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
LOAD_NAMES = {"load", "loads", "Unpickler", "open"}  # shelve.open unpickles too


def _unsafe_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: dict[str, str] = {}  # local name -> module it stands for
    direct: dict[str, str] = {}  # local name -> "module.attr" imported from an unpickler
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if node.module.split(".")[0] in UNPICKLERS and alias.name in LOAD_NAMES:
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
                if node.module == "torch" and alias.name == "load":
                    direct[alias.asname or alias.name] = "torch.load"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, target = node.func, None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            target = f"{modules.get(func.value.id, func.value.id)}.{func.attr}"
        elif isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Attribute) and func.value.attr == "fabric":
            target = "fabric.load"
        elif isinstance(func, ast.Name) and func.id in direct:
            target = direct[func.id]
        if target is None:
            continue
        module, _, attr = target.rpartition(".")
        weights_only = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
        if module.split(".")[0] in UNPICKLERS and attr in LOAD_NAMES:
            found.append(f"{path}:{node.lineno}: {target}(...)")
        elif target in ("torch.load", "torch.serialization.load") and not weights_only:
            found.append(f"{path}:{node.lineno}: {target} without weights_only=True")
        elif target in ("fabric.load", "self.fabric.load") or (attr == "load" and module == "fabric"):
            found.append(f"{path}:{node.lineno}: {target} (Lightning's loader unpickles)")
        elif module.split(".")[0] in ("numpy", "np") and attr == "load" and any(k.arg == "allow_pickle" for k in node.keywords):
            found.append(f"{path}:{node.lineno}: {target}(allow_pickle=...)")
        elif attr == "read_pickle":
            found.append(f"{path}:{node.lineno}: {target}")
    return found


def test_source_never_calls_an_unpickler() -> None:
    sources = sorted((REPO / "src" / "resilient_train").rglob("*.py"))
    assert len(sources) > 10
    problems = [p for path in sources for p in _unsafe_calls(path)]
    assert not problems, "unpickling calls in resilient_train:\n" + "\n".join(problems)


def test_the_source_scan_catches_what_it_should(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent("""
        import pickle as pk
        import torch
        from torch import load as tl
        from pickle import loads
        pk.loads(b"")
        torch.load("f")
        torch.load("f", weights_only=False)
        torch.load("f", weights_only=True)
        tl("f")
        self.fabric.load("f")
    """))
    found = _unsafe_calls(sample)
    assert len(found) == 6, found  # all but the weights_only=True call
