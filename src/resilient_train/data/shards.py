"""Per-rank shards of an iterable dataset, and what its state cannot keep."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

from torch.utils.data import IterableDataset

from resilient_train.data.kinds import has_state, is_hf_iterable


class RankShard(IterableDataset):
    """Rank `rank` of `world_size`: item `rank` of every `world_size` consecutive items of `dataset`.

    A last round with fewer than `world_size` items is dropped, so every rank gets as many items
    and the ranks' epochs end at the same batch. Every rank reads the whole stream; a dataset
    that shards itself by `torch.distributed.get_rank()` must not be given to the trainer too.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int) -> None:
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.dataset)
        while True:
            round_ = list(itertools.islice(iterator, self.world_size))  # whole rounds: the inner state stays between them
            if len(round_) < self.world_size:
                return
            yield round_[self.rank]


class StatefulRankShard(RankShard):
    """A RankShard of a dataset with state: its state is the inner one, taken between whole rounds."""

    def state_dict(self) -> Any:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.dataset.load_state_dict(state)


def shard(dataset: Any, rank: int, world_size: int) -> Any:
    """This rank's shard of an iterable dataset (itself on one process)."""
    if world_size == 1:
        return dataset
    if is_hf_iterable(dataset):
        if getattr(dataset, "_distributed", None) is not None:
            return dataset  # already split by node (by the user): splitting again would split the split
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return (StatefulRankShard if has_state(dataset) else RankShard)(dataset, rank, world_size)


def shuffle_buffer(dataset: Any) -> bool:
    """Whether a Hugging Face dataset shuffles through a buffer (its content is not in its state)."""
    pending, seen = [getattr(dataset, "_ex_iterable", None)], 0
    while pending and seen < 100:
        node = pending.pop()
        seen += 1
        if node is None:
            continue
        if type(node).__name__ == "BufferShuffledExamplesIterable":
            return True
        pending.append(getattr(node, "ex_iterable", None))
        pending.extend(getattr(node, "ex_iterables", None) or [])
    return False
