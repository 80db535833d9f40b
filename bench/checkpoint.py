"""Checkpoint save/load speed against raw file I/O of the same bytes, measured in the same run.

For a training state of about 500 MB (model + AdamW moments; or `--params N` parameters, e.g.
`--params 124e6` for a GPT-2-124M-sized state of about 1.5 GB), prints:
  - sync save throughput / raw write+fsync throughput of the same bytes   (goal >= 0.9)
  - async save stall / sync save stall                                    (goal <= 0.05)
  - load time (read + verify + decode + restore) / raw read time          (goal <= 1.5x)
  - save throughput to the GCS emulator / raw gcsfs put of the same bytes (goal >= 0.9)
  - the checkpoint overhead at the Young/Daly optimal interval for `--mtbf-hours` (default 4),
    for the sync save cost and for the async stall
Each figure is the median of --reps repetitions; baselines alternate with our code.
`--phases` also times the parts of a save and a load separately (where the time goes).

    .venv/bin/python bench/checkpoint.py [--mb 500 | --params 124e6] [--reps 3] [--gcs-mb 64] [--no-gcs] [--phases]

Reads hit the page cache (the files were just written): the load ratio compares decoding
overhead, not disk speed.
"""

from __future__ import annotations

import argparse
import ctypes
import math
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

WIDTH = 2048


def make_state(megabytes: float, params: float | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model whose weights + AdamW moments take about `megabytes` MB, or with about `params`
    parameters (2048 x 2048 Linear layers, the nearest count of them)."""
    width = WIDTH
    if params is None:
        params = megabytes * 1_000_000 // (3 * 4)
        layers = max(1, int(params) // (width * width))
    else:
        layers = max(1, round(params / (width * width + width)))
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


def gmean(values: list[float]) -> float:
    """Geometric mean: with the order alternating, an effect of going first or second cancels."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def raw_read_paths(paths: list[str]) -> list[bytes]:
    """Every file's bytes, all held at once (as a load holds them: the restored state lives there)."""
    contents = []
    for path in paths:
        with open(path, "rb") as f:
            contents.append(f.read())
    return contents


def checkpoint_paths(manager: CheckpointManager, info) -> list[str]:
    """The data files of a committed checkpoint (what a load reads)."""
    from resilient_train.checkpoint.manager import stored_name
    from resilient_train.checkpoint.manifest import step_dir

    folder = manager.root.path(step_dir(info.step))
    return [os.path.join(folder, stored_name(n, r)) for n, r in info.manifest["files"].items()]


def saver_for(run: Storage, mode: str) -> CheckpointSaver:
    ck = CheckpointConfig(every_n_steps=1, keep_last=None, async_save=mode)
    return CheckpointSaver(CheckpointManager(run), ck, Collective(1, 0), meta={"world_size": 1})


def prepare(
    megabytes: float, params: float | None = None
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], fmt.Snapshot], dict[str, bytes]]:
    """The state, a capture function for the saver, and the same state's file bytes for the baselines."""
    model, optimizer = make_state(megabytes, params)
    progress = state_lib.Progress()

    def capture() -> fmt.Snapshot:
        return state_lib.capture(model, optimizer, None, None, progress)

    return model, optimizer, capture, fmt.encode_files(capture(), 0, shared=True).to_bytes()


