"""The CLI as users meet it: exit codes, one-line errors, `ls`/`export` output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ckpt_files import data_path
from conftest import TINY_TASK, error_lines
from helpers import run_cli_inprocess

QUICK = ["trainer.max_steps=6", "checkpoint.every_n_steps=3", "task.n=64"]


def _assert_one_error_line(proc, code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), *QUICK, check=True)
    return run_dir


def test_each_command_module_answers_to_its_name_in_the_table() -> None:
    from resilient_train.cli.commands import COMMANDS, load

    assert {name: load(name).NAME for name in COMMANDS} == {name: name for name in COMMANDS}


@pytest.mark.parametrize("argv, parsed", [
    (["run", "t.py"], ["run"]),
    (["--debug", "ls", "r"], ["ls"]),
    (["--help", "run"], "all"),  # the top-level help lists every command
    (["--he", "run"], "all"),  # ... and so does an abbreviation of --help
    (["--", "ls", "r"], "all"),
    (["frobnicate"], "all"),  # an unknown command is answered with every choice
    ([], "all"),
])
def test_the_parser_holds_only_the_command_it_parses(argv: list[str], parsed) -> None:
    from resilient_train.cli import build_parser
    from resilient_train.cli.commands import COMMANDS

    choices = list(build_parser(argv)._subparsers._group_actions[0].choices)
    assert choices == (list(COMMANDS) if parsed == "all" else parsed)


def test_unknown_command_is_usage_error() -> None:
    _assert_one_error_line(run_cli_inprocess("frobnicate"), 2, "frobnicate")


def test_missing_task_file_is_usage_error(tmp_path: Path) -> None:
    _assert_one_error_line(run_cli_inprocess("run", str(tmp_path / "nope.py"), "--run-dir", str(tmp_path / "r")), 2, "nope.py")


def test_unknown_config_key_is_usage_error_naming_the_key(tmp_path: Path) -> None:
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "r"), "trainer.max_stepz=5")
    _assert_one_error_line(proc, 2, "trainer.max_stepz")


def test_impossible_value_is_usage_error_naming_the_key(tmp_path: Path) -> None:
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(tmp_path / "r"), "trainer.max_steps=-3")
    _assert_one_error_line(proc, 2, "trainer.max_steps")


def test_override_without_equals_is_usage_error(tmp_path: Path) -> None:
    proc = run_cli_inprocess("resume", str(tmp_path), "--bogus-flag")
    _assert_one_error_line(proc, 2)


def test_resume_of_a_folder_without_a_run_exits_3(tmp_path: Path) -> None:
    _assert_one_error_line(run_cli_inprocess("resume", str(tmp_path)), 3, "no run")


def test_ls_and_export_of_a_missing_run_exit_3(tmp_path: Path) -> None:
    _assert_one_error_line(run_cli_inprocess("ls", str(tmp_path / "missing")), 3)
    _assert_one_error_line(run_cli_inprocess("export", str(tmp_path / "missing"), str(tmp_path / "o.safetensors")), 3)


def test_error_in_task_code_is_one_line_and_traceback_only_with_debug(tmp_path: Path) -> None:
    task = tmp_path / "broken.py"
    task.write_text("def build(cfg):\n    raise RuntimeError('dataset folder is empty')\n")
    _assert_one_error_line(run_cli_inprocess("run", str(task), "--run-dir", str(tmp_path / "r")), 1, "dataset folder is empty")
    assert "Traceback" in run_cli_inprocess("run", str(task), "--run-dir", str(tmp_path / "r"), "--debug").stderr


def test_ls_json_lists_committed_checkpoints(finished_run: Path) -> None:
    rows = json.loads(run_cli_inprocess("ls", str(finished_run), "--json", check=True).stdout)
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["status"] == "committed" and r["bytes"] > 0 and r["path"] for r in rows)


def test_ls_shows_incomplete_and_corrupt(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "checkpoints" / "step-000000009").mkdir()
    (run_dir / "checkpoints" / "step-000000009" / "model.safetensors").write_bytes(b"partial")
    with open(data_path(run_dir, 3, "model.safetensors"), "ab") as f:
        f.write(b"x")
    table = run_cli_inprocess("ls", str(run_dir), check=True).stdout
    status = {int(line.split()[0]): line.split()[1] for line in table.splitlines()[1:]}
    assert status == {3: "corrupt", 6: "committed", 9: "incomplete"}


def test_export_writes_user_keys_without_wrapper_prefixes(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "weights.safetensors"
    run_cli_inprocess("export", str(finished_run), str(out), check=True)
    weights = load_file(str(out))
    assert set(weights) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    step3 = tmp_path / "step3.safetensors"
    run_cli_inprocess("export", str(finished_run / "checkpoints" / "step-000000003"), str(step3), check=True)
    assert load_file(str(step3)).keys() == weights.keys()


def test_run_again_on_a_finished_run_resumes_and_does_nothing(finished_run: Path) -> None:
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(finished_run), *QUICK)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr and "step 6" in proc.stderr


def test_resume_can_extend_max_steps(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "extend"
    shutil.copytree(finished_run, run_dir)
    proc = run_cli_inprocess("resume", str(run_dir), "trainer.max_steps=9")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(run_cli_inprocess("ls", str(run_dir), "--json", check=True).stdout)
    assert rows[-1]["step"] == 9
    assert "max_steps: 9" in (run_dir / "run.yaml").read_text()


@pytest.mark.parametrize("inside", ["run.yaml", "sessions.json", "checkpoints/step-000000006/model.new.safetensors",
                                    "task/weights.safetensors", "logs/weights.safetensors"])
def test_export_never_writes_into_the_runs_own_files(finished_run: Path, inside: str) -> None:
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    proc = run_cli_inprocess("export", str(finished_run), str(finished_run / inside))
    _assert_one_error_line(proc, 2, "export to")
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before
    assert run_cli_inprocess("verify", str(finished_run)).returncode == 0


def test_export_to_a_new_name_at_the_top_of_the_run_folder_is_fine(finished_run: Path) -> None:
    out = finished_run / "exported.safetensors"
    run_cli_inprocess("export", str(finished_run), str(out), check=True)
    assert set(load_file(str(out)))
    out.unlink()
