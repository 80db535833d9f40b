"""Checkpoint save/load speed against raw file I/O of the same bytes, measured in the same run.

For a training state of about 500 MB (model + AdamW moments), prints:
  - sync save throughput / raw write+fsync throughput of the same bytes   (goal >= 0.8)
  - async save stall / sync save stall                                    (goal <= 0.1)
  - load time (read + verify + decode + restore) / raw read time          (goal <= 2x)
  - save throughput to the GCS emulator / raw gcsfs put of the same bytes (smaller state)
Each figure is the median of --reps repetitions; baselines alternate with our code.

    .venv/bin/python bench/checkpoint.py [--mb 500] [--reps 3] [--gcs-mb 64] [--no-gcs]

Reads hit the page cache (the files were just written): the load ratio compares decoding
overhead, not disk speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from resilient_train import state as state_lib
from resilient_train.checkpoint import CheckpointManager
from resilient_train.checkpoint import format as fmt
from resilient_train.checkpoint.saver import CheckpointSaver, Collective
from resilient_train.config import CheckpointConfig
from resilient_train.storage import Storage


def make_state(megabytes: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model whose weights + AdamW moments take about `megabytes` MB."""
    params = megabytes * 1_000_000 // (3 * 4)
    width = 2048
    layers = max(1, params // (width * width))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def forward_backward(model: nn.Module, batch: int = 64) -> None:
    """One training step's forward and backward pass (reads the weights, does not change them)."""
    width = model[0].in_features
    model(torch.randn(batch, width)).square().mean().backward()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_write(folder: str, files: dict[str, bytes]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def raw_read(folder: str, names: list[str]) -> None:
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            f.read()


def saver_for(run: Storage, mode: str) -> CheckpointSaver:
    ck = CheckpointConfig(every_n_steps=1, keep_last=None, async_save=mode)
    return CheckpointSaver(CheckpointManager(run), ck, Collective(1, 0), meta={"world_size": 1})


def prepare(megabytes: int) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], fmt.Snapshot], dict[str, bytes]]:
    """The state, a capture function for the saver, and the same state's file bytes for the baselines."""
    model, optimizer = make_state(megabytes)
    progress = state_lib.Progress()

    def capture() -> fmt.Snapshot:
        return state_lib.capture(model, optimizer, None, None, progress)

    return model, optimizer, capture, fmt.encode_files(capture(), 0, shared=True).to_bytes()


def bench_local(megabytes: int, reps: int) -> None:
    model, optimizer, capture, files = prepare(megabytes)
    total = sum(len(b) for b in files.values())
    print(f"state: {total / 1e6:.0f} MB in {len(files)} files ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters + AdamW)")

    save_t, raw_t, stall_sync, stall_async, load_t, read_t, step_times = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for rep in range(reps):
            raw_dir = os.path.join(tmp, f"raw{rep}")
            run = Storage(os.path.join(tmp, f"run{rep}"))
            sync_saver, async_saver = saver_for(run, "false"), saver_for(run, "true")
            step = 2 * rep + 1
            raw_t.append(timed(lambda: raw_write(raw_dir, files)))
            t = timed(lambda: sync_saver.save(step, capture, {}))
            save_t.append(t)
            stall_sync.append(t)
            # an async save stalls training for the save() call plus whatever of the copy to host
            # memory is left when the next optimizer step wants to start (it overlaps fwd/bwd)
            call = timed(lambda: async_saver.save(step + 1, capture, {}))
            step_times.append(timed(lambda: forward_backward(model)))
            stall_async.append(call + timed(async_saver.before_update))
            async_saver.finish()
            manager = CheckpointManager(run)
            info = manager.info(step)

            def load() -> None:
                loaded = manager.load(info)
                state_lib.restore(loaded.snapshot(0), model, optimizer, None, None)

            load_t.append(timed(load))
            read_t.append(timed(lambda: raw_read(raw_dir, list(files))))
            shutil.rmtree(raw_dir)
            shutil.rmtree(run.root)

    med = statistics.median
    print(f"sync save:  {med(save_t):.2f} s ({total / med(save_t) / 1e6:.0f} MB/s); raw write+fsync: {med(raw_t):.2f} s ({total / med(raw_t) / 1e6:.0f} MB/s)")
    print(f"  throughput ratio save/raw: {med(raw_t) / med(save_t):.2f}  [goal >= 0.8]")
    print(f"async stall: {med(stall_async) * 1e3:.0f} ms vs sync stall {med(stall_sync) * 1e3:.0f} ms")
    print(f"  stall ratio async/sync: {med(stall_async) / med(stall_sync):.3f}  [goal <= 0.1]  (training step between: {med(step_times) * 1e3:.0f} ms)")
    print(f"load (read+verify+decode+restore): {med(load_t):.2f} s; raw read: {med(read_t):.2f} s")
    print(f"  load ratio: {med(load_t) / med(read_t):.2f}x  [goal <= 2x]")


def start_emulator() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    proc = subprocess.Popen([str(exe), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("gcp-storage-emulator did not start")


def bench_gcs(megabytes: int, reps: int) -> None:
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    proc, host = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        import fsspec

        fs = fsspec.filesystem("gs")
        fs.mkdir("bench")
        _, _, capture, files = prepare(megabytes)
        total = sum(len(b) for b in files.values())
        save_t, raw_t = [], []
        for rep in range(reps):
            raw_t.append(timed(lambda: [fs.pipe_file(f"bench/raw{rep}/{n}", b) for n, b in files.items()]))
            saver = saver_for(Storage(f"gs://bench/run{rep}"), "false")
            save_t.append(timed(lambda: saver.save(1, capture, {})))
            fs.rm(f"bench/raw{rep}", recursive=True)
            fs.rm(f"bench/run{rep}", recursive=True)
        med = statistics.median
        print(f"GCS emulator, {total / 1e6:.0f} MB state: save {med(save_t):.2f} s, raw gcsfs put {med(raw_t):.2f} s")
        print(f"  throughput ratio save/raw: {med(raw_t) / med(save_t):.2f}")
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--gcs-mb", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-gcs", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, temp dir {tempfile.gettempdir()}")
    bench_local(args.mb, args.reps)
    if not args.no_gcs:
        bench_gcs(args.gcs_mb, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
