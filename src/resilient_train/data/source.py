"""One interface for every kind of train_data: what the loop pulls batches from and checkpoints.

`build_source` looks the data up in `kinds.SOURCE_KINDS` and builds its adapter: `BatchStream`
(map_style.py) for a map-style dataset, `IterableStream` (iterable.py) for the iterable kinds,
which differ in how a resume finds their position (the kind's `position`).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

from resilient_train.data.kinds import kind_of


@runtime_checkable
class BatchSource(Protocol):
    """Endless micro-batches with a position a checkpoint keeps and a resume loads."""

    epoch: int  # this rank's epoch
    cursor: int  # samples of the epoch consumed, all ranks together
    last_consumed: int  # samples (all ranks) the last batch took
    last_local: int  # of which on this rank

    @property
    def batch_size(self) -> int: ...

    @property
    def global_batch(self) -> int: ...

    @property
    def completed_epochs(self) -> int: ...

    def next(self) -> Any:
        """The next micro-batch (a new epoch starts when one ends)."""

    def seek(self, epoch: int, cursor: int, state: Any = None) -> None:
        """Continue at this position; `state` is this rank's entry from the checkpoint (iterables)."""

    def state_dict(self) -> Optional[dict[str, Any]]:
        """This rank's entry in a checkpoint, or None when the progress counters say it all."""

    def layout(self) -> dict[str, Any]:
        """What a checkpoint records about the order, so a resume can tell what it keeps exact."""

    def use_order(self, layout_order: Any) -> None:
        """Continue with the order the resumed run started with."""


def build_source(data: Any, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int = 0,
                 max_epochs: Optional[int] = None) -> BatchSource:
    """This rank's BatchSource over `train_data` (a Dataset, a DataLoader, an iterable, ...)."""
    if kind_of(data).position == "cursor":
        from resilient_train.data.map_style import BatchStream, build_loader

        loader, sampler = build_loader(data, batch_size, seed, rank, world_size, num_workers)
        return BatchStream(loader, sampler)
    from resilient_train.data.iterable import build_iterable_stream

    return build_iterable_stream(data, batch_size, seed, rank, world_size, num_workers, max_epochs)


def build_stream(data: Any, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int = 0,
                 max_epochs: Optional[int] = None) -> tuple[BatchSource, BatchSource]:
    """(source, source): the older two-value form (stream, layout) some callers still unpack."""
    source = build_source(data, batch_size, seed, rank, world_size, num_workers, max_epochs)
    return source, source
