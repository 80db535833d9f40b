"""Every defect of a checkpoint is a CheckpointError (issue 8, case 5).

A checkpoint from a shared Drive folder or a bucket may be foreign, damaged or hostile, and the
attacker can make every checksum match. Each variant below rewrites one file of the newest
checkpoint of a real run (or its manifest) and fixes up the manifest record, so only decoding can
tell. The real decoding path (manifest, tensor files, tagged JSON, restore into the task's model)
must then raise CheckpointError with one line, never KeyError, TypeError, ValueError, IndexError,
AttributeError, RecursionError or MemoryError; and through the CLI, `ls`, `inspect`, `verify` and
`export` must print at most one error line without a traceback while `resume` falls back to the
older valid checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from conftest import REPO, TINY_TASK, cli_env, error_lines
from helpers import run_cli_inprocess
from resilient_train import state
from resilient_train.checkpoint import codec, jsonio, tensorfile
from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.manifest import MANIFEST, check_file, decode_manifest, file_record, physical_name
from resilient_train.errors import CheckpointError

SETTINGS = ["trainer.max_steps=6", "checkpoint.every_n_steps=3", "checkpoint.keep_last=3", "task.n=64"]
NEWEST, OLDER = "step-000000006", "step-000000003"
MiB = 2**20


# -- a real run, and the files of its newest checkpoint -------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with checkpoints at steps 3 and 6 (never modified by the tests)."""
    run_dir = tmp_path_factory.mktemp("hostile_baseline") / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), *SETTINGS, check=True)
    return run_dir


@pytest.fixture
def run_dir(baseline: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(baseline, copy)
    return copy


def newest(run: Path) -> Path:
    return run / "checkpoints" / NEWEST


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_bytes())


def write_manifest(folder: Path, manifest: Any) -> None:
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (folder / MANIFEST).write_bytes(data)


def read_file(folder: Path, logical: str) -> bytes:
    record = read_manifest(folder)["files"][logical]
    return (folder / physical_name(logical, record)).read_bytes()


def rewrite(folder: Path, logical: str, data: bytes) -> None:
    """Replace one data file and fix up its manifest record, so every checksum matches."""
    manifest = read_manifest(folder)
    record = manifest["files"][logical]
    (folder / physical_name(logical, record)).write_bytes(data)
    manifest["files"][logical] = {**record, **file_record(data)}
    write_manifest(folder, manifest)


