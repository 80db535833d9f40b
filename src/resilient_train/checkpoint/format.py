"""How a state snapshot maps onto the files of one checkpoint folder.

    model.safetensors     model weights under the user's own keys (what `export` reads)
    state.safetensors     every other tensor: optimizer moments, scheduler/scaler tensors
    state.json            the rest of the state as tagged JSON, tensors referenced by key
    rng-rank00000.json    each rank's RNG states (they differ per rank under DDP)
    manifest.json         written last; see manifest.py

Global rank 0 writes the shared files; every rank writes its own RNG file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from resilient_train.checkpoint import codec

MODEL_FILE = "model.safetensors"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.json"


@dataclass
class Snapshot:
    """The whole training state in host memory, in plain Python and CPU tensors."""

    model: dict[str, torch.Tensor]
    train: dict[str, Any]  # optimizer, scheduler, scaler, progress counters, metrics
    rng: Optional[dict[str, Any]] = None  # this rank's RNG states
    extra: dict[str, Any] = field(default_factory=dict)


def encode_shared(snapshot: Snapshot) -> dict[str, bytes]:
    """The files only global rank 0 writes."""
    model_tensors, aliases = codec.split_model_state(snapshot.model)
    tree, tensors = codec.encode(snapshot.train)
    return {
        MODEL_FILE: codec.tensors_to_bytes(model_tensors),
        STATE_TENSORS: codec.tensors_to_bytes(tensors),
        STATE_JSON: codec.dumps_json({"model_aliases": aliases, "train": tree}),
    }


def encode_rank(snapshot: Snapshot, rank: int) -> dict[str, bytes]:
    """The file each rank writes for itself."""
    tree, tensors = codec.encode(snapshot.rng)
    if tensors:
        raise ValueError("RNG states must be bytes, not tensors")  # internal invariant of state.py
    return {rng_file(rank): codec.dumps_json(tree)}


def decode_model(files: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Model weights with tied keys restored as the same tensor."""
    model = codec.tensors_from_bytes(files[MODEL_FILE], MODEL_FILE)
    meta = codec.loads_json(files[STATE_JSON], STATE_JSON) if STATE_JSON in files else {}
    for key, target in meta.get("model_aliases", {}).items():
        model[key] = model[target]
    return model


def decode(files: dict[str, bytes], rank: int) -> Snapshot:
    """Rebuild the snapshot `rank` needs from a checkpoint's file contents."""
    meta = codec.loads_json(files[STATE_JSON], STATE_JSON)
    tensors = codec.tensors_from_bytes(files[STATE_TENSORS], STATE_TENSORS)
    rng = None
    name = rng_file(rank)
    if name in files:
        rng = codec.decode(codec.loads_json(files[name], name), {})
    return Snapshot(model=decode_model(files), train=codec.decode(meta["train"], tensors), rng=rng)
