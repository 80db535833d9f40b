"""The Hugging Face `datasets` part of a data position: checked before the checkpoint is chosen.

An `IterableDataset`'s state is a nested dict whose counters (`shard_idx`, `shard_example_idx`,
...) `load_state_dict` takes as they are: a string there fails with a TypeError only once the
first batch is read (after the resume was chosen and announced, so no older checkpoint is
tried), and a `shard_idx` past the dataset's shards silently ends the epoch (the rest of it is
skipped, yet the resume is called bit-exact). Both pass the checksums of a hand-edited or hostile
checkpoint, so a position is checked here while the checkpoint is chosen and a misfit makes its
checkpoint skipped like a corrupt one.
"""

from __future__ import annotations

from typing import Any, Optional

from resilient_train.errors import CheckpointError

# the integer counters of datasets' ExamplesIterable states (datasets 2.18 .. 5.x)
COUNTERS = ("shard_idx", "shard_example_idx", "batch_idx", "num_chunks_since_previous_state", "cropped_chunk_length")
_MAX_COUNT = 2**53
_MAX_DEPTH = 64


def source_shards(source: Any) -> Optional[int]:
    """How many shards a `datasets.IterableDataset` reads (None for any other source)."""
    for name in ("num_shards", "n_shards"):
        try:
            value = getattr(source, name, None)
        except Exception:  # noqa: BLE001 - a property of someone else's class: no answer is fine
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_source_state(state: Any, shards: Optional[int], depth: int = 0) -> None:
    """CheckpointError (one line) when a counter of `state` is not a count the source can take."""
    if depth > _MAX_DEPTH:
        raise CheckpointError("the checkpoint's data position is nested too deep; the checkpoint is corrupt or not ours")
    if isinstance(state, list):
        for item in state:
            check_source_state(item, shards, depth + 1)
        return
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        if key in COUNTERS:
            _check_counter(key, value, shards if key == "shard_idx" else None)
        else:
            check_source_state(value, shards, depth + 1)


def _check_counter(key: str, value: Any, shards: Optional[int]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_COUNT:
        raise CheckpointError(f"the checkpoint's data position has {key}={str(value)[:40]!r}, not a count train_data "
                              "can take; the checkpoint is corrupt or not ours")
    if shards is not None and value >= shards:
        raise CheckpointError(f"the checkpoint's data position has {key}={value}, but train_data has {shards} shard(s); "
                              "the checkpoint is corrupt or was made with other data")
