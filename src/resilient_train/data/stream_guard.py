"""Seed a global RNG stream for a map-style fetch only once the fetch is seen drawing from it.

A seeded fetch (seeding.py) saves Python's and NumPy's global streams, seeds them, fetches and
restores them: ~37 us of every micro-batch measured inside a training loop on a 2-core VM, where
each copy and seeding runs on caches the step has just evicted (~12 us in a loop of bare fetches).
Watching an idle stream instead costs ~10 us for the two. Most datasets never draw from one of the two
(a tokenised corpus, a tensor dataset; vision augmentation often uses torch only), and then
seeding it changes nothing: the batch is the same, and the stream is put back as it was.

So a stream is seeded on the first fetch of each process, which also tells whether the dataset
draws from it: its fingerprint (a few fields that move whenever the stream moves;
python_rng.py, numpy_rng.py) after the fetch is compared with the one right after seeding. A
stream the first fetch drew from stays seeded. The others go idle: not seeded, only watched. If
an idle stream moved during a later fetch, that fetch drew from the process's own stream instead
of the batch's seed: the stream is put back from the copy taken before the fetch, becomes seeded
for every later fetch of this process, and the caller fetches the batch again (also when the
first attempt raised). The batch and the states afterwards are what a fetch with every stream
seeded gives (tests/test_seeded_fetch.py checks this against the plain seeded fetch over random
scripts of draws).

What this cannot see, and users are told in docs/data.md:
- the fetch that is repeated ran once unseeded, so state a dataset keeps from it (a cache of
  random values filled on first access) holds that run's values: only for a dataset that draws
  sometimes but not on the first batch of a process;
- a fetch that reads a stream and puts it back itself (`getstate`, draw, `setstate`) never moves
  the fingerprint, so it reads the process's own stream, unseeded.

The copy of a stream's state is only retaken when its fingerprint changed since the last one, so
a loop whose own code does not draw from the stream copies nothing. A stream without a
fingerprint (an unproven layout) is seeded on every fetch, as before.
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

    __slots__ = ("stream", "modulus", "learned", "seeded", "_saved", "_mark", "_seeded_mark")

    def __init__(self, stream: GlobalStream, modulus: int) -> None:
        self.stream = stream
        self.modulus = modulus  # NumPy's legacy seed takes 32 bits
        self.learned = False  # the first fetch of the process ran (seeded) and showed whether it draws
        self.seeded = True  # seed every fetch: until learned, and for good once a fetch drew
        self._saved: Any = None  # a copy of the process's state, valid while its fingerprint is `_mark`
        self._mark: Optional[tuple] = None
        self._seeded_mark: Optional[tuple] = None  # the fingerprint right after seeding the first fetch

    def before(self, seed: int) -> None:
        """Keep a copy of the process's state (retaken only if it moved); seed unless idle."""
        mark = self.stream.fingerprint()
        if mark is None or mark != self._mark or self._saved is None:
            self._saved, self._mark = self.stream.save(), mark
        if self.seeded or mark is None:
            self.stream.seed(seed % self.modulus)
            if not self.learned:
                self._seeded_mark = self.stream.fingerprint()

    def after(self) -> bool:
        """Put the process's state back; True when an idle stream was drawn from (fetch again)."""
        if self._mark is None:  # no fingerprint: seeded every time
            self.stream.restore(self._saved)
            return False
        if not self.learned:
            self.learned = True
            self.seeded = self.stream.fingerprint() != self._seeded_mark
            self.stream.restore(self._saved)
            return False
        if self.seeded:
            self.stream.restore(self._saved)
            return False
        if self.stream.fingerprint() == self._mark:
            return False
        self.stream.restore(self._saved)
        self.seeded = True
        return True
