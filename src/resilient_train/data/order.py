"""The order an epoch visits a map-style dataset in, by algorithm; a run keeps the one it started with."""

from __future__ import annotations

from typing import Any, Optional

import torch

from resilient_train.data.permutation import FeistelOrder
from resilient_train.errors import UsageError

FEISTEL, RANDPERM, SEQUENTIAL = "feistel-v1", "randperm-v1", "sequential"
ORDERS = (FEISTEL, RANDPERM, SEQUENTIAL)
ITERABLE = "iterable"  # the `order` of an iterable train_data: its own (data/iterable.py)


def saved_order(layout_order: Any, shuffle: bool) -> str:
    """The order algorithm a checkpoint's `order` field names (checkpoints before it: randperm)."""
    if not shuffle:
        return SEQUENTIAL
    if layout_order in (FEISTEL, RANDPERM):
        return layout_order
    return RANDPERM if layout_order is None else FEISTEL  # None: written before orders were recorded


def resumed_order(layout_order: Any, current: Any) -> str:
    """The order a resumed run continues with: the checkpoint's (see `saved_order`) unless either
    side is an iterable train_data, whose order is its own (a change of kind is labelled by the
    resume report, since the orders then differ)."""
    if current == ITERABLE or layout_order == ITERABLE:
        return str(current)
    return saved_order(layout_order, current != SEQUENTIAL)


class EpochOrder:
    """One epoch's visiting order, sliced on demand.

    `feistel-v1` (new runs) is a keyed bijection evaluated per index: O(1) memory and O(batch) per
    slice at any dataset size (permutation.py). `randperm-v1` is the `torch.randperm(n)` order of
    runs started before it (8 bytes per sample), kept so their checkpoints resume with the order
    they started; `sequential` is index order (`shuffle=False`).
    """

    BLOCK = 1 << 16  # feistel positions computed at once

    def __init__(self, algorithm: str, num_samples: int, seed: int, epoch: int) -> None:
        self.algorithm = algorithm
        self._feistel: Optional[FeistelOrder] = None
        self._table: Optional[torch.Tensor] = None
        self._block: Optional[list[int]] = None  # feistel: order[_block_start : _block_start + len(_block)]
        self._block_start = 0
        if algorithm == FEISTEL:
            self._feistel = FeistelOrder(num_samples, seed, epoch)
        elif algorithm == RANDPERM:
            generator = torch.Generator()
            generator.manual_seed((seed * 1_000_003 + epoch) % 2**63)
            self._table = torch.randperm(num_samples, generator=generator)
        elif algorithm != SEQUENTIAL:
            raise UsageError(f"unknown epoch order '{algorithm}' (one of {', '.join(ORDERS)}); upgrade resilient_train")

    def slice(self, lo: int, hi: int) -> list[int]:
        if self._feistel is not None:
            return self._feistel_slice(self._feistel, lo, hi)
        if self._table is not None:
            return self._table[lo:hi].tolist()
        return list(range(lo, hi))

    def _feistel_slice(self, order: FeistelOrder, lo: int, hi: int) -> list[int]:
        """order[lo:hi] from a block of the order computed ahead in one go.

        Evaluating the Feistel network costs tens of small tensor operations per call whatever
        the length, so a micro-batch at a time spent ~1 ms per batch (a fifth of a small model's
        step); a block of BLOCK positions amortises that to nothing. The block is kept as a list
        (~2 MB): a slice of it is a list slice, where slicing a tensor and converting it cost
        ~7 us of every micro-batch.
        """
        start, block = self._block_start, self._block
        if block is None or lo < start or hi > start + len(block):
            stop = min(order.n, max(hi, lo + self.BLOCK))
            block = self._block = order.positions(torch.arange(lo, stop, dtype=torch.int64)).tolist()
            start = self._block_start = lo
        return block[lo - start : hi - start]


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True, algorithm: Optional[str] = None) -> torch.Tensor:
    """The whole global visiting order of one epoch as a tensor (for tests and tools; O(n))."""
    algorithm = algorithm or (FEISTEL if shuffle else SEQUENTIAL)
    return torch.tensor(EpochOrder(algorithm, num_samples, seed, epoch).slice(0, num_samples), dtype=torch.int64)