def edit_json(logical: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    """A variant: `change` gets the parsed file and returns the new content (bytes for raw text)."""

    def apply(folder: Path) -> None:
        new = change(json.loads(read_file(folder, logical)))
        rewrite(folder, logical, new if isinstance(new, bytes) else json.dumps(new).encode())

    return apply


def edit_manifest(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        new = change(read_manifest(folder))
        write_manifest(folder, new)

    return apply


def edit_tensors(logical: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = {k: v.clone() for k, v in tensorfile.deserialize(bytearray(read_file(folder, logical))).items()}
        change(tensors)
        rewrite(folder, logical, tensorfile.serialize(tensors).tobytes())

    return apply


def edit_header(logical: str, change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """Rewrite the JSON header of a safetensors file, keeping its data section."""

    def apply(folder: Path) -> None:
        data = read_file(folder, logical)
        size = int.from_bytes(data[:8], "little")
        new = change(json.loads(data[8 : 8 + size]))
        raw = new if isinstance(new, bytes) else json.dumps(new).encode()
        rewrite(folder, logical, len(raw).to_bytes(8, "little") + raw + data[8 + size :])

    return apply


def _train(change: Callable[[dict], Any]) -> Callable[[Any], Any]:
    def apply(meta: Any) -> Any:
        change(meta["train"])
        return meta

    return apply


def _set(path: str, value: Any) -> Callable[[dict], dict]:
    """Set a value inside a JSON tree by a slash-separated path; returns the tree."""
    *parents, last = path.split("/")

    def apply(root: dict) -> dict:
        tree: Any = root
        for part in parents:
            tree = tree[int(part)] if isinstance(tree, list) else tree[part]
        if isinstance(tree, list):
            tree[int(last)] = value
        else:
            tree[last] = value
        return root

    return apply


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _drop(key: str) -> Callable[[dict], Any]:
    def apply(mapping: dict) -> dict:
        del mapping[key]
        return mapping

    return apply


def _record(logical: str, change: Callable[[dict], Any]) -> Callable[[dict], dict]:
    def apply(manifest: dict) -> dict:
        manifest["files"][logical] = change(manifest["files"][logical])
        return manifest

    return apply


def _field(key: str, value: Any) -> Callable[[dict], dict]:
    def apply(manifest: dict) -> dict:
        manifest[key] = value
        return manifest

    return apply


def _path(value: str) -> Callable[[dict], dict]:
    return _record("state.json", lambda r: {**r, "path": value})


def _huge_json(meta: dict) -> bytes:
    return json.dumps({**meta, "padding": "x" * (jsonio.MAX_BYTES + MiB)}).encode()


def _deep_raw(meta: dict) -> bytes:
    return b'{"model_aliases": {}, "train": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


# Each variant leaves every checksum matching; the manifest-level ones make the checkpoint
# unreadable before any data file is looked at.
MANIFEST_VARIANTS: dict[str, Callable[[Path], None]] = {
    "manifest-100000-brackets": lambda f: write_manifest(f, b"[" * 100_000),
    "manifest-deep-but-complete": edit_manifest(_field("extra", _nested(500))),
    "manifest-huge": edit_manifest(_field("padding", "x" * (17 * MiB))),
    "manifest-not-utf8": lambda f: write_manifest(f, b"\xff\xfe{}"),
    "manifest-nan-metric": lambda f: write_manifest(f, (f / MANIFEST).read_bytes().replace(b'"metrics":{', b'"metrics":{"bad":NaN,')),
    "manifest-a-list": lambda f: write_manifest(f, b"[1, 2]"),
    "files-empty": edit_manifest(_field("files", {})),
    "files-a-list": edit_manifest(_field("files", [])),
    "files-record-a-number": edit_manifest(_record("state.json", lambda r: 1241)),
    "record-bytes-a-string": edit_manifest(_record("state.json", lambda r: {**r, "bytes": str(r["bytes"])})),
    "record-bytes-negative": edit_manifest(_record("state.json", lambda r: {**r, "bytes": -1})),
    "record-without-checksum": edit_manifest(_record("state.json", lambda r: {"bytes": r["bytes"], "path": r.get("path", "state.json")})),
    "record-crc32c-not-hex": edit_manifest(_record("state.json", lambda r: {**r, "crc32c": "not-hex!"})),
    "path-dotdot": edit_manifest(_path("../x")),
    "path-with-slash": edit_manifest(_path("a/b")),
    "path-absolute": edit_manifest(_path("/etc/passwd")),
    "path-a-number": edit_manifest(_path(7)),  # type: ignore[arg-type]
    "path-the-manifest": edit_manifest(_path(MANIFEST)),
    "logical-name-dotdot": edit_manifest(lambda m: {**m, "files": {"../state.json" if k == "state.json" else k: v for k, v in m["files"].items()}}),
    "step-a-string": edit_manifest(_field("step", "6")),
    "step-true": edit_manifest(_field("step", True)),
    "step-missing": edit_manifest(_drop("step")),
    "format-version-a-string": edit_manifest(_field("format_version", "1")),
    "metrics-a-string": edit_manifest(_field("metrics", {"loss": "low"})),
    "environment-gpus-not-maps": edit_manifest(_field("environment", {"gpus": [1, 2]})),
    "world-size-zero": edit_manifest(_field("world_size", 0)),
}

DECODE_VARIANTS: dict[str, Callable[[Path], None]] = {
    # state.json: tags and types
    "unknown-tag": edit_json("state.json", _train(_set("optimizer", {"__evil__": 1}))),
    "unknown-tag-beside-a-key": edit_json("state.json", _train(_set("progress", {"__tensor__": "x", "step": 1}))),
    "tensor-tag-a-number": edit_json("state.json", _train(_set("progress/step", {"__tensor__": 5}))),
    "tensor-tag-dangling": edit_json("state.json", _train(_set("progress/step", {"__tensor__": "no/such/tensor"}))),
    "tuple-tag-a-string": edit_json("state.json", _train(_set("optimizer/param_groups/0/betas", {"__tuple__": "abc"}))),
    "dict-entry-not-a-pair": edit_json("state.json", _train(_set("optimizer/state", {"__dict__": [[0]]}))),
    "dict-entry-a-number": edit_json("state.json", _train(_set("optimizer/state", {"__dict__": [5]}))),
    "dict-key-unhashable": edit_json("state.json", _train(_set("optimizer/state", {"__dict__": [[[1, 2], {}]]}))),
    "dict-tag-a-map": edit_json("state.json", _train(_set("optimizer/state", {"__dict__": {"a": 1}}))),
    "float-tag-not-a-number": edit_json("state.json", _train(_set("progress/best", {"loss": {"__float__": "lots"}}))),
    "float-tag-a-list": edit_json("state.json", _train(_set("progress/best", {"loss": {"__float__": [1]}}))),
    "bytes-tag-not-base64": edit_json("state.json", _train(_set("progress/best", {"__bytes__": "!!not base64!!"}))),
    # state.json: shape
    "train-a-list": edit_json("state.json", _set("train", [1, 2])),
    "train-a-string": edit_json("state.json", _set("train", "x")),
    "train-missing": edit_json("state.json", _drop("train")),
    "state-json-a-list": edit_json("state.json", lambda meta: [meta]),
    "state-json-a-number": edit_json("state.json", lambda meta: 7),
    "state-json-not-json": edit_json("state.json", lambda meta: b"\x80\x04not json"),
    "state-json-deep": edit_json("state.json", _deep_raw),
    "state-json-deep-but-complete": edit_json("state.json", _train(_set("progress/best", {"x": _nested(200)}))),
    "state-json-huge": edit_json("state.json", _huge_json),
    "model-aliases-a-string": edit_json("state.json", _set("model_aliases", "x")),
    "model-aliases-to-a-missing-key": edit_json("state.json", _set("model_aliases", {"9.weight": "no.such.key"})),
    "model-aliases-to-a-number": edit_json("state.json", _set("model_aliases", {"9.weight": 3})),
    "model-aliases-over-a-stored-key": edit_json("state.json", _set("model_aliases", {"0.bias": "3.bias"})),
    "state-json-not-listed": edit_manifest(lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "state.json"}}),
    "model-not-listed": edit_manifest(lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "model.safetensors"}}),
    # RNG file
    "rng-bytes-not-base64": edit_json("rng-rank00000.json", _set("torch", {"__bytes__": "%%%"})),
    "rng-a-list": edit_json("rng-rank00000.json", lambda rng: [1, 2, 3]),
    "rng-unknown-tag": edit_json("rng-rank00000.json", _set("python", {"__code__": "print(1)"})),
    # tensor files whose header lies
    "header-offsets-past-the-end": edit_header("model.safetensors", lambda h: {**h, "0.bias": {**h["0.bias"], "data_offsets": [h["0.bias"]["data_offsets"][0], 10**9]}}),
    "header-unknown-dtype": edit_header("model.safetensors", lambda h: {**h, "0.bias": {**h["0.bias"], "dtype": "OBJECT"}}),
    "header-shape-of-strings": edit_header("model.safetensors", lambda h: {**h, "0.bias": {**h["0.bias"], "shape": ["32"]}}),
    "header-shape-of-floats": edit_header("model.safetensors", lambda h: {**h, "0.bias": {**h["0.bias"], "shape": [32.0]}}),
    "header-entry-a-list": edit_header("model.safetensors", lambda h: {**h, "0.bias": [1, 2]}),
    "header-metadata-a-list": edit_header("model.safetensors", lambda h: {**h, "__metadata__": [1]}),
    "header-deep": edit_header("model.safetensors", lambda h: {**h, "__metadata__": {"x": _nested(100)}}),
    "header-infinity": edit_header("model.safetensors", lambda h: json.dumps(h).replace('"shape": [32]', '"shape": [Infinity]', 1).encode()),
    "header-a-list": edit_header("state.safetensors", lambda h: [h]),
    "header-not-json": edit_header("state.safetensors", lambda h: b"{" * 64),
}

