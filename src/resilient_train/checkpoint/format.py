"""How a state snapshot maps onto the files of one checkpoint folder.

    model.safetensors     model weights under the user's own keys (what `export` reads)
    state.safetensors     every other tensor: optimizer moments, scheduler/scaler tensors
    state.json            the rest of the state as tagged JSON, tensors referenced by key
    rng-rank00000.json    each rank's RNG states (they differ per rank under DDP)
    data-rank00000.json   each rank's position in an iterable train_data (only for one), with
                          data-rank00000.safetensors beside it if that position holds tensors
    manifest.json         written last; see manifest.py

Global rank 0 writes the shared files; every rank writes its own RNG file (and data file).
The data files are additive: the format version stays 2, since a reader without them cannot
train an iterable train_data at all, and everything else reads such a checkpoint as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch

from resilient_train.checkpoint import codec, tensorfile
from resilient_train.checkpoint.jsonio import describe
from resilient_train.errors import CheckpointError

MODEL_FILE = "model.safetensors"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


def data_file(rank: int) -> str:
    return f"data-rank{rank:05d}.json"


def data_tensors_file(rank: int) -> str:
    return f"data-rank{rank:05d}.safetensors"


def rank_files(rank: int) -> set[str]:
    """The files of one rank's own state (a resume of that rank reads them)."""
    return {rng_file(rank), data_file(rank), data_tensors_file(rank)}


@dataclass
class Snapshot:
    """The whole training state in host memory, in plain Python and CPU tensors."""

    model: dict[str, torch.Tensor]
    train: dict[str, Any]  # optimizer, scheduler, scaler, progress counters, metrics
    rng: Optional[dict[str, Any]] = None  # this rank's RNG states
    data: Optional[dict[str, Any]] = None  # this rank's position in an iterable train_data (data/iterable.py)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedFiles:
    """One rank's files of a checkpoint, tensors not yet serialised.

    Keeping tensors apart until `to_bytes` lets an async save copy them into reused host buffers
    at the step boundary and serialise in the background while training goes on.
    """

    tensor_files: dict[str, dict[str, torch.Tensor]]
    json_files: dict[str, bytes]

    def stage(self, buffers: "HostBuffers") -> None:
        """Replace every tensor by a copy in `buffers` (live training state may change after this)."""
        self.tensor_files = {
            name: {key: buffers.copy(name, key, t) for key, t in table.items()}
            for name, table in self.tensor_files.items()
        }
        buffers.synchronize()

    def serialize(self) -> dict[str, Any]:
        """Each file's contents: bytes, or the zero-copy chunks of a tensor file."""
        files: dict[str, Any] = {name: tensorfile.serialize(table) for name, table in self.tensor_files.items()}
        files.update(self.json_files)
        return files

    def to_bytes(self) -> dict[str, bytes]:
        return {name: data if isinstance(data, bytes) else data.tobytes() for name, data in self.serialize().items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for table in self.tensor_files.values() for t in table.values())


class HostBuffers:
    """CPU tensors reused from save to save (pinned when the source is on a GPU)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._cuda = False

    def copy(self, name: str, key: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self._buffers.get((name, key))
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.is_cuda and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            self._buffers[(name, key)] = buf
        buf.copy_(t, non_blocking=t.is_cuda)
        self._cuda = self._cuda or t.is_cuda
        return buf

    def synchronize(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()


def encode_files(snapshot: Snapshot, rank: int, shared: bool) -> EncodedFiles:
    """The files `rank` writes: its RNG file, plus the shared ones when `shared` (global rank 0)."""
    rng_tree, rng_tensors = codec.encode(snapshot.rng)
    if rng_tensors:
        raise ValueError("RNG states must be bytes, not tensors")  # internal invariant of state.py
    encoded = EncodedFiles(tensor_files={}, json_files={rng_file(rank): codec.dumps_json(rng_tree)})
    if snapshot.data is not None:
        data_tree, data_tensors = codec.encode(snapshot.data)
        encoded.json_files[data_file(rank)] = codec.dumps_json(data_tree)
        if data_tensors:
            encoded.tensor_files[data_tensors_file(rank)] = data_tensors
    if shared:
        model_tensors, aliases = codec.split_model_state(snapshot.model)
        tree, tensors = codec.encode(snapshot.train)
        encoded.tensor_files.update({MODEL_FILE: model_tensors, STATE_TENSORS: tensors})
        encoded.json_files[STATE_JSON] = codec.dumps_json({"model_aliases": aliases, "train": tree})
    return encoded


def encode_shared(snapshot: Snapshot) -> dict[str, bytes]:
    """The shared files alone (model, state tensors, state JSON) as bytes."""
    files = encode_files(snapshot, 0, shared=True).to_bytes()
    del files[rng_file(0)]
    return files


def encode_rank(snapshot: Snapshot, rank: int) -> dict[str, bytes]:
    """One rank's own files (RNG, data position) as bytes."""
    return encode_files(snapshot, rank, shared=False).to_bytes()


