"""`check-resume`: straight vs interrupted runs of the user's task, compared bit for bit.

The end-to-end tests run the real CLI (which itself runs `run` and `resume` in subprocesses, kills
them and resumes) on a task that is resume-exact and on one that is not; the unit tests pin the
comparison and the diagnosis on hand-made states.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TASK, error_lines, run_cli
from resilient_train.check_resume import (
    Facts,
    FinalState,
    compare,
    diagnose,
    differences,
    first_difference,
    make_plan,
)
from resilient_train.cli import main
from resilient_train.errors import UsageError
from resilient_train.run.folder import RunFolder
from resilient_train.storage import Storage
from resilient_train.tools.check_resume.records import ResumeFact, last_session, resume_after

INEXACT_TASK = str(REPO / "tests" / "tasks" / "inexact.py")


def _work_dir(stderr: str) -> Path:
    match = re.search(r"check-resume: .*, in (\S+)", stderr)
    assert match, stderr[-2000:]
    return Path(match.group(1))


@pytest.mark.slow
def test_an_exact_task_is_reported_bit_exact_with_exit_0_after_real_kills() -> None:
    proc = run_cli("check-resume", TINY_TASK, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bit-exact:" in proc.stdout
    for section in ("data position", "losses", "model weights", "optimizer", "RNG streams"):
        assert re.search(rf"{section}\s+same", proc.stdout), section
    assert "straight run: 20 steps ... done" in proc.stderr
    assert "SIGKILL as the checkpoint of step 4 commits (a save boundary) ... killed" in proc.stderr
    assert "resume from step 4, SIGKILL as the save of step 12 begins (between saves) ... killed" in proc.stderr
    assert re.search(r"SIGTERM as the save of step \d+ begins \(between saves\) \.\.\. saved step \d+ and exited 75", proc.stderr)
    assert "resumes: from step 4 (bit-exact" in proc.stdout
    assert not error_lines(proc.stderr)
    assert not _work_dir(proc.stderr).exists(), "the temporary runs were not removed"


@pytest.mark.slow
def test_a_task_with_its_own_rng_is_reported_not_exact_naming_the_first_tensor_and_the_cause() -> None:
    proc = run_cli("check-resume", INEXACT_TASK, "--keep", timeout=900)
    work = _work_dir(proc.stderr)
    try:
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "bit-exact:" not in proc.stdout
        [line] = error_lines(proc.stderr)
        assert re.search(r"resume is not bit-exact: model weight \S+ differs \(max abs diff [0-9.e+-]+\)", line), line
        assert "likely cause: RNG streams the trainer does not see" in line
        assert re.search(r"RNG streams\s+same", proc.stdout)  # the trainer's own streams do match
        assert "a second straight run ends bit-exactly like the first" in proc.stdout
        assert "losses first differ at step 5, after the resume from step 4" in proc.stdout
        assert (work / "straight").is_dir() and (work / "interrupted").is_dir() and (work / "logs").is_dir()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_check_without_room_between_saves_is_refused_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-resume", TINY_TASK, "--steps", "5"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "--steps must be at least 10" in line


def test_the_plan_saves_often_enough_to_kill_between_saves() -> None:
    plan = make_plan(20)
    assert plan.every == 4
    assert "trainer.max_steps=20" in plan.overrides() and "checkpoint.every_n_steps=4" in plan.overrides()
    assert "checkpoint.mirror=null" in plan.overrides() and "trainer.progress_bar=false" in plan.overrides()
    assert make_plan(10).every == 2 and make_plan(100).every == 20
    with pytest.raises(UsageError):
        make_plan(9)


def _state(**changes: object) -> FinalState:
    g = torch.Generator().manual_seed(0)
    model = {"0.weight": torch.randn(4, 3, generator=g), "0.bias": torch.tensor([1.0, float("nan")])}
    optimizer = {"state": {0: {"step": torch.tensor(20.0), "exp_avg": torch.ones(4, 3)}}, "param_groups": [{"lr": 0.01, "params": [0]}]}
    progress = {"step": 20, "epoch": 0, "cursor": 160, "samples_seen": 160, "best": {}}
    state = FinalState(
        step=20, model=model, train={"optimizer": optimizer, "scheduler": None, "scaler": None, "progress": progress},
        rng={0: {"python": (3, (1, 2, 3), None), "torch": b"\x01\x02", "numpy": None, "cuda": []}},
        manifest={"environment": {"gpus": []}}, config={"run_dir": "/a", "seed": 0, "trainer": {"num_workers": 0}},
        metrics={("loss", 1): 0.5, ("loss", 2): 0.25},
    )
    for key, value in changes.items():
        setattr(state, key, value)
    return state


def test_identical_states_compare_same_even_with_nan_weights_and_other_run_dirs() -> None:
    a, b = _state(), _state(config={"run_dir": "/b", "seed": 0, "trainer": {"num_workers": 0}})
    sections = compare(a, b)
    assert first_difference(sections) is None, [(s.name, s.differences) for s in sections]


def test_losses_only_one_run_logged_are_a_note_not_a_difference() -> None:
    """A kill between a checkpoint's commit and the metrics flush loses rows nobody logs again."""
    sections = compare(_state(), _state(metrics={("loss", 2): 0.25}))
    assert first_difference(sections) is None
    losses = next(s for s in sections if s.name == "losses")
    assert "1 value(s) logged by one run only" in losses.summary