# These decode; restoring them into the task's model, optimizer and scheduler must fail cleanly.
RESTORE_VARIANTS: dict[str, Callable[[Path], None]] = {
    "progress-step-a-string": edit_json("state.json", _train(_set("progress/step", "six"))),
    "progress-step-negative": edit_json("state.json", _train(_set("progress/step", -4))),
    "progress-a-number": edit_json("state.json", _train(_set("progress", 3))),
    "progress-missing": edit_json("state.json", _train(_drop("progress"))),
    "progress-best-of-strings": edit_json("state.json", _train(_set("progress/best", {"val_loss": "low"}))),
    "optimizer-a-string": edit_json("state.json", _train(_set("optimizer", "adam"))),
    "optimizer-lr-a-string": edit_json("state.json", _train(_set("optimizer/param_groups/0/lr", "fast"))),
    "optimizer-betas-too-short": edit_json("state.json", _train(_set("optimizer/param_groups/0/betas", {"__tuple__": [0.9]}))),
    "optimizer-groups-a-map": edit_json("state.json", _train(_set("optimizer/param_groups", {"x": 1}))),
    "optimizer-state-of-a-missing-param": edit_json("state.json", _train(_set("optimizer/state", {"__dict__": [[99, {}]]}))),
    "scheduler-last-epoch-a-string": edit_json("state.json", _train(_set("scheduler/last_epoch", "x"))),
    "scheduler-a-list": edit_json("state.json", _train(_set("scheduler", [1]))),
    "scheduler-base-lrs-too-long": edit_json("state.json", _train(_set("scheduler/base_lrs", [0.1, 0.1]))),
    "weight-of-the-wrong-dtype": edit_tensors("model.safetensors", lambda t: t.update({"0.weight": t["0.weight"].to(torch.int32)})),
    "weight-of-the-wrong-shape": edit_tensors("model.safetensors", lambda t: t.update({"0.weight": t["0.weight"].t().contiguous()})),
    "weight-missing": edit_tensors("model.safetensors", lambda t: t.pop("3.bias")),
    "weight-unexpected": edit_tensors("model.safetensors", lambda t: t.update({"9.weight": torch.zeros(2)})),
    "moment-of-the-wrong-shape": edit_tensors("state.safetensors", lambda t: t.update({"optimizer/state/0/exp_avg": torch.zeros(3)})),
}


