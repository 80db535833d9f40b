"""Put NumPy's global RNG back after a seeded fetch, in microseconds rather than ~80.

`np.random.get_state()` and `set_state()` copy the 624-word Mersenne Twister key element by
element: together ~80 us, paid on every micro-batch (seeding.py), which was the largest per-step
cost of the loop on a small model. The same state is a few fixed-size fields in memory: the key
and position, at the bit generator's documented `ctypes.state_address`, and the legacy `randn`
cache (`has_gauss`, then `gauss`) inside the RandomState object, which NumPy does not expose.
This module saves and restores exactly those bytes.

Nothing is assumed about that layout: before the first fast save, `_Layout.prove` sets known
states through `set_state` and finds each field where `get_state` says it is (the key bytes at
the address, two distinct marker values of `gauss` at one offset with `has_gauss` beside them),
then puts the state back. Any other NumPy, bit generator or layout keeps the plain
`get_state`/`set_state` round trip. tests/test_seeded_fetch.py compares the two draw for draw.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from typing import Any, Optional

_KEY_BYTES = 624 * 4 + 4  # uint32 key[624]; int pos
_GAUSS_FIELDS = 16  # int has_gauss, padding, double gauss
_MARKS = (1.2345678901234567, -9.876543210987654)


class _Layout:
    """Where one RandomState keeps its state, as `prove` found it against `get_state`."""

    def __init__(self, state: Any, key_address: int, flag_offset: int) -> None:
        self.state = state
        # the key lives in the bit generator: held here so that a raw restore never writes into
        # freed memory, even when a fetch replaced np.random's bit generator in the meantime
        self.bit_generator = state._bit_generator
        self.key_address = key_address
        self.flag_address = id(state) + flag_offset
        self.words = (ctypes.c_uint32 * (_KEY_BYTES // 4)).from_address(key_address)  # key[0..623], pos
        self.flags = (ctypes.c_char * _GAUSS_FIELDS).from_address(self.flag_address)

    @classmethod
    def prove(cls, np: Any, state: Any) -> Optional["_Layout"]:
        """The layout of `state` when every field is found exactly; None otherwise (slow path)."""
        try:
            if not isinstance(state, np.random.RandomState):
                return None
            key_address = int(state._bit_generator.ctypes.state_address)
            saved = state.get_state()
        except Exception:  # no ctypes interface, another bit generator: the slow path
            return None
        try:
            offset = _gauss_offset(state, saved)
            if offset is None or not _key_matches(np, key_address, saved):
                return None
            return cls(state, key_address, offset - 8)
        except Exception:
            return None
        finally:
            state.set_state(saved)


def _gauss_offset(state: Any, saved: tuple) -> Optional[int]:
    """The offset of `gauss` in the object, where `has_gauss` (an int 8 bytes before) reads 1 or 0 as set."""
    size = type(state).__basicsize__
    offsets = set()
    for mark in _MARKS:
        state.set_state(saved[:3] + (1, mark))
        raw = ctypes.string_at(id(state), size)
        packed = struct.pack("d", mark)
        if raw.count(packed) != 1:
            return None
        offset = raw.find(packed)
        if offset < 8 or struct.unpack_from("i", raw, offset - 8)[0] != 1:
            return None
        offsets.add(offset)
    if len(offsets) != 1:
        return None
    offset = offsets.pop()
    state.set_state(saved[:3] + (0, 0.0))
    if struct.unpack_from("i", ctypes.string_at(id(state), size), offset - 8)[0] != 0:
        return None
    return offset


def _key_matches(np: Any, address: int, saved: tuple) -> bool:
    _, key, pos, _, _ = saved
    expected = np.asarray(key, dtype=np.uint32).tobytes() + int(pos).to_bytes(4, sys.byteorder, signed=True)
    return ctypes.string_at(address, _KEY_BYTES) == expected


class NumpyRng:
    """Saves, seeds and restores the RandomState behind `numpy.random`'s module functions."""

    def __init__(self, np: Any) -> None:
        self._np = np
        self._layout: Optional[_Layout] = None
        self._tried: Any = None  # the (state, bit generator) pair `_layout` was proven for

    def save(self) -> tuple:
        """What `restore` needs: the proven layout and its raw fields, or (None, the legacy state)."""
        layout = self._current()
        if layout is None:
            return (None, self._np.random.get_state())
        return (layout, ctypes.string_at(layout.key_address, _KEY_BYTES), ctypes.string_at(layout.flag_address, _GAUSS_FIELDS))

    def seed(self, seed: int) -> None:
        layout = self._current()
        if layout is None:
            self._np.random.seed(seed)
        else:
            layout.state.seed(seed)  # the object the module functions draw from (np.random.seed may not be)

    def fingerprint(self) -> Optional[tuple]:
        """A few fields that change whenever the stream moves, or None without a proven layout:
        the position, key[0], key[1] and key[623] (the whole key is regenerated every 624 words)
        and the `randn` cache. See PythonRng.fingerprint."""
        layout = self._current()
        if layout is None:
            return None
        words = layout.words
        return (words[624], words[0], words[1], words[623], layout.flags.raw)

    def restore(self, saved: tuple) -> None:
        layout = saved[0]
        if layout is None:
            self._np.random.set_state(saved[1])
        else:
            ctypes.memmove(layout.key_address, saved[1], _KEY_BYTES)
            ctypes.memmove(layout.flag_address, saved[2], _GAUSS_FIELDS)

    def _current(self) -> Optional[_Layout]:
        """The proven layout of the RandomState `np.random.get_state` reads, proven once per object."""
        state = getattr(self._np.random.get_state, "__self__", None)
        key = (state, getattr(state, "_bit_generator", None))
        if self._tried is None or self._tried[0] is not key[0] or self._tried[1] is not key[1]:
            self._tried, self._layout = key, _Layout.prove(self._np, state)
        return self._layout
