"""GPU-only behaviour: real GradScaler state, CUDA RNG, GPU -> CPU resume, pinned async copies.

Marked `gpu`: skipped where no CUDA device is present (and deselected by default in `make test`;
run with `pytest -m gpu`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resilient_train import Trainer, seed_everything
from resilient_train.checkpoint import CheckpointManager
from resilient_train.storage import Storage

pytestmark = pytest.mark.gpu


def _data(n: int = 256) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 1))


def _fit(run_dir: Path, max_steps: int, precision: str, accelerator: str = "cuda", **kwargs):
    seed_everything(0)
    trainer = Trainer(run_dir=str(run_dir), max_steps=max_steps, batch_size=16, every_n_steps=4, precision=precision,
                      accelerator=accelerator, devices=1, progress_bar=False, **kwargs)
    model = _model()
    result = trainer.fit(model, lambda p: torch.optim.AdamW(p, lr=1e-3), _data(),
                         training_step=lambda m, b: nn.functional.mse_loss(m(b[0]).float(), b[1]))
    return result, model


def _manifest(run_dir: Path) -> dict:
    latest = CheckpointManager(Storage(str(run_dir))).list()[-1]
    return latest.manifest


def test_fp16_checkpoint_stores_a_real_grad_scaler_state(tmp_path: Path) -> None:
    _fit(tmp_path / "run", 8, "16-mixed")
    loaded = CheckpointManager(Storage(str(tmp_path / "run"))).load_latest()
    scaler = loaded.snapshot(0).train["scaler"]
    assert scaler and scaler["scale"] > 0 and "_growth_tracker" in scaler


def test_fp16_resumes_into_bf16_and_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bf16 needs compute capability 8.0")
    run = tmp_path / "run"
    _fit(run, 8, "16-mixed")
    result, _ = _fit(run, 12, "bf16-mixed")
    assert result.resumed_from == 8 and _manifest(run)["precision"] == "bf16-mixed"
    assert "GradScaler state not carried over" in caplog.text
    result, _ = _fit(run, 16, "16-mixed")
    assert result.resumed_from == 12 and result.step == 16


def test_fp16_resume_on_the_same_gpu_is_bit_exact(tmp_path: Path) -> None:
    _, straight = _fit(tmp_path / "straight", 12, "16-mixed")
    _fit(tmp_path / "run", 8, "16-mixed")
    _, resumed = _fit(tmp_path / "run", 12, "16-mixed")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())


def test_a_gpu_checkpoint_resumes_on_cpu_and_reports_the_cuda_rng(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _fit(run, 8, "32-true")
    assert _manifest(run)["environment"]["gpus"]
    result, model = _fit(run, 12, "32-true", accelerator="cpu")
    assert result.resumed_from == 8 and result.step == 12
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert "resume is sample-exact" in caplog.text and "device" in caplog.text


def test_async_save_uses_pinned_host_buffers_and_matches_sync(tmp_path: Path) -> None:
    _, sync_model = _fit(tmp_path / "sync", 12, "32-true", async_save="false")
    _, async_model = _fit(tmp_path / "async", 12, "32-true", async_save="true")
    for a, b in zip(sync_model.state_dict().values(), async_model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())


def test_gradient_checkpointing_lowers_peak_memory(tmp_path: Path) -> None:
    from resilient_train.grad_ckpt import enable_gradient_checkpointing

    def peak(checkpointing: bool) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.GELU()) for _ in range(8)]).cuda()
        blocks = nn.ModuleList(list(model))
        wrapper = nn.Module()
        wrapper.blocks = blocks
        if checkpointing:
            enable_gradient_checkpointing(wrapper)
        x = torch.randn(512, 2048, device="cuda", requires_grad=True)
        torch.cuda.reset_peak_memory_stats()
        h = x
        for block in blocks:
            h = block(h)
        h.sum().backward()
        return torch.cuda.max_memory_allocated()

    assert peak(True) < 0.8 * peak(False)


def test_auto_micro_batch_finds_a_size_under_real_memory_pressure(tmp_path: Path) -> None:
    """A cap on this process's GPU memory stands in for a smaller GPU: 64 samples need ~4 GiB of
    activations, the cap leaves ~2 GiB, so `auto` must come down to 16 or less and finish."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2 * 2**30) / total))
    try:
        def memory_hungry_step(model: nn.Module, batch) -> torch.Tensor:
            x, y = batch
            activations = torch.zeros(len(x), 16 * 2**20, device=x.device)  # 64 MiB per sample
            return nn.functional.mse_loss(model(x).float(), y) + 0 * activations[:, 0].sum()

        seed_everything(0)
        trainer = Trainer(run_dir=str(tmp_path / "run"), max_steps=6, batch_size=64, every_n_steps=3, precision="32-true",
                          accelerator="cuda", devices=1, progress_bar=False, micro_batch_size="auto")
        result = trainer.fit(_model(), lambda p: torch.optim.AdamW(p, lr=1e-3), _data(), training_step=memory_hungry_step)
        assert result.step == 6
        recorded = (tmp_path / "run" / "micro_batch.json").read_text()
        size = next(iter(json.loads(recorded).values()))
        assert 1 <= size <= 16
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_gpu_stats_log_the_peak_memory_of_each_window(tmp_path: Path) -> None:
    from resilient_train.metrics import read_rows

    _fit(tmp_path / "run", max_steps=8, precision="32-true", log_every_n_steps=4)
    rows = [row for row in read_rows(Storage(str(tmp_path / "run"))) if row.get("loss")]
    assert [row["step"] for row in rows] == [4, 8]
    for row in rows:
        assert 0 < float(row["gpu_mem_peak_gb"]) <= float(row["gpu_mem_reserved_peak_gb"])
        if row.get("gpu_util"):  # NVML present (nvidia-ml-py): utilisation and temperature too
            assert 0 <= float(row["gpu_util"]) <= 100 and float(row["gpu_temp_c"]) > 0
