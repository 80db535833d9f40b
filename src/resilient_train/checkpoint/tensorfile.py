"""The safetensors file format, written and read without intermediate copies.

`safetensors.torch.save` builds the whole file as one bytes object and `load` copies every
tensor out of it again; for a 500 MB state that doubles memory traffic and makes a save several
times slower than writing the bytes. The format itself is simple (8-byte little-endian header
length, a JSON header of dtype/shape/offsets, then the raw tensor bytes), so this module writes it
as a list of zero-copy chunks and reads it into tensors that view one buffer. Files stay fully
compatible: the tests load what we write with the safetensors library and vice versa.

Reading validates everything an untrusted file could get wrong (header size, JSON shape, dtypes,
shapes, offsets that overlap, leave holes or run past the end) before any tensor is created.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from typing import Any, Iterable, Optional, Union

import torch

from resilient_train.checkpoint.jsonio import loads_json
from resilient_train.errors import CheckpointError

Buffer = Union[bytes, bytearray, memoryview]

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}
MAX_HEADER = 100 * 2**20
_HEADER_DEPTH = 8  # {"key": {"shape": [...]}} nests 3 deep
_MAX_DIMS = 64  # torch allows no more


class TensorChunks:
    """A serialised tensor file as a list of buffers; holds the tensors its views point into."""

    def __init__(self, chunks: list[Buffer], keep_alive: list[torch.Tensor]) -> None:
        self.chunks = chunks
        self._keep_alive = keep_alive

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def __iter__(self):
        return iter(self.chunks)

    def tobytes(self) -> bytes:
        return b"".join(self.chunks)


def serialize(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> TensorChunks:
    """The chunks of a safetensors file holding `tensors` (CPU, any layout; copied only if needed)."""
    prepared = {name: _contiguous_cpu(t) for name, t in tensors.items()}
    # widest dtypes first keeps every tensor aligned to its element size after the 8-byte-padded header
    order = sorted(prepared, key=lambda n: (-prepared[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = prepared[name]
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"tensor '{name}' has dtype {t.dtype}, which the checkpoint format cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    chunks: list[Buffer] = [struct.pack("<Q", len(raw)) + raw]
    chunks += [_view(prepared[name]) for name in order if prepared[name].numel()]
    return TensorChunks(chunks, list(prepared.values()))


def deserialize(data: Buffer, name: str = "tensor file") -> dict[str, torch.Tensor]:
    """Tensors viewing `data` (a bytearray keeps them writable without a copy).

    Whatever `data` holds, the only exception is a one-line CheckpointError naming `name`.
    """
    try:
        return _deserialize(data, name)
    except CheckpointError:
        raise
    except Exception as exc:  # a case the checks missed (MemoryError included): still the file's defect
        raise CheckpointError(
            f"{name} cannot be read as a safetensors file ({type(exc).__name__}); the file is corrupt or not ours"
        ) from exc


def _deserialize(data: Buffer, name: str) -> dict[str, torch.Tensor]:
    total = len(data)
    if total < 8:
        raise CheckpointError(f"{name} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > min(MAX_HEADER, total - 8):
        raise CheckpointError(f"{name} has an impossible header length; the file is corrupt or not ours")
    try:
        header = loads_json(bytes(data[8 : 8 + header_len]), name, max_bytes=MAX_HEADER, max_depth=_HEADER_DEPTH)
    except CheckpointError:
        raise CheckpointError(f"{name} has an unreadable header; the file is corrupt or not ours") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{name}: header __metadata__ is not a map of strings")
    base, body = 8 + header_len, total - 8 - header_len
    entries = []
    for key, spec in header.items():
        dtype, shape, start, end = _entry(name, key, spec)
        if end - start != math.prod(shape) * _itemsize(dtype):
            raise CheckpointError(f"{name}: header entry '{key[:200]}' does not match its shape")
        entries.append((start, end, key, dtype, shape))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for start, end, key, _, _ in entries:
        if start != position:
            raise CheckpointError(f"{name}: tensor '{key[:200]}' overlaps or leaves a gap in the data")
        position = end
    if position != body:
        raise CheckpointError(f"{name}: data section is {body} bytes, header describes {position}")
    buffer = data if not isinstance(data, bytes) else bytearray(data)
    tensors = {}
    for start, _end, key, dtype, shape in entries:
        count = math.prod(shape)
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        else:
            tensors[key] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=base + start).reshape(shape)
    return tensors


def _entry(name: str, key: str, spec: Any) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, each of the type the format requires."""
    ok = isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and spec["dtype"] in _CODES
    shape: Any
    offsets: Any
    shape, offsets = (spec.get("shape"), spec.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_is_count(d) for d in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(x) for x in offsets)
    if not ok:
        raise CheckpointError(f"{name}: bad header entry for '{key[:200]}'")
    return _CODES[spec["dtype"]], shape, offsets[0], offsets[1]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _contiguous_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # a view into a larger storage: write only its own bytes
    return t


def _view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without copying (the TensorChunks keeps `t` alive)."""
    size = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * size).from_address(t.data_ptr())).cast("B")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def byte_length(chunks: Iterable[Buffer]) -> int:
    return sum(len(c) for c in chunks)
