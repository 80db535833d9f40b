"""Capturing and restoring the whole training state through the real checkpoint bytes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from resilient_train import state
from resilient_train.checkpoint import format as fmt
from resilient_train.errors import CheckpointError
from resilient_train.state import Progress


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.inp(x))))


class Wrapper(nn.Module):
    """Stands in for DDP (`module.`) or torch.compile (`_orig_mod.`): adds a prefix to every key."""

    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        self.add_module(attr, inner)
        self.attr = attr

    def forward(self, x):
        return getattr(self, self.attr)(x)


def _setup(seed: int):
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(6, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()


def _to_files(snapshot: fmt.Snapshot, rank: int = 0) -> dict[str, bytes]:
    files = fmt.encode_shared(snapshot)
    files.update(fmt.encode_rank(snapshot, rank))
    return files


def _draws():
    return torch.rand(5), random.random(), np.random.rand(3)


def _scramble_rngs():
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)


@pytest.fixture
def saved():
    """A model trained a few steps, its snapshot as checkpoint bytes, and what comes right after."""
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, steps=5)
    progress = Progress(step=5, epoch=1, cursor=24, samples_seen=120, best={"val_loss": 0.25})
    snapshot = state.capture(model, optimizer, scheduler, None, progress)
    files = _to_files(snapshot)  # encode before anything moves the live tensors
    draws = _draws()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress,
            "files": files, "draws": draws}


def _restore_fresh(files, rank=0, seed=1):
    model, optimizer, scheduler = _setup(seed=seed)
    progress, problems = state.restore(fmt.decode(files, rank), model, optimizer, scheduler, None)
    return model, optimizer, scheduler, progress, problems


def test_restore_into_fresh_objects_restores_the_weights(saved):
    model, *_ = _restore_fresh(saved["files"])
    for (name, a), (_, b) in zip(saved["model"].state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_restore_into_fresh_objects_restores_the_optimizer_state(saved):
    _, optimizer, *_ = _restore_fresh(saved["files"])
    want, got = saved["optimizer"].state_dict(), optimizer.state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert set(want["state"]) == set(got["state"])
    for index, entry in want["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert got["state"][index][key].dtype == entry[key].dtype
            assert torch.equal(got["state"][index][key], entry[key]), (index, key)


def test_restore_into_fresh_objects_restores_the_scheduler(saved):
    _, optimizer, scheduler, *_ = _restore_fresh(saved["files"])
    assert scheduler.last_epoch == saved["scheduler"].last_epoch == 5
    assert scheduler.get_last_lr() == saved["scheduler"].get_last_lr()
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in saved["optimizer"].param_groups]


def test_restore_returns_the_progress_counters(saved):
    *_, progress, problems = _restore_fresh(saved["files"])
    assert progress == saved["progress"]
    assert problems == []


def test_restore_brings_back_every_rng_stream(saved):
    _scramble_rngs()
    _restore_fresh(saved["files"])
    torch_draw, py_draw, np_draw = _draws()
    want_torch, want_py, want_np = saved["draws"]
    assert torch.equal(torch_draw, want_torch)
    assert py_draw == want_py
    assert np.array_equal(np_draw, want_np)


def test_training_continues_bit_identically_after_restore(saved):
    model, optimizer, scheduler, *_ = _restore_fresh(saved["files"])
    # the reference continues from where `saved` captured, with the RNG as it was at capture
    ref_model, ref_opt, ref_sched = _setup(seed=0)
    _train(ref_model, ref_opt, ref_sched, steps=5)
    state.restore_rng(fmt.decode(saved["files"], 0).rng)
    _train(ref_model, ref_opt, ref_sched, steps=3)
    state.restore_rng(fmt.decode(saved["files"], 0).rng)
    _train(model, optimizer, scheduler, steps=3)
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_rng_file_holds_no_tensors_and_is_json():
    snapshot = state.capture(*_setup(seed=0), None, Progress())
    files = fmt.encode_rank(snapshot, rank=3)
    assert list(files) == ["rng-rank00003.json"]
    assert files["rng-rank00003.json"].startswith(b"{")


def test_each_rank_decodes_its_own_rng_file():
    model, optimizer, scheduler = _setup(seed=0)
    torch.manual_seed(1)
    snap0 = state.capture(model, optimizer, scheduler, None, Progress())
    torch.manual_seed(2)
    snap1 = state.capture(model, optimizer, scheduler, None, Progress())
    files = _to_files(snap0, rank=0)
    files.update(fmt.encode_rank(snap1, rank=1))
    assert fmt.decode(files, 0).rng["torch"] == snap0.rng["torch"]
    assert fmt.decode(files, 1).rng["torch"] == snap1.rng["torch"]
    assert fmt.decode(files, 2).rng is None


# -- key normalisation and wrapped models --------------------------------------------------------


@pytest.mark.parametrize(
    "key, expected",
    [
        ("inp.weight", "inp.weight"),
        ("module.inp.weight", "inp.weight"),
        ("_orig_mod.inp.weight", "inp.weight"),
        ("module._orig_mod.inp.weight", "inp.weight"),
        ("_orig_mod.module.inp.weight", "inp.weight"),
        ("module.module.inp.weight", "inp.weight"),
        ("encoder.module.weight", "encoder.module.weight"),
        ("module.encoder.module.weight", "encoder.module.weight"),
        ("encoder._orig_mod.weight", "encoder._orig_mod.weight"),
        ("modules.weight", "modules.weight"),
    ],
)
def test_normalize_key_strips_only_leading_wrapper_prefixes(key, expected):
    assert state.normalize_key(key) == expected


def test_model_state_of_a_wrapped_model_uses_the_users_keys():
    torch.manual_seed(0)
    inner = Net()
    wrapped = Wrapper(Wrapper(inner, "_orig_mod"), "module")
    assert set(state.model_state(wrapped)) == set(inner.state_dict())


@pytest.mark.parametrize(
    "wrap_source, wrap_target",
    [
        (lambda m: m, lambda m: Wrapper(m, "module")),
        (lambda m: Wrapper(m, "module"), lambda m: m),
        (lambda m: Wrapper(m, "_orig_mod"), lambda m: Wrapper(Wrapper(m, "_orig_mod"), "module")),
    ],
    ids=["plain->ddp", "ddp->plain", "compiled->ddp+compiled"],
)
def test_load_model_state_into_a_differently_wrapped_model(wrap_source, wrap_target):
    torch.manual_seed(0)
    source = Net()
    torch.manual_seed(1)
    target = Net()
    saved = state.model_state(wrap_source(source))
    state.load_model_state(wrap_target(target), saved)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


def test_mismatched_model_raises_checkpoint_error_naming_the_keys():
    saved = state.model_state(Net())
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    with pytest.raises(CheckpointError) as excinfo:
        state.load_model_state(other, saved)
    message = str(excinfo.value)
    assert "0.weight" in message and "inp.weight" in message


def test_mismatched_shapes_do_not_load_silently():
    saved = state.model_state(Net())
    wider = Net()
    wider.inp = nn.Linear(4, 9)
    wider.out = nn.Linear(9, 1)
    with pytest.raises((CheckpointError, RuntimeError)):
        state.load_model_state(wider, saved)


def test_restore_with_a_different_optimizer_layout_raises_checkpoint_error(saved):
    model = Net()
    optimizer = torch.optim.AdamW([{"params": [model.inp.weight]}, {"params": [model.inp.bias, *model.out.parameters()]}])
    with pytest.raises(CheckpointError, match="optimizer"):
        state.restore(fmt.decode(saved["files"], 0), model, optimizer, None, None)


# -- problems are reported, not raised -----------------------------------------------------------


def test_restore_rng_none_reports_a_problem_instead_of_crashing():
    problems = state.restore_rng(None)
    assert len(problems) == 1
    assert "RNG" in problems[0]


def test_missing_rng_file_is_reported_by_restore(saved):
    files = {k: v for k, v in saved["files"].items() if not k.startswith("rng-")}
    *_, problems = _restore_fresh(files)
    assert any("RNG" in p for p in problems)


def test_cuda_rng_states_without_enough_cuda_devices_are_reported_and_the_rest_restored():
    random.seed(5)
    torch.manual_seed(5)
    rng = state.capture_rng()
    want_py, want_torch = random.random(), torch.rand(3)
    devices_here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rng["cuda"] = [bytes(16)] * (devices_here + 1)  # more devices than this machine has
    _scramble_rngs()
    problems = state.restore_rng(rng)
    assert len(problems) == 1 and "CUDA" in problems[0]
    assert random.random() == want_py
    assert torch.equal(torch.rand(3), want_torch)


def test_a_broken_python_rng_state_is_reported_and_does_not_skip_the_torch_rng():
    torch.manual_seed(3)
    rng = state.capture_rng()
    want = torch.rand(3)
    rng["python"] = "garbage"
    torch.manual_seed(4)
    problems = state.restore_rng(rng)
    assert any("Python" in p for p in problems)
    assert torch.equal(torch.rand(3), want)


def test_a_broken_torch_rng_state_is_reported_and_does_not_skip_numpy():
    np.random.seed(3)
    rng = state.capture_rng()
    want = np.random.rand(2)
    rng["torch"] = b"\x00\x01"
    np.random.seed(4)
    problems = state.restore_rng(rng)
    assert any("torch" in p for p in problems)
    assert np.array_equal(np.random.rand(2), want)


def test_capture_rng_holds_no_ndarrays_or_tensors():
    rng = state.capture_rng()

    def walk(obj):
        assert not isinstance(obj, (np.ndarray, torch.Tensor)), type(obj)
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(rng)


def test_scheduler_missing_from_checkpoint_is_reported():
    model, optimizer, _ = _setup(seed=0)
    snapshot = state.capture(model, optimizer, None, None, Progress())
    files = _to_files(snapshot)
    fresh_model, fresh_opt, fresh_sched = _setup(seed=1)
    _, problems = state.restore(fmt.decode(files, 0), fresh_model, fresh_opt, fresh_sched, None)
    assert any("scheduler" in p for p in problems)


def test_scaler_state_without_a_live_scaler_is_reported():
    model, optimizer, scheduler = _setup(seed=0)
    snapshot = state.capture(model, optimizer, scheduler, None, Progress())
    snapshot.train["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 0}
    files = _to_files(snapshot)
    _, problems = state.restore(fmt.decode(files, 0), *_setup(seed=1), None)
    assert any("GradScaler" in p for p in problems)


def test_enabled_grad_scaler_state_is_carried_over():
    probe = torch.amp.GradScaler("cpu")
    if not probe.is_enabled():
        pytest.skip("this torch has no enabled CPU GradScaler")
    model, optimizer, scheduler = _setup(seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(6, 4)).pow(2).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    snapshot = state.capture(model, optimizer, scheduler, scaler, Progress(step=3))
    files = _to_files(snapshot)
    fresh_scaler = torch.amp.GradScaler("cpu")
    _, problems = state.restore(fmt.decode(files, 0), *_setup(seed=1), fresh_scaler)
    assert problems == []
    assert fresh_scaler.get_scale() == scaler.get_scale()
    assert fresh_scaler.state_dict() == scaler.state_dict()
