"""Seed a global RNG stream for a map-style fetch only once the fetch is seen drawing from it.

A seeded fetch (seeding.py) saves Python's and NumPy's global streams, seeds them, fetches and
restores them: ~37 us of every micro-batch measured inside a training loop on a 2-core VM, where
each copy and seeding runs on caches the step has just evicted (~12 us in a loop of bare fetches).
Watching an idle stream instead costs ~10 us for the two. Most datasets never draw from one of the two
(a tokenised corpus, a tensor dataset; vision augmentation often uses torch only), and then
seeding it changes nothing: the batch is the same, and the stream is put back as it was.

So each stream starts idle: not seeded, watched through a fingerprint (a few fields that move
whenever the stream moves; python_rng.py, numpy_rng.py). If an idle stream moved during a fetch,
the fetch drew from the process's own stream instead of the batch's seed: the stream is put back
from the copy taken before the fetch, becomes seeded for every later fetch of this process, and
the caller fetches the batch again. The result is what a fetch with every stream seeded returns,
batch for batch and state for state (tests/test_seeded_fetch.py checks this against the plain
seeded fetch over random scripts of draws).

The cost for the user: a dataset that draws from `random` or NumPy's global generator is fetched
twice for the first batch that draws, once per process (DataLoader workers each learn it). The
copy of an idle stream's state is only retaken when its fingerprint changed since the last one,
so a loop whose own code does not draw from the stream copies nothing.

A stream without a fingerprint (an unproven layout) is seeded on every fetch, as before.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol


class GlobalStream(Protocol):
    """A process-global RNG stream (PythonRng, NumpyRng)."""

    def save(self) -> tuple: ...
    def seed(self, seed: int) -> None: ...
    def restore(self, saved: tuple) -> None: ...
    def fingerprint(self) -> Optional[tuple]: ...


class StreamGuard:
    """One global stream around the fetches of one process: `before`, fetch, `after`."""

    __slots__ = ("stream", "modulus", "seeded", "_saved", "_mark")

    def __init__(self, stream: GlobalStream, modulus: int) -> None:
        self.stream = stream
        self.modulus = modulus  # NumPy's legacy seed takes 32 bits
        self.seeded = False  # learned: a fetch of this process draws from the stream
        self._saved: Any = None  # a copy of the process's own state, valid while its fingerprint is `_mark`
        self._mark: Optional[tuple] = None

    def before(self, seed: int) -> None:
        """Keep a copy of the process's state (retaken only if it moved), and seed when learned."""
        mark = self.stream.fingerprint()
        if mark is None or mark != self._mark or self._saved is None:
            self._saved, self._mark = self.stream.save(), mark
        if self.seeded or mark is None:
            self.stream.seed(seed % self.modulus)

    def after(self) -> bool:
        """Put the process's state back; True when an idle stream was drawn from (fetch again)."""
        if self.seeded or self._mark is None:
            self.stream.restore(self._saved)
            return False
        if self.stream.fingerprint() == self._mark:
            return False
        self.stream.restore(self._saved)
        self.seeded = True
        return True
