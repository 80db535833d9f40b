"""Put NumPy's global RNG back after a seeded fetch, in microseconds rather than ~80.

`np.random.get_state()` and `set_state()` copy the 624-word Mersenne Twister key element by
element: together ~80 us, paid on every micro-batch (seeding.py), which was the largest per-step
cost of the loop on a small model. When nothing drew from NumPy since the last fetch (the usual
case: the training step does not use it) the state is the one this module put back, so it is
saved and restored as raw bytes through the bit generator's documented `ctypes.state_address`.

The bytes are the key and position only; the legacy `randn` cache (`has_gauss`, `gauss`) is not
reachable that way. The fast path is therefore taken only when that cache is known to be empty:
`np.random.seed` empties it, and a non-empty cache can only have been filled by a draw, which
moves the key or position, so "bytes equal to what was last restored with an empty cache" proves
both. Anything else goes through `get_state`/`set_state`, as before. The layout is checked once
against `get_state` before the fast path is ever used.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Optional

_KEY_WORDS = 624
_STATE_BYTES = _KEY_WORDS * 4 + 4  # uint32 key[624]; int pos


class NumpyRng:
    """Saves and restores `numpy.random`'s global (legacy) state around one seeded fetch."""

    def __init__(self, np: Any) -> None:
        self._np = np
        self._generator: Any = None  # the bit generator `_address` points into
        self._address = 0
        self._restored: Optional[bytes] = None  # bytes last put back with an empty gauss cache

    def save(self) -> Any:
        """What `restore` needs: raw bytes (fast) or the full legacy state tuple."""
        address = self._fast_address()
        if address:
            raw = ctypes.string_at(address, _STATE_BYTES)
            if raw == self._restored:
                return raw
            full = self._np.random.get_state()
            return raw if full[3] == 0 else full
        return self._np.random.get_state()

    def seed(self, seed: int) -> None:
        self._np.random.seed(seed)

    def restore(self, saved: Any) -> None:
        if isinstance(saved, bytes):
            self._np.random.seed(0)  # empties the gauss cache; the key is overwritten next
            ctypes.memmove(self._address, saved, _STATE_BYTES)
            self._restored = saved
        else:
            self._np.random.set_state(saved)
            self._restored = None

    def _fast_address(self) -> int:
        """The state struct's address, or 0 where the fast path cannot be proven for this NumPy."""
        generator = getattr(getattr(self._np.random, "mtrand", None), "_rand", None)
        generator = getattr(generator, "_bit_generator", None)
        if generator is not self._generator:
            self._generator, self._address, self._restored = generator, _checked_address(self._np, generator), None
        return self._address


def _checked_address(np: Any, generator: Any) -> int:
    """The MT19937 state address, if its bytes are exactly key then position (else 0)."""
    try:
        address = int(generator.ctypes.state_address)
        _, key, pos, _, _ = np.random.get_state()
        expected = np.asarray(key, dtype=np.uint32).tobytes() + int(pos).to_bytes(4, sys.byteorder, signed=True)
        return address if ctypes.string_at(address, _STATE_BYTES) == expected else 0
    except Exception:  # no ctypes interface, another bit generator, another layout: slow path
        return 0