def _tiny_objects() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """The tiny task's model, optimizer and scheduler, built by the task's own `build`."""
    spec = importlib.util.spec_from_file_location("tiny_task_for_hostile_tests", TINY_TASK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build(OmegaConf.create(module.CONFIG))
    optimizer = built["optimizer"](built["model"].parameters())
    return built["model"], optimizer, built["scheduler"](optimizer)


def decode_checkpoint(folder: Path) -> tuple[state.Progress, list[str]]:
    """The whole read path of resume and export, with the real functions: manifest, checksums,
    tensor files, tagged JSON, model export view, and restore into fresh task objects."""
    manifest = decode_manifest((folder / MANIFEST).read_bytes())
    files = {}
    for logical, record in manifest["files"].items():
        data = (folder / physical_name(logical, record)).read_bytes()
        assert check_file(logical, data, record) is None, "the variant must keep every checksum matching"
        files[logical] = bytearray(data)
    fmt.decode_model(files)
    snapshot = fmt.decode(files, 0)
    model, optimizer, scheduler = _tiny_objects()
    return state.restore(snapshot, model, optimizer, scheduler, None)


def _assert_one_line_checkpoint_error(folder: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as excinfo:
        decode_checkpoint(folder)
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    assert len(message) < 600, message
    return excinfo.value


# -- the decoding layer ---------------------------------------------------------------------------
def test_the_untouched_checkpoint_decodes_and_restores(run_dir: Path) -> None:
    progress, problems = decode_checkpoint(newest(run_dir))
    assert progress.step == 6 and problems == []


@pytest.mark.parametrize("variant", sorted(MANIFEST_VARIANTS))
def test_a_malformed_manifest_is_a_checkpoint_error(variant: str, run_dir: Path) -> None:
    MANIFEST_VARIANTS[variant](newest(run_dir))
    error = _assert_one_line_checkpoint_error(newest(run_dir))
    assert "manifest.json" in str(error)


@pytest.mark.parametrize("variant", sorted(DECODE_VARIANTS))
def test_malformed_checkpoint_contents_are_a_checkpoint_error(variant: str, run_dir: Path) -> None:
    DECODE_VARIANTS[variant](newest(run_dir))
    decode_manifest((newest(run_dir) / MANIFEST).read_bytes())  # the manifest itself is fine
    _assert_one_line_checkpoint_error(newest(run_dir))


@pytest.mark.parametrize("variant", sorted(RESTORE_VARIANTS))
def test_contents_that_do_not_fit_the_task_are_a_checkpoint_error(variant: str, run_dir: Path) -> None:
    RESTORE_VARIANTS[variant](newest(run_dir))
    _assert_one_line_checkpoint_error(newest(run_dir))


def test_a_restore_that_does_not_fit_changes_nothing(run_dir: Path) -> None:
    """Everything is checked before the first weight is copied: a failed restore leaves the model,
    optimizer and scheduler as they were (resume then tries an older checkpoint on them)."""
    RESTORE_VARIANTS["scheduler-last-epoch-a-string"](newest(run_dir))
    files = {name: bytearray(read_file(newest(run_dir), name)) for name in read_manifest(newest(run_dir))["files"]}
    model, optimizer, scheduler = _tiny_objects()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="scheduler"):
        state.restore(fmt.decode(files, 0), model, optimizer, scheduler, None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 0


def test_the_shape_mismatch_message_names_the_key_and_the_fix(run_dir: Path) -> None:
    RESTORE_VARIANTS["weight-of-the-wrong-shape"](newest(run_dir))
    error = _assert_one_line_checkpoint_error(newest(run_dir))
    assert "does not fit this model" in str(error) and "size mismatch for 0.weight" in str(error)


def test_a_broken_rng_entry_is_reported_not_raised(run_dir: Path) -> None:
    """RNG states are restored one by one, each failure a line (design guide: never skip the others)."""
    edit_json("rng-rank00000.json", _set("cuda", 5))(newest(run_dir))
    edit_json("rng-rank00000.json", _set("python", {"__tuple__": [3, {"__tuple__": [10**30] * 625}, None]}))(newest(run_dir))
    progress, problems = decode_checkpoint(newest(run_dir))
    assert progress.step == 6
    assert any("Python" in p for p in problems) and any("CUDA" in p for p in problems), problems


# -- the pieces, directly -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tree",
    [
        {"__evil__": 1},
        {"a": {"__tensor__": "t", "b": 1}},
        {"__tensor__": ["t"]},
        {"__tuple__": {"a": 1}},
        {"__dict__": [[1, 2, 3]]},
        {"__dict__": [[{"__tuple__": [[1]]}, 1]]},
        {"__bytes__": 12},
        {"__bytes__": "é"},
        {"__float__": None},
        [{"__float__": "x"}],
    ],
)
def test_codec_decode_refuses_what_encode_cannot_write(tree: Any) -> None:
    with pytest.raises(CheckpointError) as excinfo:
        codec.decode(tree, {"t": torch.zeros(1)}, "state.json")
    assert "state.json" in str(excinfo.value) or "tensor" in str(excinfo.value)


def test_codec_decode_of_a_tree_deeper_than_python_recurses_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError):
        codec.decode(_nested(100_000), {})


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert jsonio.json_depth(b'{"a": "[[[[[[[[[[[[", "b": [1]}', limit=3) == 2
    assert jsonio.json_depth(b'["\\"[[[[[[[[", [[1]]]', limit=2) == 3  # stops counting past the limit
    assert jsonio.loads_json(b'{"a": "' + b"[" * 1000 + b'"}', "x.json") == {"a": "[" * 1000}


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b"[" * 65 + b"]" * 65,
        b'"' + b'\\"' * 200_000,  # an unterminated string full of escapes: linear, then invalid
        b"[]" * 70 + b'"' + b'\\"' * 200_000,  # the same past the bracket-count shortcut
        b"\xff",
        b"NaN",
        b"[Infinity]",
        b"1" * 5000,  # more digits than Python converts
        b"",
    ],
)
def test_loads_json_refuses_hostile_json_in_one_line(data: bytes) -> None:
    with pytest.raises(CheckpointError, match="x.json") as excinfo:
        jsonio.loads_json(data, "x.json")
    assert "\n" not in str(excinfo.value)