def test_the_first_difference_is_a_weight_with_its_max_abs_diff() -> None:
    a = _state()
    weights = {k: v.clone() for k, v in a.model.items()}
    weights["0.weight"][1, 2] += 0.125
    b = _state(model=weights, metrics={("loss", 1): 0.5, ("loss", 2): 0.375})
    sections = compare(a, b)
    first = first_difference(sections)
    assert first is not None and first.where == "model weight 0.weight" and first.max_abs == pytest.approx(0.125)
    losses = next(s for s in sections if s.name == "losses")
    assert losses.summary.startswith("differ from step 2")


def test_differences_name_the_path_of_nested_state() -> None:
    found = list(differences({"state": {0: {"exp_avg": torch.zeros(2)}}, "lr": 0.1},
                             {"state": {0: {"exp_avg": torch.tensor([0.0, -0.5])}}, "lr": 0.2}, "optimizer"))
    assert [(d.where, d.max_abs) for d in found] == [("optimizer.state.0.exp_avg", 0.5), ("optimizer.lr", pytest.approx(0.1))]
    [shape] = differences(torch.zeros(2), torch.zeros(3), "w")
    assert "shape [2]" in shape.detail


def test_diverging_data_position_and_rng_are_reported() -> None:
    progress = {"step": 20, "epoch": 0, "cursor": 152, "samples_seen": 152, "best": {}}
    b = _state()
    b.train = {**b.train, "progress": progress}
    b.rng = {0: {**b.rng[0], "torch": b"\x01\x03"}}
    sections = {s.name: s for s in compare(_state(), b)}
    assert [d.where for d in sections["data position"].differences] == ["progress.cursor", "progress.samples_seen"]
    assert [d.where for d in sections["RNG streams"].differences] == ["RNG stream torch"]


def _titles(facts: Facts) -> list[str]:
    return [cause.title for cause in diagnose(facts)]


def test_diagnosis_blames_a_hidden_rng_when_only_the_weights_differ() -> None:
    assert _titles(Facts(weights_differ=True, straight_runs_agree=True))[0] == "RNG streams the trainer does not see"


def test_diagnosis_blames_nondeterminism_when_two_straight_runs_differ() -> None:
    assert _titles(Facts(weights_differ=True, straight_runs_agree=False, on_gpu=True))[0] == "nondeterministic GPU kernels"
    cpu = diagnose(Facts(weights_differ=True, straight_runs_agree=False))
    assert cpu[0].title == "randomness the trainer does not seed" and "os.urandom" in cpu[0].advice


