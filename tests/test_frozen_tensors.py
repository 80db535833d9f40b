"""A checkpoint costs what training changed: frozen tensors are stored once per run (issue 17).

The model: a frozen 4 MiB Linear (its own shared file), a small frozen Linear (the parameters'
bucket), BatchNorm in train mode (buffers that change in `forward` without bumping their version
counter) and a trainable head. Runs go through `Trainer.fit` in process; resumes are compared bit
for bit with an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from conftest import run_cli
from helpers import assert_same_weights
from torch import nn
from torch.utils.data import TensorDataset

from resilient_train import Trainer
from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
from resilient_train.errors import CheckpointError
from resilient_train.seeding import seed_everything
from resilient_train.storage import Storage

BIG = 1024  # 1024 x 1024 float32 = 4 MiB: a shared file of its own


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(BIG, BIG)
        self.small = nn.Linear(BIG, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 1)
        self.dropout = nn.Dropout(0.1)
        for module in (self.base, self.small):
            module.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.norm(self.small(torch.relu(self.base(x))))))


def build(base_seed: int = 0) -> tuple[Net, TensorDataset]:
    """The same pretrained base every time (`build()` reproduces it), a fresh head."""
    seed_everything(base_seed)
    model = Net()
    seed_everything(1)
    x = torch.randn(128, BIG)
    return model, TensorDataset(x, x[:, :1])


StepHook = Callable[[Net, int], None]


def fit(run: str, steps: int, hook: Optional[StepHook] = None, base_seed: int = 0, **config: Any) -> Net:
    model, data = build(base_seed)
    calls = {"n": 0}

    def training_step(m: Any, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if hook is not None:
            hook(model, calls["n"])
        x, y = batch
        return nn.functional.mse_loss(m(x), y)

    settings = {"every_n_steps": 4, "keep_last": None, **config}
    trainer = Trainer(run_dir=run, max_steps=steps, batch_size=16, accelerator="cpu", devices=1, progress_bar=False, seed=0,
                      **settings)
    trainer.fit(model, lambda p: torch.optim.AdamW(p, lr=1e-2), data, training_step=training_step)
    return model


def infos(run: str) -> list:
    return CheckpointManager(Storage(run)).list()


def shared_names(run: str) -> list[str]:
    folder = Path(run) / "checkpoints" / "shared"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def model_keys(run: str, step: int) -> set[str]:
    from safetensors import safe_open

    folder = Path(run) / "checkpoints" / f"step-{step:09d}"
    with safe_open(str(next(folder.glob("model.*.safetensors"))), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    run = str(tmp_path_factory.mktemp("straight") / "run")
    return run, fit(run, 12).state_dict()


def test_the_frozen_base_is_written_once_and_later_checkpoints_hold_what_trains(straight: tuple[str, Any]) -> None:
    run, _ = straight
    listed = infos(run)
    assert [i.step for i in listed] == [4, 8, 12] and all(i.status == COMMITTED for i in listed)
    base_bytes = BIG * BIG * 4
    assert all(i.shared_bytes > base_bytes for i in listed)  # every checkpoint references the base
    assert sum(Path(run, "checkpoints", "shared", n).stat().st_size for n in shared_names(run)) < 1.2 * base_bytes
    later = listed[1:]
    assert all(i.bytes < base_bytes / 20 for i in later), [i.bytes for i in later]  # head, optimizer, RNG, metadata
    keys = model_keys(run, 8)
    assert "head.weight" in keys and "base.weight" not in keys and "small.weight" not in keys
    # BatchNorm's running statistics change in forward (no version bump): stored again, not shared
    assert {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"} <= keys
    shown = json.loads(run_cli("ls", run, "--json", check=True).stdout)
    assert [entry["shared_bytes"] for entry in shown] == [i.shared_bytes for i in listed]


def test_a_resume_from_shared_files_is_bit_exact(straight: tuple[str, Any], tmp_path: Path) -> None:
    _, want = straight
    run = str(tmp_path / "run")
    fit(run, 6)
    got = fit(run, 12).state_dict()
    assert_same_weights(got, want)
    assert len([n for n in shared_names(run) if n]) >= 1


def test_a_frozen_tensor_changed_in_place_is_stored_again_and_resumes_exactly(tmp_path: Path) -> None:
    def halve_at_step_6(model: Net, call: int) -> None:
        if call == 6:
            with torch.no_grad():
                model.base.weight.mul_(0.5)  # a user's in-place change of a "frozen" tensor

    want = fit(str(tmp_path / "straight"), 12, halve_at_step_6).state_dict()
    run = str(tmp_path / "run")
    fit(run, 8, halve_at_step_6)
    assert "base.weight" in model_keys(run, 8)  # changed since the save at step 4: stored in the checkpoint
    assert_same_weights(fit(run, 12, halve_at_step_6).state_dict(), want)  # resumed from step 8
    assert "base.weight" not in model_keys(run, 12)  # unchanged since step 8: shared again, under a new name
    names = {name for info in infos(run) for name in (info.manifest or {}).get("shared", {})}
    assert set(shared_names(run)) == names  # nothing unreferenced left behind


def test_a_frozen_parameter_replaced_by_a_new_object_is_stored_again_and_resumes_exactly(tmp_path: Path) -> None:
    def replace_at_step_6(model: Net, call: int) -> None:
        if call == 6:  # a new Parameter object (new storage, version 0), not an in-place write
            model.base.weight = nn.Parameter(model.base.weight.detach() * 0.5, requires_grad=False)

    want = fit(str(tmp_path / "straight"), 12, replace_at_step_6).state_dict()
    run = str(tmp_path / "run")
    fit(run, 8, replace_at_step_6)
    assert "base.weight" in model_keys(run, 8)
    assert_same_weights(fit(run, 12, replace_at_step_6).state_dict(), want)


def test_a_damaged_shared_file_is_not_needed_when_build_reproduces_the_base(straight: tuple[str, Any], tmp_path: Path) -> None:
    _, want = straight
    run = str(tmp_path / "run")
    fit(run, 8)
    big = max(shared_names(run), key=lambda n: Path(run, "checkpoints", "shared", n).stat().st_size)
    path = Path(run, "checkpoints", "shared", big)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    proc = run_cli("verify", run)
    assert proc.returncode == 1 and f"shared/{big}" in proc.stdout and "crc32c" in proc.stdout
    assert_same_weights(fit(run, 12).state_dict(), want)  # the live base matched: the damaged file was not read


def test_a_damaged_shared_file_fails_each_checkpoint_in_one_line_when_build_does_not_reproduce_it(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    fit(run, 8)
    for name in shared_names(run):
        path = Path(run, "checkpoints", "shared", name)
        path.write_bytes(path.read_bytes()[:-1])  # truncated
    listed = infos(run)
    # the checkpoints' own files are intact: still committed, the damage named (verify reads it)
    assert all(i.status == COMMITTED and "shared file" in (i.shared_problem or "") for i in listed)
    before = {i.step: i.manifest for i in listed}
    with pytest.raises(CheckpointError, match="shared file .* and the model build\\(\\) made does not hold its tensors"):
        fit(run, 12, base_seed=5)  # a base build() does not reproduce: each checkpoint fails, none to fall back to
    assert {i.step: i.manifest for i in infos(run)} == before  # nothing committed was lost or overwritten


def test_without_a_reproducing_build_the_shared_file_is_read(straight: tuple[str, Any], tmp_path: Path) -> None:
    _, want = straight
    run = str(tmp_path / "run")
    fit(run, 8)
    got = fit(run, 12, base_seed=5).state_dict()  # another base at build: the stored one is restored
    assert_same_weights(got, want)


def test_retention_deletes_a_shared_file_only_when_no_checkpoint_references_it(tmp_path: Path) -> None:
    def halve_at_step_6(model: Net, call: int) -> None:
        if call == 6:
            with torch.no_grad():
                model.base.weight.mul_(0.5)

    run = str(tmp_path / "run")
    fit(run, 16, halve_at_step_6, keep_last=2)
    listed = infos(run)
    assert [i.step for i in listed] == [12, 16]
    referenced = {name for info in listed for name in (info.manifest or {}).get("shared", {})}
    assert set(shared_names(run)) == referenced  # the base as it was before step 6 is gone with its checkpoints
    assert run_cli("verify", run).returncode == 0


def test_a_copied_run_resumes_on_its_own(straight: tuple[str, Any], tmp_path: Path) -> None:
    _, want = straight
    run = str(tmp_path / "run")
    fit(run, 8)
    copied = str(tmp_path / "copied")
    shutil.copytree(run, copied)
    synced = str(tmp_path / "synced")
    assert run_cli("sync", run, synced).returncode == 0
    assert shared_names(synced) == shared_names(run)  # each shared file once
    assert_same_weights(fit(copied, 12).state_dict(), want)
    assert_same_weights(fit(synced, 12).state_dict(), want)


def test_export_gives_the_whole_model_with_frozen_tensors(straight: tuple[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run, want = straight
    out = tmp_path / "model.safetensors"
    assert run_cli("export", run, str(out)).returncode == 0
    assert_same_weights(load_file(str(out)), want)


def test_a_manifest_naming_a_shared_file_outside_the_folder_is_refused(straight: tuple[str, Any], tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    shutil.copytree(straight[0], run)
    manifest_path = Path(run, "checkpoints", "step-000000012", "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    record = next(iter(manifest["shared"].values()))
    manifest["shared"] = {"../../run.yaml": record}
    manifest_path.write_text(json.dumps(manifest))
    step12 = next(i for i in infos(run) if i.step == 12)
    assert step12.status != COMMITTED and "not one we write" in (step12.reason or "")


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    _, data = build()
    model = nn.Sequential(nn.Linear(BIG, 4), nn.Linear(4, 1))  # all trainable, no buffers: nothing to share, as version 2 wrote
    trainer = Trainer(run_dir=run, max_steps=4, batch_size=16, accelerator="cpu", devices=1, progress_bar=False, every_n_steps=4)
    trainer.fit(model, lambda p: torch.optim.SGD(p, lr=1e-3), data, training_step=lambda m, b: m(b[0]).mean())
    manifest_path = Path(run, "checkpoints", "step-000000004", "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert "shared" not in manifest
    manifest["format_version"] = 2
    manifest_path.write_text(json.dumps(manifest))
    loaded = CheckpointManager(Storage(run)).load_latest()
    assert loaded is not None and loaded.info.step == 4


def test_a_run_synced_to_gcs_and_back_carries_each_shared_file_once_and_resumes(
        straight: tuple[str, Any], gcs_url: str, tmp_path: Path) -> None:
    _, want = straight
    run = str(tmp_path / "run")
    fit(run, 8)
    assert run_cli("sync", run, gcs_url).returncode == 0
    remote = CheckpointManager(Storage(gcs_url))
    assert sorted(remote.shared.listing()) == shared_names(run)
    assert all(i.status == COMMITTED and i.shared_problem is None for i in remote.list())
    back = str(tmp_path / "back")
    assert run_cli("sync", gcs_url, back).returncode == 0
    assert shared_names(back) == shared_names(run)
    assert_same_weights(fit(back, 12).state_dict(), want)


class Packed(nn.Module):
    """A frozen layer whose state dict carries a computed entry it cannot load back, as a
    bitsandbytes 4-bit weight does (`weight.quant_state.*`, packed afresh at every state_dict())."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(BIG, 16), requires_grad=False)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight.packed"] = (self.weight.detach() * 2).to(torch.float16)  # a new tensor every time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_a_frozen_layer_that_cannot_load_its_own_state_resumes_when_build_reproduces_it(tmp_path: Path) -> None:
    def build_packed() -> tuple[nn.Module, TensorDataset]:
        seed_everything(0)
        model = nn.Sequential(Packed(), nn.Linear(16, 1))
        seed_everything(1)
        x = torch.randn(64, BIG)
        return model, TensorDataset(x, x[:, :1])

    def fit_packed(run: str, steps: int) -> nn.Module:
        model, data = build_packed()
        trainer = Trainer(run_dir=run, max_steps=steps, batch_size=16, accelerator="cpu", devices=1, progress_bar=False,
                          every_n_steps=4, keep_last=None)
        trainer.fit(model, lambda p: torch.optim.AdamW(p, lr=1e-2), data, training_step=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
        return model

    want = fit_packed(str(tmp_path / "straight"), 8).state_dict()
    run = str(tmp_path / "run")
    fit_packed(run, 4)
    assert_same_weights(fit_packed(run, 8).state_dict(), want)  # the packed entry was proven in place, not loaded


def _forge_shared_file(run: str, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> str:
    """Rewrite the largest shared file through `change`, and every manifest's record of it so its
    size and crc32c match: a hostile edit that passes every checksum. Returns the file's name."""
    from safetensors.torch import load_file, save

    from resilient_train.checkpoint.manifest import crc32c_hex

    folder = Path(run, "checkpoints", "shared")
    name = max(shared_names(run), key=lambda n: (folder / n).stat().st_size)
    data = save(change(load_file(str(folder / name))))
    (folder / name).write_bytes(data)
    for manifest_path in Path(run, "checkpoints").glob("step-*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        if name in manifest.get("shared", {}):
            manifest["shared"][name].update({"bytes": len(data), "crc32c": crc32c_hex([data])})
            manifest_path.write_text(json.dumps(manifest))
    return name


FORGERIES: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "another dtype": lambda tensors: {key: t.double() for key, t in tensors.items()},
    "another shape": lambda tensors: {key: t.flatten()[: max(1, t.numel() // 2)].clone() for key, t in tensors.items()},
    "a tensor missing": lambda tensors: dict(list(tensors.items())[1:]) or {"other": torch.zeros(1)},
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_forged_shared_file_that_passes_the_checksums_is_refused_in_one_line(
        forgery: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = str(tmp_path / "run")
    fit(run, 8)
    name = _forge_shared_file(run, FORGERIES[forgery])
    assert all(i.status == COMMITTED for i in infos(run))  # its checksums match: only its contents tell
    before = {i.step: i.manifest for i in infos(run)}
    with pytest.raises(CheckpointError) as caught:
        fit(run, 12, base_seed=5)  # a base build() does not reproduce: the forged file would be used
    message = str(caught.value)
    assert "\n" not in message and ("step-000000008" in message or name in message)
    assert {i.step: i.manifest for i in infos(run)} == before  # nothing committed was lost or overwritten
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping checkpoint")]
    assert len(skipped) == 2 and all(m.count("step-0000000") == 1 for m in skipped)  # each names its checkpoint once


def test_a_forged_shared_file_is_not_even_read_when_build_reproduces_the_base(straight: tuple[str, Any], tmp_path: Path) -> None:
    _, want = straight
    run = str(tmp_path / "run")
    fit(run, 8)
    _forge_shared_file(run, FORGERIES["another dtype"])
    assert_same_weights(fit(run, 12).state_dict(), want)  # the live base serialises to the recorded name


def test_a_disk_that_fills_while_a_save_places_a_new_shared_file_keeps_the_last_commit(straight: tuple[str, Any]) -> None:
    import uuid

    from faulty_fs import FaultPlan, forget, install

    def halve_at_step_6(model: Net, call: int) -> None:  # the base changes: the next save needs a new shared file
        if call == 6:
            with torch.no_grad():
                model.base.weight.mul_(0.5)

    probe = f"memory://rt-frozen-size-{uuid.uuid4().hex}/run"
    url = f"faulty://rt-frozen-full-{uuid.uuid4().hex}/run"
    try:
        fit(probe, 4)
        fs, root = Storage(probe).fs, Storage(probe).root
        first = sum(fs.size(path) for path in fs.find(root))  # the run with its first checkpoint
        plan = FaultPlan(quota=first + 2 * 1024 * 1024, quota_root=Storage(url).root)  # not another 4 MiB base
        with install(plan), pytest.raises(CheckpointError) as caught:
            fit(url, 12, halve_at_step_6)
        assert any(w.outcome == "nospace" for w in plan.writes)
        message = str(caught.value)
        assert "\n" not in message and "No space" in message and message.endswith("step-000000004")
        same = url.replace("faulty://", "memory://")
        listed = infos(same)
        assert [(i.step, i.status, i.shared_problem) for i in listed] == [(4, COMMITTED, None)]
        # the failed attempts' new shared files were removed to make room: only what step 4 references is left
        assert set(CheckpointManager(Storage(same)).shared.listing()) == set(listed[0].manifest["shared"])
        assert_same_weights(fit(same, 12).state_dict(), straight[1])  # step 4 was taken before the base changed
    finally:
        forget(probe)
        forget(url)


@pytest.mark.parametrize("without_crc32c", ["when written", "when read"])
def test_shared_files_read_on_a_machine_that_differs_in_google_crc32c_resume_exactly(
        without_crc32c: str, straight: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from resilient_train.checkpoint import manifest

    run = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        if without_crc32c == "when written":
            patch.setattr(manifest, "google_crc32c", None)  # names and records made with sha256
        fit(run, 8)
    if without_crc32c == "when read":
        monkeypatch.setattr(manifest, "google_crc32c", None)  # crc32c names that cannot be recomputed here
    assert_same_weights(fit(run, 12, base_seed=5).state_dict(), straight[1])  # the shared files are read