def test_loads_json_bounds_size_and_depth_as_asked() -> None:
    assert jsonio.loads_json(b"[" * 64 + b"]" * 64, "x.json") is not None
    with pytest.raises(CheckpointError, match="deeper than 3"):
        jsonio.loads_json(b"[[[[]]]]", "x.json", max_depth=3)
    with pytest.raises(CheckpointError, match="more than the 10"):
        jsonio.loads_json(b"[" + b" " * 20 + b"]", "x.json", max_bytes=10)


def test_old_codec_json_imports_still_work() -> None:
    assert codec.dumps_json is jsonio.dumps_json and codec.loads_json is jsonio.loads_json


def test_physical_name_is_the_path_or_the_logical_name() -> None:
    assert physical_name("state.json", {"bytes": 1, "crc32c": "00000000"}) == "state.json"
    assert physical_name("state.json", {"bytes": 1, "crc32c": "00000000", "path": "state.0123456789.json"}) == "state.0123456789.json"


def test_manifest_and_jsonio_import_no_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import resilient_train.checkpoint.jsonio, resilient_train.checkpoint.manifest\n"
        "assert 'resilient_train.checkpoint.codec' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=cli_env(), cwd=REPO)


# -- through the CLI: a hostile newest checkpoint, a valid older one --------------------------------
CLI_VARIANTS = [
    "manifest-100000-brackets",
    "files-empty",
    "files-record-a-number",
    "path-dotdot",
    "metrics-a-string",
    "unknown-tag",
    "train-a-list",
    "state-json-deep",
    "rng-bytes-not-base64",
    "model-aliases-to-a-missing-key",
    "header-offsets-past-the-end",
    "dict-key-unhashable",
]
# one of each kind runs in the quick suite; the rest with the slow tests
QUICK = {"manifest-100000-brackets", "files-record-a-number", "unknown-tag"}
CLI_PARAMS = [pytest.param(v, id=v, marks=() if v in QUICK else pytest.mark.slow) for v in CLI_VARIANTS]
ALL_VARIANTS = {**MANIFEST_VARIANTS, **DECODE_VARIANTS, **RESTORE_VARIANTS}
# what `export` decodes: the model weights and state.json's aliases (not the training state)
EXPORT_BREAKERS = {"model-aliases-to-a-missing-key", "header-offsets-past-the-end", "state-json-deep"}


