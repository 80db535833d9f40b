"""Epoch-order cost vs dataset size: the Feistel order against `torch.randperm`.

For n from 1e3 to 1e10: the time to start an epoch and fast-forward to a cursor (build the order,
then produce one batch of indices at a random position, which is what a resume does) and the peak
memory that takes (tracemalloc for Python allocations; randperm's tensor is counted by its size).
randperm is measured only up to `--randperm-max` (1e8 = 800 MB by default; 2e9 would need 16 GB).
Goal: flat in n, fast-forward <= 10 ms at any cursor.

    .venv/bin/python bench/permutation.py [--batch 512] [--randperm-max 1e8]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc

import torch

from resilient_train.data.permutation import FeistelOrder


def feistel(n: int, batch: int, reps: int = 7) -> tuple[float, int]:
    times = []
    rng = random.Random(n)
    for _ in range(reps):
        cursor = rng.randrange(max(1, n - batch))
        start = time.perf_counter()
        FeistelOrder(n, seed=1234, epoch=7).slice(cursor, cursor + batch)
        times.append(time.perf_counter() - start)
    # memory measured apart (tracemalloc slows what it watches): Python objects plus the batch-sized
    # index tensors, which tracemalloc does not see and which hold 8 bytes per index of the batch
    tracemalloc.start()
    FeistelOrder(n, seed=1234, epoch=7).slice(n // 2, n // 2 + batch)
    peak = tracemalloc.get_traced_memory()[1] + 3 * 8 * batch
    tracemalloc.stop()
    return statistics.median(times), peak


def randperm(n: int, batch: int, reps: int = 3) -> tuple[float, int]:
    times = []
    rng = random.Random(n)
    for _ in range(reps):
        cursor = rng.randrange(max(1, n - batch))
        start = time.perf_counter()
        g = torch.Generator().manual_seed(1234)
        order = torch.randperm(n, generator=g)
        order[cursor:cursor + batch].tolist()
        times.append(time.perf_counter() - start)
        del order
    return statistics.median(times), 8 * n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--randperm-max", type=float, default=1e8)
    args = parser.parse_args()
    print(f"batch of {args.batch} indices at a random cursor; torch {torch.__version__}")
    print(f"{'n':>8}  {'feistel start+ff':>17}  {'feistel peak':>12}  {'randperm start+ff':>18}  {'randperm memory':>15}")
    for exponent in range(3, 11):
        n = 10**exponent
        f_time, f_peak = feistel(n, args.batch)
        if n <= args.randperm_max:
            r_time, r_mem = randperm(n, args.batch)
            r = f"{r_time * 1e3:>15.2f} ms  {r_mem / 2**20:>12.1f} MiB"
        else:
            r = f"{'(skipped)':>18}  {8 * n / 2**30:>11.1f} GiB"
        print(f"{'1e%d' % exponent:>8}  {f_time * 1e3:>14.2f} ms  {f_peak / 1024:>9.1f} KiB  {r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
