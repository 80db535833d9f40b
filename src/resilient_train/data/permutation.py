"""A shuffled epoch order in O(1) memory: a keyed bijection over [0, n) evaluated per index.

`torch.randperm(n)` costs 8 bytes per sample, built at every epoch start and every resume: at
2e9 samples (token windows of a large corpus) that is 16 GB, more than a Colab VM has, before the
first step. Here the order is a function: position `i` of epoch `e` maps to sample `order[i]` by a
balanced Feistel network over the smallest even number of bits (at least 2) that covers n, keyed
by (seed, epoch), with cycle-walking to stay inside [0, n): the network permutes [0, 4^h) with
4^h < 4n, so fewer than four evaluations per index on average. Any slice of the order costs
O(length) and is computed on whole tensors at once, so a resume at any cursor is O(batch), and the
order depends on (seed, epoch) only, never on the world size.

Quality: six rounds of a 32-bit integer hash (two multiply-xorshift steps) keyed per round. This
is a shuffle for training, not cryptography; what matters is that it is a bijection (tests check
every n up to a few thousand and sample huge ones), cheap, and identical on every platform: all
arithmetic stays below 2^63 in int64, so nothing depends on overflow behaviour.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

ROUNDS = 6
ALGORITHM = "feistel-v1"  # recorded in checkpoints: a run keeps the order it started with
_M32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2^27: a 32-bit value times it stays below 2^59
_M64 = (1 << 64) - 1
_PYTHON_TAIL = 64  # values still walking below which the walk continues in Python ints


def _mix64(z: int) -> int:
    """splitmix64's finaliser, for deriving round keys from (seed, epoch) (Python ints)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class FeistelOrder:
    """The visiting order of one epoch of `n` samples, keyed by (seed, epoch); O(1) memory."""

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 1:
            raise ValueError(f"an epoch order needs at least one sample, got n={n}")
        if n > 2**62:
            raise ValueError(f"an epoch of {n} samples is beyond what the order supports (2^62)")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = (bits + 1) // 2  # <= 31: every half fits a 32-bit lane
        self._mask = (1 << self._half) - 1
        key = _mix64((seed & _M64) ^ _mix64(epoch & _M64))
        self._keys: list[tuple[int, int]] = []
        for _ in range(ROUNDS):
            key = _mix64(key)
            self._keys.append((key & _M32, (key >> 32) & _M32))

    def _round(self, right: Any, key: tuple[int, int]) -> Any:
        x = right ^ key[0]
        x = (x * _MULT) & _M32
        x = x ^ (x >> 16)
        x = (x * _MULT) & _M32
        x = x ^ (x >> 16)
        return (x ^ key[1]) & self._mask

    def _permute(self, x: Any) -> Any:
        """The Feistel network on a tensor of int64 or on one Python int (the same values)."""
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self._half) | right

    def positions(self, index: torch.Tensor) -> torch.Tensor:
        """order[index] for a tensor of positions in [0, n) (int64).

        Cycle-walking: a value outside [0, n) is permuted again until its cycle returns below n.
        Each pass works on the values still outside only (about half of the previous pass), and
        the last few, whose walks are the longest, go on as Python ints: a pass costs ~50 tensor
        operations whatever its length, and a 10-pass tail of a handful of values was most of the
        time of a small epoch. `_permute` is the same arithmetic on ints and on tensors.
        """
        out = self._permute(index.to(torch.int64).reshape(-1))
        pending = (out >= self.n).nonzero().squeeze(1)
        values = out[pending]
        while pending.numel() > _PYTHON_TAIL:
            values = self._permute(values)
            inside = values < self.n
            out[pending[inside]] = values[inside]
            pending, values = pending[~inside], values[~inside]
        if pending.numel():
            out[pending] = torch.tensor([self._walk(value) for value in values.tolist()], dtype=torch.int64, device=out.device)
        return out.reshape(index.shape)

    def _walk(self, value: int) -> int:
        value = self._permute(value)
        while value >= self.n:
            value = self._permute(value)
        return value

    def slice(self, start: int, stop: int) -> list[int]:
        """order[start:stop] in O(stop - start)."""
        start, stop = max(0, start), min(stop, self.n)
        if stop <= start:
            return []
        return self.positions(torch.arange(start, stop, dtype=torch.int64)).tolist()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"position {i} outside an epoch of {self.n} samples")
        return self.slice(i, i + 1)[0]

    def __iter__(self) -> Iterator[int]:
        chunk = 1 << 16
        for start in range(0, self.n, chunk):
            yield from self.slice(start, start + chunk)