def _no_traceback(proc: subprocess.CompletedProcess, max_errors: int = 1) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(error_lines(proc.stderr)) <= max_errors, proc.stderr[-3000:]


def _exported_step(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["step"])


@pytest.fixture
def hostile_run(request, run_dir: Path) -> tuple[Path, str]:
    ALL_VARIANTS[request.param](newest(run_dir))
    return run_dir, request.param


@pytest.mark.parametrize("hostile_run", CLI_PARAMS, indirect=True)
def test_ls_inspect_verify_report_a_hostile_checkpoint_in_one_line(hostile_run: tuple[Path, str]) -> None:
    run, variant = hostile_run
    manifest_level = variant in MANIFEST_VARIANTS

    proc = run_cli_inprocess("ls", str(run))
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc, max_errors=0)
    proc = run_cli_inprocess("ls", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc, max_errors=0)
    status = {row["step"]: row["status"] for row in json.loads(proc.stdout)}
    assert status == {3: "committed", 6: "corrupt" if manifest_level else "committed"}, proc.stdout

    proc = run_cli_inprocess("inspect", str(run), "--json")
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc, max_errors=0)
    assert json.loads(proc.stdout)["checkpoint"]["step"] == (3 if manifest_level else 6)
    proc = run_cli_inprocess("inspect", str(run))
    assert proc.returncode == 0, proc.stderr
    _no_traceback(proc, max_errors=0)
    proc = run_cli_inprocess("inspect", str(newest(run)))
    _no_traceback(proc)

    proc = run_cli_inprocess("verify", str(run))
    _no_traceback(proc)
    if manifest_level:
        assert proc.returncode == 1 and len(error_lines(proc.stderr)) == 1, proc.stderr
        assert "step 3: ok" in proc.stdout, proc.stdout
    else:  # every byte matches its (forged) manifest: verify checks bytes, not meaning
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli_inprocess("verify", str(newest(run)))
    _no_traceback(proc)
    assert proc.returncode == (1 if manifest_level else 0), proc.stdout + proc.stderr


