"""What a checkpoint of a frozen base with a LoRA-sized adapter costs, against baselines in the same run.

The model: a GPT-2-124M-sized frozen base (token embedding 50257 x 768 and 12 blocks of 768x2304,
768x768, 768x3072 and 3072x768 Linear layers, fp32: about 497 MB) plus a trainable LoRA-sized
adapter (rank 8 on each block's first layer: about 0.3M parameters), AdamW. Prints, each the median
of --reps repetitions (baselines and our code alternate):

  1. bytes written by a checkpoint after the first / bytes of a checkpoint of the trainable part
     alone (adapter + AdamW moments + RNG + metadata, the same saver)          (goal <= 1.05)
  2. time of such a save / a raw write+fsync of the trainable part's files     (goal <= 1.2)
     and / our own save of the trainable part alone (the shared files' bookkeeping)
  3. time of the first save (the base goes to shared files) / a full save as before
     (`checkpoint.share_unchanged=false`: the whole model in the checkpoint)    (goal <= 1.05)
  4. 1 and 3 on the GCS emulator (`--gcs-base-mb` sets a smaller base there; needs
     gcp-storage-emulator, a dev extra).

    .venv/bin/python bench/frozen.py [--reps 3] [--blocks 12] [--vocab 50257] [--gcs-base-mb 64] [--no-gcs]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from resilient_train import state as state_lib
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint.saver import CheckpointSaver, Collective
from resilient_train.config import CheckpointConfig
from resilient_train.storage import Storage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint import checkpoint_paths, raw_write  # noqa: E402  (bench/checkpoint.py)

D = 768


class Adapted(nn.Module):
    """A frozen base and a LoRA-sized trainable adapter beside it."""

    def __init__(self, vocab: int, blocks: int, rank: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.blocks = nn.ModuleList(nn.ModuleList([nn.Linear(D, 3 * D), nn.Linear(D, D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)])
                                    for _ in range(blocks))
        self.requires_grad_(False)
        self.lora = nn.ModuleList(nn.Sequential(nn.Linear(D, rank, bias=False), nn.Linear(rank, 3 * D, bias=False))
                                  for _ in range(blocks))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block, lora in zip(self.blocks, self.lora):
            x = x + block[0](x)[..., :D] + lora(x)[..., :D]
        return x.square().mean()


class AdapterOnly(nn.Module):
    """The trainable part alone: what a checkpoint of the adapted model should cost after the first."""

    def __init__(self, model: Adapted) -> None:
        super().__init__()
        self.lora = model.lora


def trained(model: nn.Module, step_input: Callable[[], torch.Tensor]) -> tuple[nn.Module, torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(step_input()).backward() if isinstance(model, Adapted) else None
    optimizer.step()
    return model, optimizer


def saver(run: Storage, share: bool) -> CheckpointSaver:
    ck = CheckpointConfig(every_n_steps=1, keep_last=None, async_save="false", share_unchanged=share)
    return CheckpointSaver(CheckpointManager(run), ck, Collective(1, 0), meta={"world_size": 1})


def save(s: CheckpointSaver, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    progress = state_lib.Progress(step=step)
    start = time.perf_counter()
    s.save(step, lambda: state_lib.capture(model, optimizer, None, None, progress), {})
    return time.perf_counter() - start


def step_bytes(run: Storage, step: int) -> int:
    info = CheckpointManager(run).info(step)
    return info.bytes


def measure(root: str, model: Adapted, optimizer: torch.optim.Optimizer, adapter_opt: torch.optim.Optimizer,
            reps: int, raw: bool = True) -> dict[str, list[float]]:
    """One repetition per rep: a fresh run folder for each of our saves and each baseline."""
    out: dict[str, list[float]] = {k: [] for k in ("bytes", "later", "raw", "own", "first", "full")}
    for rep in range(reps):
        shared_run, full_run, adapter_run = (Storage(os.path.join(root, f"{name}{rep}")) for name in ("shared", "full", "adapter"))
        ours = saver(shared_run, share=True)
        full = saver(full_run, share=False)
        only = saver(adapter_run, share=True)
        adapter = AdapterOnly(model)
        if rep % 2:
            out["full"].append(save(full, 1, model, optimizer))
            out["first"].append(save(ours, 1, model, optimizer))
        else:
            out["first"].append(save(ours, 1, model, optimizer))
            out["full"].append(save(full, 1, model, optimizer))
        save(only, 1, adapter, adapter_opt)
        out["later"].append(save(ours, 2, model, optimizer))
        out["own"].append(save(only, 2, adapter, adapter_opt))
        if raw:
            manager = CheckpointManager(adapter_run)
            files = {os.path.basename(p): Path(p).read_bytes() for p in checkpoint_paths(manager, manager.info(2))}
            out["raw"].append(timed_raw(os.path.join(root, f"raw{rep}"), files))
        out["bytes"].append(step_bytes(shared_run, 2) / step_bytes(adapter_run, 2))
        for run in (shared_run, full_run, adapter_run):
            run.fs.rm(run.root, recursive=True)
    return out


def timed_raw(folder: str, files: dict[str, bytes]) -> float:
    start = time.perf_counter()
    raw_write(folder, files)
    return time.perf_counter() - start


def report(title: str, m: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in m.items() if v}
    print(title)
    print(f"  1. bytes of a later checkpoint / the trainable part's checkpoint: {med['bytes']:.3f}  [goal <= 1.05]")
    if "raw" in med:
        print(f"  2. later save {med['later'] * 1e3:.1f} ms / raw write+fsync of the trainable part {med['raw'] * 1e3:.1f} ms: "
              f"{med['later'] / med['raw']:.2f}  [goal <= 1.2]; / our save of the trainable part alone "
              f"{med['own'] * 1e3:.1f} ms: {med['later'] / med['own']:.2f}")
    print(f"  3. first save {med['first']:.2f} s / full save as before {med['full']:.2f} s: {med['first'] / med['full']:.3f}  [goal <= 1.05]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--gcs-base-mb", type=float, default=64)
    parser.add_argument("--no-gcs", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, optimizer = trained(Adapted(args.vocab, args.blocks), lambda: torch.randint(0, args.vocab, (4, 16)))
    _, adapter_opt = trained(AdapterOnly(model), lambda: torch.zeros(1))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"frozen base {frozen / 1e6:.0f} MB, trainable {trainable / 1e6:.2f}M parameters, torch {torch.__version__}, {args.reps} reps")
    with tempfile.TemporaryDirectory() as root:
        report("local disk:", measure(root, model, optimizer, adapter_opt, args.reps))
    if not args.no_gcs:
        gcs(args, adapter_opt)
    return 0


def gcs(args: argparse.Namespace, adapter_opt: torch.optim.Optimizer) -> None:
    """Figures 1 and 3 on the GCS emulator, with a smaller base (the emulator keeps objects in memory)."""
    from checkpoint import start_emulator  # bench/checkpoint.py

    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    proc, host = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        import fsspec

        fsspec.filesystem("gs").mkdir("bench")
        vocab = max(1000, int(args.gcs_base_mb * 1e6 / 4 / D) - 9 * D)
        torch.manual_seed(0)
        model, optimizer = trained(Adapted(vocab, 1), lambda: torch.randint(0, vocab, (4, 16)))
        _, adapter_opt = trained(AdapterOnly(model), lambda: torch.zeros(1))
        base = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
        m = measure("gs://bench/frozen", model, optimizer, adapter_opt, args.reps, raw=False)
        report(f"GCS emulator (base {base / 1e6:.0f} MB):", m)
    finally:
        proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
