"""How a state snapshot maps onto the files of one checkpoint folder.

    model.safetensors     model weights under the user's own keys (what `export` reads)
    state.safetensors     every other tensor: optimizer moments, scheduler/scaler tensors
    state.json            the rest of the state as tagged JSON, tensors referenced by key
    rng-rank00000.json    each rank's RNG states (they differ per rank under DDP)
    data-rank00000.json   each rank's position in an iterable train_data (only for one), with
                          data-rank00000.safetensors beside it if that position holds tensors
    manifest.json         written last; see manifest.py
    ../shared/*.safetensors  tensors that did not change since the previous save, stored once
                          per run under content-derived names (frozen.py, shared.py); state.json
                          maps each such model key to its file (`model_shared`)

Global rank 0 writes the shared files; every rank writes its own RNG file (and data file).
The data files are additive: the format version stays 2, since a reader without them cannot
train an iterable train_data at all, and everything else reads such a checkpoint as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

import torch

from resilient_train.checkpoint import codec, tensorfile
from resilient_train.checkpoint.frozen import FrozenPlanner, ModelInfo, SharedGroup, holds_its_name
from resilient_train.checkpoint.jsonio import describe
from resilient_train.checkpoint.manifest import SHARED_NAME
from resilient_train.checkpoint.shared import SharedFiles, logical
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
    model_info: Optional[ModelInfo] = None  # capture: which tensors are trainable, their versions
    unresolved: dict[str, str] = field(default_factory=dict)  # decode: model key -> shared file not read
    from_live: set[str] = field(default_factory=set)  # resolved from the live model: already in place
    pending_aliases: dict[str, str] = field(default_factory=dict)  # tied keys whose target is unresolved


@dataclass
class ModelPart:
    """Global rank 0's model and training state, laid out once the shared files are placed."""

    local: dict[str, torch.Tensor]  # tensors stored in the checkpoint itself
    groups: list[SharedGroup]  # tensors for shared files (live views: they did not change)
    aliases: dict[str, str]
    train_tree: Any
    planner: Optional[FrozenPlanner] = None

    def files(self, store: Optional[SharedFiles]) -> dict[str, Any]:
        """model.safetensors, state.json and the shared files placed (a group whose name is taken by
        a damaged file, or every group without a store, goes into model.safetensors instead)."""
        local, refs, placed = dict(self.local), {}, {}
        listing = store.listing() if store is not None and self.groups else {}
        for group in self.groups:
            found = self.planner.place(group, store, listing) if store is not None and self.planner is not None else None
            if found is None:
                local.update(group.tensors)
                continue
            placed[logical(found.name)] = found
            refs.update({key: found.name for key in group.tensors})
        meta: dict[str, Any] = {"model_aliases": self.aliases, "train": self.train_tree}
        if refs:
            meta["model_shared"] = refs
        return {MODEL_FILE: tensorfile.serialize(local), STATE_JSON: codec.dumps_json(meta), **placed}


@dataclass
class EncodedFiles:
    """One rank's files of a checkpoint, tensors not yet serialised.

    Keeping tensors apart until `to_bytes` lets an async save copy them into reused host buffers
    at the step boundary and serialise in the background while training goes on.
    """

    tensor_files: dict[str, dict[str, torch.Tensor]]
    json_files: dict[str, bytes]
    model: Optional[ModelPart] = None  # global rank 0: model and training state

    def stage(self, buffers: "HostBuffers") -> None:
        """Replace every tensor by a copy in `buffers` (live training state may change after this)."""
        self.tensor_files = {
            name: {key: buffers.copy(name, key, t) for key, t in table.items()}
            for name, table in self.tensor_files.items()
        }
        if self.model is not None:  # the shared groups stay live views: they did not change
            self.model.local = {key: buffers.copy(MODEL_FILE, key, t) for key, t in self.model.local.items()}
        buffers.synchronize()

    def serialize(self, store: Optional[SharedFiles] = None) -> dict[str, Any]:
        """Each file's contents: bytes, the zero-copy chunks of a tensor file, or a shared file
        already placed in `store` (shared.Placed)."""
        model = self.model.files(store) if self.model is not None else {}
        files: dict[str, Any] = {MODEL_FILE: model.pop(MODEL_FILE)} if model else {}
        files.update({name: tensorfile.serialize(table) for name, table in self.tensor_files.items()})
        files.update(self.json_files)
        files.update(model)  # state.json, then the shared files placed (records only: already written)
        return files

    def to_bytes(self) -> dict[str, bytes]:
        return {name: data if isinstance(data, bytes) else data.tobytes() for name, data in self.serialize().items()}

    @property
    def nbytes(self) -> int:
        tables = [*self.tensor_files.values(), *([self.model.local] if self.model is not None else [])]
        return sum(t.numel() * t.element_size() for table in tables for t in table.values())


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