def bench_local(megabytes: float, reps: int, params: float | None = None, phases: bool = False, warmup: int = 1,
                pairs: int = 0) -> dict[str, float]:
    model, optimizer, capture, files = prepare(megabytes, params)
    total = sum(len(b) for b in files.values())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"state: {total / 1e6:.0f} MB in {len(files)} files ({n_params / 1e6:.1f} M parameters + AdamW, "
          f"{len(list(model.parameters()))} parameter tensors)")
    # the async saver keeps its host buffers from save to save, as in a training run
    async_run = Storage(tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR")))
    async_saver = saver_for(async_run, "true")

    def one_rep(tmp: str, rep: int) -> dict[str, float]:
        """Every figure once; ours and the baseline swap places on odd repetitions.

        Each side's files are deleted right after it is timed, so both write into a page cache in
        the same state (on a VM, memory the guest has not touched lately is slow to fault in: a
        side that wrote second, with the other's 1.5 GB still cached, measured up to 3x slower).
        The checkpoint that is loaded is the async save's; the raw read reads the same files.
        """
        raw_dir = os.path.join(tmp, f"raw{rep}")
        run = Storage(os.path.join(tmp, f"run{rep}"))
        sync_saver = saver_for(run, "false")
        step = 2 * rep + 1
        t: dict[str, float] = {}

        def raw() -> None:
            t["raw"] = timed(lambda: raw_write(raw_dir, files))
            shutil.rmtree(raw_dir)

        def save() -> None:
            t["save"] = timed(lambda: sync_saver.save(step, capture, {}))
            shutil.rmtree(run.root)

        for fn in ((raw, save) if rep % 2 == 0 else (save, raw)):
            fn()
        # an async save stalls training for the save() call plus whatever of the copy to host
        # memory is left when the next optimizer step wants to start (it overlaps fwd/bwd)
        began = time.perf_counter()
        call = timed(lambda: async_saver.save(step + 1, capture, {}))
        t["step"] = timed(lambda: forward_backward(model))
        t["stall"] = call + timed(async_saver.before_update)
        async_saver.finish()
        t["async_total"] = time.perf_counter() - began  # until committed: the write latency
        manager = CheckpointManager(async_run)
        info = manager.info(step + 1)
        paths = checkpoint_paths(manager, info)

        def load() -> None:
            def work() -> None:
                loaded = manager.load(info)
                state_lib.restore(loaded.snapshot(0), model, optimizer, None, None)

            t["load"] = timed(work)

        def read() -> None:
            t["read"] = timed(lambda: raw_read_paths(paths))

        for fn in ((load, read) if rep % 2 == 0 else (read, load)):
            fn()
        manager.delete(step + 1)
        return t

    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for rep in range(-warmup, reps):
            t = one_rep(tmp, rep + warmup)
            what = f"rep {rep + 1}/{reps}" if rep >= 0 else "warm-up (not counted)"
            print(f"  {what}: raw write {t['raw']:.2f} s, save {t['save']:.2f} s, async stall "
                  f"{t['stall'] * 1e3:.0f} ms (step between {t['step']:.2f} s; async save committed after {t['async_total']:.2f} s), "
                  f"load {t['load']:.2f} s, raw read {t['read']:.2f} s", file=sys.stderr)
            if rep >= 0:
                results.append(t)
        if pairs:
            tight_pairs(pairs, capture, files, model, optimizer)
        for _ in range(2 if phases else 0):  # twice: single timings on a shared VM are noisy
            save_phases(tmp, capture, files)
            load_phases(tmp, capture, model, optimizer)
            shutil.rmtree(os.path.join(tmp, "phase-run"))
    shutil.rmtree(async_run.root, ignore_errors=True)

    med = statistics.median

    def m(key: str) -> float:
        return med(r[key] for r in results)

    def per_rep(num: str, den: str) -> list[float]:
        return [r[num] / r[den] for r in results]

    save_ratio, stall_ratio, load_ratio = per_rep("raw", "save"), per_rep("stall", "save"), per_rep("load", "read")
    print(f"sync save:  {m('save'):.2f} s ({total / m('save') / 1e6:.0f} MB/s); "
          f"raw write+fsync: {m('raw'):.2f} s ({total / m('raw') / 1e6:.0f} MB/s)")
    print(f"  throughput ratio save/raw: {med(save_ratio):.2f} (median of per-rep ratios; of the medians: {m('raw') / m('save'):.2f}; "
          f"geometric mean {gmean(save_ratio):.2f})  [goal >= 0.9]; per rep: " + ", ".join(f"{x:.2f}" for x in save_ratio))
    print(f"async stall: {m('stall') * 1e3:.0f} ms vs sync stall {m('save') * 1e3:.0f} ms")
    print(f"  stall ratio async/sync: {med(stall_ratio):.4f}  [goal <= 0.05]  (training step between: "
          f"{m('step') * 1e3:.0f} ms; async save committed {m('async_total'):.2f} s after the call); per rep: "
          + ", ".join(f"{x:.4f}" for x in stall_ratio))
    print(f"load (read+verify+decode+restore): {m('load'):.2f} s; raw read: {m('read'):.2f} s")
    print(f"  load ratio: {med(load_ratio):.2f}x (median of per-rep ratios; of the medians: {m('load') / m('read'):.2f}x; "
          f"geometric mean {gmean(load_ratio):.2f}x)  [goal <= 1.5x]; "
          "per rep: " + ", ".join(f"{x:.2f}" for x in load_ratio))
    return {"save": m("save"), "stall": m("stall"), "async_total": m("async_total"), "load": m("load")}


def tight_pairs(pairs: int, capture: Callable[[], fmt.Snapshot], files: dict[str, bytes],
                model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Back-to-back pairs, alternating which goes first, each pair's files deleted right after it:
    (raw write+fsync, sync save), then (load, raw read of its files). Nothing else runs in
    between (no async save, no training step), so the page cache and the memory they recycle look
    alike for both sides; the median of the per-pair ratios is the figure."""
    med = statistics.median
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        save_ratio, save_t, raw_t = [], [], []
        for i in range(pairs):
            raw_dir, run = os.path.join(tmp, f"raw{i}"), Storage(os.path.join(tmp, f"run{i}"))
            saver = saver_for(run, "false")
            t: dict[str, float] = {}
            for side in (("raw", "save") if i % 2 == 0 else ("save", "raw")):
                if side == "raw":
                    t[side] = timed(lambda: raw_write(raw_dir, files))
                    shutil.rmtree(raw_dir)
                else:
                    t[side] = timed(lambda: saver.save(1, capture, {}))
                    shutil.rmtree(run.root)
            save_t.append(t["save"])
            raw_t.append(t["raw"])
            save_ratio.append(t["raw"] / t["save"])
        print(f"tight pairs x{pairs}: sync save {med(save_t):.2f} s, raw write+fsync {med(raw_t):.2f} s; "
              f"save/raw throughput ratio {med(save_ratio):.2f} (median of per-pair ratios; "
              f"geometric mean {gmean(save_ratio):.2f})  [goal >= 0.9]; "
              f"per pair: " + ", ".join(f"{x:.2f}" for x in save_ratio))
        run = Storage(os.path.join(tmp, "run"))
        saver_for(run, "false").save(1, capture, {})
        manager = CheckpointManager(run)
        info = manager.info(1)
        paths = checkpoint_paths(manager, info)
        load_ratio, load_t, read_t = [], [], []
        for i in range(pairs):
            t = {}
            for side in (("load", "read") if i % 2 == 0 else ("read", "load")):
                if side == "read":
                    t[side] = timed(lambda: raw_read_paths(paths))
                else:
                    t[side] = timed(lambda: state_lib.restore(manager.load(info).snapshot(0), model, optimizer, None, None))
            load_t.append(t["load"])
            read_t.append(t["read"])
            load_ratio.append(t["load"] / t["read"])
        print(f"tight pairs x{pairs}: load {med(load_t):.2f} s, raw read {med(read_t):.2f} s; "
              f"load ratio {med(load_ratio):.2f}x (median of per-pair ratios; "
              f"geometric mean {gmean(load_ratio):.2f}x)  [goal <= 1.5x]; "
              f"per pair: " + ", ".join(f"{x:.2f}" for x in load_ratio))


def save_phases(tmp: str, capture: Callable[[], fmt.Snapshot], files: dict[str, bytes]) -> None:
    """The parts of one sync save, timed one after the other with the library's own functions."""
    from resilient_train.checkpoint.manifest import file_record

    folder = os.path.join(tmp, "phases")
    os.makedirs(folder)
    t: dict[str, float] = {}
    start = time.perf_counter()
    encoded = fmt.encode_files(capture(), 0, shared=True)
    t["capture + encode"] = time.perf_counter() - start
    start = time.perf_counter()
    serialized = encoded.serialize()
    t["serialize (headers, zero-copy chunks)"] = time.perf_counter() - start
    chunk_lists = {name: [data] if isinstance(data, bytes) else list(data) for name, data in serialized.items()}
    start = time.perf_counter()
    for name, chunks in chunk_lists.items():
        with open(os.path.join(folder, name), "wb") as f:
            for chunk in chunks:
                f.write(chunk)
    t["write (no fsync)"] = time.perf_counter() - start
    start = time.perf_counter()
    for name in chunk_lists:
        with open(os.path.join(folder, name), "rb+") as f:
            os.fsync(f.fileno())
    t["fsync"] = time.perf_counter() - start
    start = time.perf_counter()
    for chunks in chunk_lists.values():
        file_record(chunks)
    t["crc32c of the written chunks (file_record)"] = time.perf_counter() - start
    start = time.perf_counter()
    for data in files.values():
        file_record([data])
    t["crc32c of the same bytes as one bytes object"] = time.perf_counter() - start
    shutil.rmtree(folder)
    os.makedirs(folder)
    t["raw write + fsync of the same bytes"] = timed(lambda: raw_write(folder, files))
    shutil.rmtree(folder)
    t["write, then fsync in a thread while crc32c runs"] = timed(lambda: write_overlapped(folder, chunk_lists))
    shutil.rmtree(folder)
    run = Storage(os.path.join(tmp, "phase-run"))
    saver = saver_for(run, "false")
    t["whole sync save, for comparison"] = timed(lambda: saver.save(1, capture, {}))
    print("sync save phases (one save, sequential):")
    for name, seconds in t.items():
        print(f"  {name:<56} {seconds:6.3f} s")


def write_overlapped(folder: str, chunk_lists: dict[str, list]) -> None:
    """A possible change to the save path (not what src does): each file's crc32c is computed while
    its fsync runs in another thread, instead of after it."""
    import threading

    from resilient_train.checkpoint.manifest import file_record

    os.makedirs(folder, exist_ok=True)
    for name, chunks in chunk_lists.items():
        with open(os.path.join(folder, name), "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            syncing = threading.Thread(target=os.fsync, args=(f.fileno(),))
            syncing.start()
            file_record(chunks)
            syncing.join()


def read_uninitialized(path: str) -> torch.Tensor:
    """A file into an uninitialised buffer (torch.empty), not a zero-filled bytearray."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buffer = torch.empty(size, dtype=torch.uint8)
        view, done = memoryview((ctypes.c_ubyte * size).from_address(buffer.data_ptr())), 0
        while done < size:
            done += f.readinto(view[done:])
    return buffer


def load_phases(tmp: str, capture: Callable[[], fmt.Snapshot], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The parts of one load of the checkpoint `save_phases` left, timed one after the other."""
    from resilient_train.checkpoint.manager import stored_name
    from resilient_train.checkpoint.manifest import check_file, step_dir

    run = Storage(os.path.join(tmp, "phase-run"))
    manager = CheckpointManager(run)
    t: dict[str, float] = {}
    start = time.perf_counter()
    info = manager.info(1)
    t["listing + manifest"] = time.perf_counter() - start
    records = info.manifest["files"]
    paths = [os.path.join(manager.root.path(step_dir(1)), stored_name(n, r)) for n, r in records.items()]
    for _ in range(2):  # alternating, twice: the three ways to read the same files
        start = time.perf_counter()
        raw = [open(p, "rb").read() for p in paths]  # noqa: SIM115 - as raw_read
        t["raw read of the same files (f.read, all held)"] = time.perf_counter() - start
        del raw
        start = time.perf_counter()
        raw = [read_uninitialized(p) for p in paths]
        t["readinto an uninitialised buffer (torch.empty)"] = time.perf_counter() - start
        del raw
        start = time.perf_counter()
        data = {n: manager.root.read_buffer(step_dir(1), stored_name(n, r)) for n, r in records.items()}
        t["read into buffers (read_buffer: bytearray + readinto)"] = time.perf_counter() - start
        if _ == 0:
            del data
    start = time.perf_counter()
    assert not any(check_file(n, data[n], r) for n, r in records.items())
    t["verify crc32c (check_file)"] = time.perf_counter() - start
    start = time.perf_counter()
    snapshot = fmt.decode(data, 0)
    t["decode (headers, tensor views)"] = time.perf_counter() - start
    start = time.perf_counter()
    state_lib.check(snapshot, model, optimizer, None, None)
    t["check against the live model"] = time.perf_counter() - start
    start = time.perf_counter()
    state_lib.restore(snapshot, model, optimizer, None, None)
    t["restore (load_state_dict)"] = time.perf_counter() - start
    del data, snapshot
    t["whole load, for comparison"] = timed(
        lambda: state_lib.restore(manager.load(manager.info(1)).snapshot(0), model, optimizer, None, None))
    print("load phases (one load, sequential):")
    for name, seconds in t.items():
        print(f"  {name:<56} {seconds:6.3f} s")


def young_daly(cost: float, mtbf: float, latency: float = 0.0) -> tuple[float, float]:
    """(optimal interval, overhead fraction) for a checkpoint costing `cost` s of training time.

    Young/Daly: interval = sqrt(2 C M), overhead ~ C / interval + interval / (2 M). `latency`
    adds the expected work lost because a background save commits `latency` s after it starts.
    """
    interval = math.sqrt(2 * cost * mtbf)
    return interval, cost / interval + (interval / 2 + latency) / mtbf


def print_young_daly(figures: dict[str, float], mtbf_hours: float) -> None:
    mtbf = mtbf_hours * 3600
    print(f"Young/Daly at MTBF {mtbf_hours:g} h: interval = sqrt(2*C*MTBF), overhead = C/interval + interval/(2*MTBF)")
    for label, cost, latency in (("sync save", figures["save"], 0.0), ("async stall", figures["stall"], 0.0),
                                 ("async stall + commit latency", figures["stall"], figures["async_total"])):
        interval, overhead = young_daly(cost, mtbf, latency)
        print(f"  {label:<30} C = {cost:7.3f} s: interval {interval:6.0f} s ({interval / 60:5.1f} min), overhead {overhead * 100:.3f} %")


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


def bench_gcs(megabytes: float, reps: int, params: float | None = None) -> None:
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    proc, host = start_emulator()
    os.environ["STORAGE_EMULATOR_HOST"] = host
    try:
        import fsspec

        fs = fsspec.filesystem("gs")
        fs.mkdir("bench")
        fs.pipe_file("bench/warm-up", b"x" * 2**20)  # the first request pays for the connection
        fs.rm("bench/warm-up")
        _, _, capture, files = prepare(megabytes, params)
        total = sum(len(b) for b in files.values())
        save_t, raw_t = [], []
        for rep in range(reps):
            saver = saver_for(Storage(f"gs://bench/run{rep}"), "false")

            # each side's objects are deleted right after it is timed: the in-memory emulator slows
            # down as it holds more (an upload with the other side's 1.5 GB still stored took ~30% longer)
            def raw() -> None:
                raw_t.append(timed(lambda: [fs.pipe_file(f"bench/raw{rep}/{n}", b) for n, b in files.items()]))
                fs.rm(f"bench/raw{rep}", recursive=True)

            def ours() -> None:
                save_t.append(timed(lambda: saver.save(1, capture, {})))
                fs.rm(f"bench/run{rep}", recursive=True)

            for fn in ((raw, ours) if rep % 2 == 0 else (ours, raw)):
                fn()
            print(f"  GCS rep {rep + 1}/{reps}: raw gcsfs put {raw_t[-1]:.2f} s, save {save_t[-1]:.2f} s", file=sys.stderr)
        med = statistics.median
        print(f"GCS emulator, {total / 1e6:.0f} MB state: save {med(save_t):.2f} s, raw gcsfs put {med(raw_t):.2f} s")
        ratios = [r / s for r, s in zip(raw_t, save_t, strict=True)]
        print(f"  throughput ratio save/raw: {med(ratios):.2f} (median of per-rep ratios; "
              f"of the medians: {med(raw_t) / med(save_t):.2f}; "
              f"geometric mean {gmean(ratios):.2f})  [goal >= 0.9]; per rep: " + ", ".join(f"{x:.2f}" for x in ratios))
    finally:
        proc.terminate()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=500, help="state size in MB (weights + AdamW moments)")
    parser.add_argument("--params", type=float, help="build a state of this many parameters instead (e.g. 124e6)")
    parser.add_argument("--gcs-mb", type=float, default=64, help="state size for the GCS emulator part")
    parser.add_argument("--gcs-params", type=float, help="parameters for the GCS emulator part instead (e.g. 124e6)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gcs-reps", type=int, help="repetitions of the GCS part (default: --reps)")
    parser.add_argument("--no-gcs", action="store_true")
    parser.add_argument("--no-local", action="store_true", help="only the GCS emulator part")
    parser.add_argument("--phases", action="store_true", help="also time the parts of one save and one load")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (host buffers, first-touch of memory)")
    parser.add_argument("--pairs", type=int, default=0, help="also N back-to-back (save, raw write) and (load, raw read) pairs")
    parser.add_argument("--mtbf-hours", type=float, default=4.0, help="MTBF for the Young/Daly figures")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, temp dir {os.environ.get('BENCH_DIR') or tempfile.gettempdir()}")
    if not args.no_local:
        figures = bench_local(args.mb, args.reps, args.params, args.phases, args.warmup, args.pairs)
        print_young_daly(figures, args.mtbf_hours)
    if not args.no_gcs:
        bench_gcs(args.gcs_mb, args.gcs_reps or args.reps, args.gcs_params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