@pytest.mark.parametrize("hostile_run", CLI_PARAMS, indirect=True)
def test_export_of_a_run_never_tracebacks_on_a_hostile_checkpoint(hostile_run: tuple[Path, str], tmp_path: Path) -> None:
    run, variant = hostile_run
    out = tmp_path / "w.safetensors"
    proc = run_cli_inprocess("export", str(run), str(out))
    _no_traceback(proc)
    if proc.returncode == 0:
        # the weights it wrote come from a checkpoint whose model part decodes
        assert _exported_step(out) in ((3,) if variant in MANIFEST_VARIANTS or variant in EXPORT_BREAKERS else (3, 6))
    else:
        assert len(error_lines(proc.stderr)) == 1 and not out.exists(), proc.stderr

    out6 = tmp_path / "w6.safetensors"
    proc = run_cli_inprocess("export", str(newest(run)), str(out6))
    _no_traceback(proc)
    if variant in MANIFEST_VARIANTS or variant in EXPORT_BREAKERS:
        assert proc.returncode != 0 and len(error_lines(proc.stderr)) == 1 and not out6.exists(), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("hostile_run", sorted(EXPORT_BREAKERS), indirect=True)
def test_export_of_a_run_falls_back_past_a_checkpoint_whose_weights_do_not_decode(hostile_run: tuple[Path, str], tmp_path: Path) -> None:
    run, _ = hostile_run
    out = tmp_path / "w.safetensors"
    proc = run_cli_inprocess("export", str(run), str(out))
    _no_traceback(proc, max_errors=0)
    assert proc.returncode == 0, proc.stderr
    assert _exported_step(out) == 3
    assert any("skipping checkpoint" in line and NEWEST in line for line in proc.stderr.splitlines()), proc.stderr


def _assert_resumed_from_the_older_checkpoint(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    _no_traceback(proc, max_errors=0)
    lines = proc.stderr.splitlines()
    skipped = [line for line in lines if "skipping checkpoint" in line]
    assert len(skipped) == 1 and NEWEST in skipped[0], proc.stderr
    assert any("resumed from" in line and OLDER in line for line in lines), proc.stderr
    assert "done: step 6" in proc.stderr


@pytest.mark.parametrize("hostile_run", CLI_PARAMS, indirect=True)
def test_resume_falls_back_to_the_older_checkpoint(hostile_run: tuple[Path, str]) -> None:
    run, _ = hostile_run
    _assert_resumed_from_the_older_checkpoint(run_cli_inprocess("resume", str(run)))


@pytest.mark.slow
@pytest.mark.parametrize("hostile_run", ["progress-step-a-string", "weight-of-the-wrong-dtype", "moment-of-the-wrong-shape"], indirect=True)
def test_resume_falls_back_past_a_checkpoint_that_decodes_but_does_not_fit(hostile_run: tuple[Path, str]) -> None:
    run, _ = hostile_run
    _assert_resumed_from_the_older_checkpoint(run_cli_inprocess("resume", str(run)))