def encode_files(snapshot: Snapshot, rank: int, shared: bool, planner: Optional[FrozenPlanner] = None) -> EncodedFiles:
    """The files `rank` writes: its RNG file, plus the shared ones when `shared` (global rank 0).

    With a `planner`, model tensors that did not change go to the run's shared files
    (frozen.py) when the files are serialised with a store.
    """
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
        encoded.tensor_files[STATE_TENSORS] = tensors
        local, groups = (planner or FrozenPlanner()).plan(model_tensors, snapshot.model_info if planner else None)
        encoded.model = ModelPart(local, groups, aliases, tree, planner)
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


def _decode_model(files: Mapping[str, Union[bytes, bytearray]], meta: dict[str, Any],
                  unresolved: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
    """The model tensors; a shared file not among `files` leaves its keys in `unresolved` (when
    given; else the checkpoint is incomplete) with their aliases left to `complete_model`."""
    model = codec.tensors_from_bytes(_need(files, MODEL_FILE), MODEL_FILE)
    missing = _add_shared(model, files, meta)
    if missing and unresolved is None:
        raise CheckpointError(f"the checkpoint needs shared file {next(iter(missing.values()))}, which was not read")
    if unresolved is not None:
        unresolved.update(missing)
    aliases = meta.get("model_aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise CheckpointError(f"{STATE_JSON}: model_aliases is not an object of key names; the file is corrupt or not ours")
    for key, target in aliases.items():
        if (target not in model and target not in missing) or key in model:
            raise CheckpointError(
                f"{STATE_JSON}: model alias '{key[:200]}' -> '{target[:200]}' does not match {MODEL_FILE}; "
                "the checkpoint is corrupt or not ours"
            )
    for key, target in aliases.items():
        if target in model:
            model[key] = model[target]
    return model


def _add_shared(model: dict[str, torch.Tensor], files: Mapping[str, Union[bytes, bytearray]], meta: dict[str, Any]) -> dict[str, str]:
    """Put the shared tensors whose files were read into `model`; {key: file} of the ones not read."""
    refs = meta.get("model_shared", {})
    if not isinstance(refs, dict) or not all(isinstance(k, str) and isinstance(v, str) and SHARED_NAME.fullmatch(v)
                                             for k, v in refs.items()):
        raise CheckpointError(f"{STATE_JSON}: model_shared is not an object of shared file names; the file is corrupt or not ours")
    missing: dict[str, str] = {}
    by_file: dict[str, list[str]] = {}
    for key, name in refs.items():
        if key in model:
            raise CheckpointError(f"{STATE_JSON}: model key '{key[:200]}' is both in {MODEL_FILE} and shared; the checkpoint is corrupt")
        by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        if logical(name) not in files:
            missing.update({key: name for key in keys})
            continue
        model.update(shared_tensors(files[logical(name)], name, keys))
    return missing


def shared_tensors(data: Union[bytes, bytearray], name: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` from a shared file's bytes: all there, and the ones its name was made
    from (CheckpointError otherwise). Resume and export read shared files through here."""
    tensors = codec.tensors_from_bytes(data, name)
    absent = [key for key in keys if key not in tensors]
    if absent:
        raise CheckpointError(f"shared file {name} does not hold '{absent[0][:200]}'; the checkpoint is corrupt or not ours")
    wanted = {key: tensors[key] for key in keys}
    if not holds_its_name(wanted, name):
        raise CheckpointError(f"shared file {name} does not hold the tensors its name was made from; the file is corrupt or not ours")
    return wanted


def complete_model(snapshot: Snapshot, resolved: dict[str, torch.Tensor]) -> None:
    """Fill the tensors of shared files that were not read (from the live model or read later)."""
    absent = [key for key in snapshot.unresolved if key not in resolved]
    if absent:
        raise CheckpointError(f"model tensor '{absent[0][:200]}' of shared file {snapshot.unresolved[absent[0]]} was not resolved")
    snapshot.model.update({key: resolved[key] for key in snapshot.unresolved})
    for key, target in snapshot.pending_aliases.items():
        snapshot.model[key] = snapshot.model[target]
    snapshot.unresolved, snapshot.pending_aliases = {}, {}


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
    unresolved: dict[str, str] = {}
    model = _decode_model(files, meta, unresolved)
    aliases = meta.get("model_aliases", {})
    pending = {key: target for key, target in aliases.items() if target in unresolved}
    return Snapshot(model=model, train=train, rng=rng, data=decode_data(files, rank), unresolved=unresolved, pending_aliases=pending)


def decode_data(files: Mapping[str, Union[bytes, bytearray]], rank: int) -> Optional[dict[str, Any]]:
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
