"""Bounded JSON for checkpoint files: whatever a file holds, reading it is a CheckpointError at worst.

A checkpoint may come from a shared Drive folder or a bucket someone else can write, so its JSON
is untrusted input. `json.loads` recurses once per nesting level (a manifest of `[` * 100000 ends
in RecursionError, and whatever walks the result recurses again) and takes any size, so the size
and the nesting depth are checked first, with a linear scan of the bytes that skips strings.
Torch-free: `ls`, `verify` and `sync` read manifests through this module.
"""

from __future__ import annotations

import json
import re
from typing import Any, Union

from resilient_train.errors import CheckpointError

Buffer = Union[bytes, bytearray, memoryview]

MAX_BYTES = 64 * 2**20  # state.json of a large model is a few MiB; this leaves a wide margin
MAX_DEPTH = 64  # what we write nests about 8 deep

# a whole string (the unrolled form is linear, even on failure), a bracket, or a lone quote (an
# unterminated string: the first alternative failed there, the JSON is invalid)
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|"', re.DOTALL)
_OPEN, _CLOSE, _QUOTE = frozenset(b"[{"), frozenset(b"]}"), ord('"')


def dumps_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON; non-finite floats are refused (ValueError): the codec tags them."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), sort_keys=False).encode("utf-8")


def loads_json(data: Buffer, name: str, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one checkpoint file's JSON; any defect is a one-line CheckpointError naming `name`."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if len(data) > max_bytes:
        raise CheckpointError(
            f"{name} is {len(data)} bytes, more than the {max_bytes} such a file may have; the file is corrupt or not ours"
        )
    depth = json_depth(data, max_depth)
    if depth > max_depth:
        raise CheckpointError(f"{name} nests deeper than {max_depth} levels; the file is corrupt or not ours")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError, MemoryError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{name} is not valid JSON ({exc.__class__.__name__}); the file is corrupt or not ours") from None


def json_depth(data: Union[bytes, bytearray], limit: int = MAX_DEPTH) -> int:
    """Nesting depth of JSON `data`, brackets inside strings ignored; stops counting past `limit`.

    Linear in the size of `data`. Malformed input gives some number, never an exception: the
    parser reports what is wrong with it.
    """
    brackets = data.count(b"[") + data.count(b"{")
    if brackets <= limit:
        return brackets  # an upper bound, and enough: it cannot nest deeper than it has brackets
    depth = deepest = 0
    for match in _TOKENS.finditer(data):
        first = data[match.start()]
        if first == _QUOTE:
            if match.end() - match.start() == 1:
                break  # an unterminated string: invalid JSON, the parser says so
            continue
        if first in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif first in _CLOSE:
            depth -= 1
    return deepest


def describe(value: Any) -> str:
    """What a JSON value is, for messages: `a string`, `a list`, `an object`, `null`, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"non-standard constant {token}")  # NaN and Infinity: we never write them