def decode_model(files: Mapping[str, Union[bytes, bytearray]]) -> dict[str, torch.Tensor]:
    """Model weights with tied keys restored as the same tensor.

    A checkpoint may be foreign or hostile: any defect is a one-line CheckpointError.
    """
    return _decode_model(files, _meta(files) if STATE_JSON in files else {})


def _decode_model(files: Mapping[str, Union[bytes, bytearray]], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    model = codec.tensors_from_bytes(_need(files, MODEL_FILE), MODEL_FILE)
    aliases = meta.get("model_aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise CheckpointError(f"{STATE_JSON}: model_aliases is not an object of key names; the file is corrupt or not ours")
    for key, target in aliases.items():
        if target not in model or key in model:
            raise CheckpointError(
                f"{STATE_JSON}: model alias '{key[:200]}' -> '{target[:200]}' does not match {MODEL_FILE}; "
                "the checkpoint is corrupt or not ours"
            )
    for key, target in aliases.items():
        model[key] = model[target]
    return model


def decode(files: Mapping[str, Union[bytes, bytearray]], rank: int) -> Snapshot:
    """Rebuild the snapshot `rank` needs from a checkpoint's file contents.

    Checks the shape a Snapshot must have (its `train` a dict, its RNG states a dict); what each
    part must hold to fit a model and optimizer is checked by `state.restore`.
    """
    meta = _meta(files)
    if "train" not in meta:
        raise CheckpointError(f"{STATE_JSON} has no training state; the checkpoint is corrupt or not ours")
    tensors = codec.tensors_from_bytes(_need(files, STATE_TENSORS), STATE_TENSORS)
    train = codec.decode(meta["train"], tensors, STATE_JSON)
    if not isinstance(train, dict) or not all(isinstance(k, str) for k in train):
        raise CheckpointError(
            f"{STATE_JSON}: the training state is {describe(train)}, not an object; the checkpoint is corrupt or not ours"
        )
    rng = None
    name = rng_file(rank)
    if name in files:
        rng = codec.decode(codec.loads_json(files[name], name), {}, name)
        if rng is not None and not isinstance(rng, dict):
            raise CheckpointError(f"{name} holds {describe(rng)}, not RNG states; the checkpoint is corrupt or not ours")
    return Snapshot(model=_decode_model(files, meta), train=train, rng=rng, data=_decode_data(files, rank))


def _decode_data(files: Mapping[str, Union[bytes, bytearray]], rank: int) -> Optional[dict[str, Any]]:
    """This rank's data position, or None when the checkpoint has none for it."""
    name = data_file(rank)
    if name not in files:
        return None
    tensors: dict[str, torch.Tensor] = {}
    if data_tensors_file(rank) in files:
        tensors = codec.tensors_from_bytes(files[data_tensors_file(rank)], data_tensors_file(rank))
    data = codec.decode(codec.loads_json(files[name], name), tensors, name)
    if not isinstance(data, dict):
        raise CheckpointError(f"{name} holds {describe(data)}, not a data position; the checkpoint is corrupt or not ours")
    return data


def _need(files: Mapping[str, Any], name: str) -> Any:
    if name not in files:
        raise CheckpointError(f"the checkpoint has no {name}; it is incomplete or not ours")
    return files[name]


def _meta(files: Mapping[str, Any]) -> dict[str, Any]:
    meta = codec.loads_json(_need(files, STATE_JSON), STATE_JSON)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{STATE_JSON} is not a JSON object; the checkpoint is corrupt or not ours")
    return meta
