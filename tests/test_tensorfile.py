"""Our zero-copy safetensors writer/reader against the safetensors library, and hostile input."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from resilient_train.checkpoint import tensorfile
from resilient_train.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i64": torch.arange(9),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),  # non-contiguous
        "slice": base[2:4],  # a view into a larger storage
    }


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def test_files_we_write_load_with_the_safetensors_library() -> None:
    tensors = _tensors()
    _assert_equal(st_load(tensorfile.serialize(tensors, {"step": "3"}).tobytes()), tensors)


def test_files_the_library_writes_load_with_our_reader() -> None:
    tensors = {k: v.contiguous() for k, v in _tensors().items() if k != "slice"}
    _assert_equal(tensorfile.deserialize(bytearray(st_save(tensors))), tensors)


def test_round_trip_is_exact_and_tensors_are_writable_views() -> None:
    tensors = _tensors()
    loaded = tensorfile.deserialize(bytearray(tensorfile.serialize(tensors).tobytes()))
    _assert_equal(loaded, tensors)
    loaded["f32"].add_(1)  # optimizer state is updated in place after a resume


def test_serialising_does_not_copy_contiguous_tensors() -> None:
    t = torch.zeros(1000)
    chunks = tensorfile.serialize({"t": t})
    t.fill_(7)  # the chunk is a view: it sees the change
    assert st_load(chunks.tobytes())["t"].eq(7).all()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d[:5],  # too short
        lambda d: struct.pack("<Q", 10**12) + d[8:],  # header length past the end
        lambda d: d[:8] + b"{not json" + d[17:],  # unreadable header
        lambda d: d[:-4],  # data shorter than the header says
        lambda d: d + b"\0" * 8,  # trailing bytes the header does not describe
    ],
)
def test_malformed_files_raise_checkpoint_error(corrupt) -> None:
    data = tensorfile.serialize({"a": torch.arange(4.0), "b": torch.arange(3)}).tobytes()
    with pytest.raises(CheckpointError):
        tensorfile.deserialize(bytearray(corrupt(data)))


def _forge(header: dict, body: bytes) -> bytearray:
    raw = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize(
    "header",
    [
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        {"a": {"dtype": "OBJECT", "shape": [2], "data_offsets": [0, 8]}},
        {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        ["not", "an", "object"],
    ],
)
def test_forged_headers_are_rejected(header) -> None:
    with pytest.raises(CheckpointError):
        tensorfile.deserialize(_forge(header, b"\0" * 12))