def test_diagnosis_names_workers_config_changes_model_mode_and_the_resume_label() -> None:
    assert _titles(Facts(weights_differ=True, num_workers=2, straight_runs_agree=True))[0] == "DataLoader workers' RNG"
    assert _titles(Facts(config_changed=["seed"], weights_differ=True, straight_runs_agree=True))[0] == "a changed config"
    mode = _titles(Facts(weights_differ=True, trainer_rng_differs=["torch"], validation=True, straight_runs_agree=True))
    assert mode[0] == "model mode"
    label = diagnose(Facts(weights_differ=True, labels=["sample-exact (world size 2 -> 1)"], straight_runs_agree=True))
    assert label[0].title == "the resume said so" and "sample-exact" in label[0].advice
    assert _titles(Facts(data_position_differs=True, straight_runs_agree=True))[0] == "data order"


# -- resume labels come from the session records, never from log lines ------------------------


def _record(folder: RunFolder, session: int, **fields: object) -> None:
    """Append a session record as the trainer writes it (sessions.json), fields as given."""
    records = folder.sessions() + [{"session": session, "start_step": fields.pop("start_step", 0), **fields}]
    folder.storage.write_text(json.dumps(records), "sessions.json")


def test_a_session_record_labelled_approximate_is_reported_as_such_on_any_fsspec_url() -> None:
    run = f"memory://check-resume-labels-{uuid.uuid4().hex}/run"
    folder = RunFolder(Storage(run))
    _record(folder, 1, resumed_from=None, resume=None)
    _record(folder, 2, start_step=4, resumed_from=4,
            resume={"level": "approximate", "reasons": ["train_data is an iterable without state: resumed by skipping"]})
    assert last_session(run) == 2
    fact = resume_after(run, 1)
    assert fact == ResumeFact(4, "approximate (train_data is an iterable without state: resumed by skipping)")
    causes = diagnose(Facts(weights_differ=True, labels=[fact.label or ""], straight_runs_agree=True))
    assert any(c.title == "the resume said so" and "approximate" in c.advice for c in causes)


def test_a_log_line_saying_resume_is_not_exact_creates_no_label(tmp_path: Path) -> None:
    """The iterable path's warning "...so this resume is not exact" once counted as a label."""
    run = str(tmp_path / "run")
    folder = RunFolder(Storage(run))
    warning = ("rank 0: the last skipped batch differs from the one the checkpoint recorded: train_data does not yield "
               "the same items in the same order on every pass, so this resume is not exact")
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "session.log").write_text(warning + "\n")
    _record(folder, 1, resumed_from=None, resume=None)
    _record(folder, 2, start_step=8, resumed_from=8, resume={"level": "bit-exact", "reasons": []})
    assert resume_after(run, 1) == ResumeFact(8, "bit-exact")
    _record(folder, 3, start_step=0, resumed_from=None, resume=None)  # a fresh start, whatever the log says
    assert resume_after(run, 2) == ResumeFact(None, None)


def test_a_record_older_than_the_labels_leaves_the_exactness_unknown_not_bit_exact(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    folder = RunFolder(Storage(run))
    _record(folder, 1)
    _record(folder, 2, start_step=12)  # neither resumed_from nor resume: written before sessions recorded them
    [_, old] = folder.session_records()
    assert old.resumed_from is None and old.resume is None and not old.labelled
    fact = resume_after(run, 1)
    assert fact == ResumeFact(12, None)
    facts = Facts(weights_differ=True, straight_runs_agree=True, unlabelled=1)
    [unknown] = diagnose(Facts(unlabelled=1))
    assert "every resume was labelled bit-exact" not in unknown.advice and "no exactness label" in unknown.advice
    assert diagnose(facts)[0].title == "RNG streams the trainer does not see"
