"""Put Python's global `random` stream back after a seeded fetch as a raw copy, not a tuple of ints.

`random.getstate()` builds a tuple of 625 Python ints and `setstate()` parses it back: ~11 us
together on every micro-batch in a loop of fetches (seeding.py), three times that inside a
training loop, the largest part of what a seeded fetch cost once NumPy's state went raw
(numpy_rng.py). A raw copy takes under a microsecond in a loop of fetches. The same state is 2500 bytes in the C object behind
`random`'s module functions (an `int` position, then the 624-word Mersenne Twister key) plus one
Python attribute, `gauss_next`. This module copies exactly those.

Nothing is assumed about where they lie: `_Layout.prove` sets two marked states through
`setstate`, finds the key's bytes once each in the object and the position right before it, then
checks that a raw restore after a few draws gives back what `getstate` said, and puts the user's
state back. Any other Python, a subclass or a layout it cannot prove keeps the plain
`getstate`/`setstate` round trip. tests/test_seeded_fetch.py compares the two draw for draw.
"""

from __future__ import annotations

import ctypes
import random
import struct
from typing import Any, Optional

_WORDS = 624
_STATE_BYTES = 4 + _WORDS * 4  # int index; uint32_t state[624]


def _marked_key(salt: int) -> tuple[int, ...]:
    """624 distinct 32-bit words that no other field of the object holds (a Weyl sequence)."""
    return tuple((0x9E3779B9 * (i + 1) + salt) & 0xFFFFFFFF for i in range(_WORDS))


class _Layout:
    """Where one `random.Random` keeps its Mersenne Twister state, as `prove` found it."""

    def __init__(self, rng: random.Random, offset: int) -> None:
        self.rng = rng
        self.address = id(rng) + offset  # the int index, then the key
        self.words = (ctypes.c_uint32 * (1 + _WORDS)).from_address(self.address)  # index, key[0..623]

    @classmethod
    def prove(cls, rng: Any) -> Optional["_Layout"]:
        """The layout of `rng` when the position and key are found exactly; None otherwise (slow path)."""
        if type(rng) is not random.Random:  # a subclass may keep its state elsewhere
            return None
        saved = rng.getstate()
        try:
            offset = _index_offset(rng, saved)
            if offset is None:
                return None
            layout = cls(rng, offset)
            return layout if _round_trips(layout, saved) else None
        except Exception:
            return None
        finally:
            rng.setstate(saved)


def _index_offset(rng: random.Random, saved: tuple) -> Optional[int]:
    """The offset of the `index` field: each marked key found once, the index just before it."""
    size = random.Random.__mro__[1].__basicsize__  # the C object (_random.Random)
    offsets = set()
    for salt, index in ((0, 17), (0x5BD1E995, 600)):
        key = _marked_key(salt)
        rng.setstate((saved[0], key + (index,), None))
        raw = ctypes.string_at(id(rng), size)
        packed = struct.pack(f"={_WORDS}I", *key)
        if raw.count(packed) != 1:
            return None
        offset = raw.find(packed) - 4
        if offset < 0 or struct.unpack_from("=i", raw, offset)[0] != index:
            return None
        offsets.add(offset)
    return offsets.pop() if len(offsets) == 1 else None


def _round_trips(layout: _Layout, saved: tuple) -> bool:
    """A raw save, some draws that move the key and the cache, a raw restore: `getstate` agrees."""
    rng = layout.rng
    rng.setstate(saved)
    raw = ctypes.string_at(layout.address, _STATE_BYTES)
    rng.random(), rng.gauss(0.0, 1.0), rng.getrandbits(64 * _WORDS)  # past one block of the key
    ctypes.memmove(layout.address, raw, _STATE_BYTES)
    setattr(rng, "gauss_next", saved[2])  # noqa: B010 - typeshed does not declare it
    return rng.getstate() == saved


class PythonRng:
    """Saves, seeds and restores the `random.Random` behind the `random` module's functions."""

    def __init__(self) -> None:
        self._layout: Optional[_Layout] = None
        self._tried: Any = None  # the object `_layout` was proven (or refused) for

    def save(self) -> tuple:
        """What `restore` needs: the proven layout, its raw bytes and `gauss_next`; or (None, getstate())."""
        layout = self._current()
        if layout is None:
            return (None, random.getstate())
        return (layout, ctypes.string_at(layout.address, _STATE_BYTES), getattr(layout.rng, "gauss_next"))  # noqa: B009

    def seed(self, seed: int) -> None:
        random.seed(seed)

    def fingerprint(self) -> Optional[tuple]:
        """A few fields that change whenever the stream moves, or None without a proven layout.

        A draw moves the index; every 624 words the whole key is regenerated; `gauss` may use its
        cache alone. Seeding sets index 624 and key[0] = 0x80000000 whatever the seed, so the
        words sampled are key[1], key[2] and key[623]: two different states agreeing on all of
        them by chance is a 2^-96 event. Costs a microsecond where a copy of the state costs four.
        """
        layout = self._current()
        if layout is None:
            return None
        words = layout.words
        return (words[0], words[2], words[3], words[_WORDS], getattr(layout.rng, "gauss_next"))  # noqa: B009

    def restore(self, saved: tuple) -> None:
        layout = saved[0]
        if layout is None:
            random.setstate(saved[1])
        else:
            ctypes.memmove(layout.address, saved[1], _STATE_BYTES)
            setattr(layout.rng, "gauss_next", saved[2])  # noqa: B010

    def _current(self) -> Optional[_Layout]:
        """The proven layout of the object `random.getstate` reads, proven once per object."""
        rng = getattr(random.getstate, "__self__", None)
        if self._tried is not rng:
            self._tried, self._layout = rng, _Layout.prove(rng)
        return self._layout
