"""Map-style train_data: a global sample cursor, a world-size-independent order, seeded batches.

Global micro-batch `k` of an epoch is `order[k*B*W : (k+1)*B*W]` (B per-device batch, W world
size) and rank `r` takes its `r`-th slice of `B`; a resume at global cursor `c` starts at
`order[c:]` in O(1). See the package docstring for what this keeps exact.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from resilient_train.data.order import FEISTEL, SEQUENTIAL, EpochOrder, saved_order
from resilient_train.data.seeding import BatchKey, SeededBatches, batch_seed, loader_generator, whole_batch, worker_settings
from resilient_train.errors import UsageError


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of one epoch, starting at a global cursor."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.order = FEISTEL if shuffle else SEQUENTIAL
        self.epoch = 0
        self.cursor = 0
        if self.global_batch > num_samples:
            raise UsageError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"({batch_size} per device x {world_size} processes); lower trainer.batch_size"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def layout(self) -> dict[str, Any]:
        """What a checkpoint records so a resume can tell whether the data order still means the same."""
        return {"order": self.order, "drop_last": self.drop_last}

    def use_order(self, layout_order: Any) -> None:
        """Continue with the order the resumed checkpoint's run started with (see EpochOrder)."""
        self.order = saved_order(layout_order, self.shuffle)

    def set_position(self, epoch: int, cursor: int) -> None:
        """Start the next iteration at sample `cursor` of epoch `epoch` (cursor counts all ranks)."""
        self.epoch, self.cursor = epoch, cursor

    def consumed(self, cursor: int) -> int:
        """Samples (all ranks together) the global batch starting at `cursor` takes: the tail is smaller."""
        left = self.num_samples - cursor
        if left >= self.global_batch:
            return self.global_batch
        if self.drop_last:
            return 0
        return left if left >= self.world_size else 0

    def local_count(self, take: int) -> int:
        """Samples of a global batch of `take` samples that land on this rank."""
        if take == self.global_batch:
            return self.batch_size
        per, extra = divmod(take, self.world_size)
        return per + (1 if self.rank < extra else 0)

    def __len__(self) -> int:
        left = max(0, self.num_samples - self.cursor)
        tail = left % self.global_batch
        return left // self.global_batch + (1 if tail >= self.world_size and not self.drop_last else 0)

    def positions(self) -> Iterator[tuple[int, list[int]]]:
        """(global cursor where the global batch starts, this rank's indices) for the rest of the epoch."""
        order = EpochOrder(self.order, self.num_samples, self.seed, self.epoch)
        b, w, r = self.batch_size, self.world_size, self.rank
        start = self.cursor
        while True:
            take = self.consumed(start)
            if take == 0:
                return
            if take == self.global_batch:
                lo, hi = start + r * b, start + (r + 1) * b
            else:  # the epoch's tail: split as evenly as possible, earlier ranks take the extra ones
                per, extra = divmod(take, w)
                lo = start + r * per + min(r, extra)
                hi = lo + per + (1 if r < extra else 0)
            yield start, order.slice(lo, hi)
            start += take

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.positions():
            yield indices

    def keys(self) -> Iterator[BatchKey]:
        """The micro-batches with their seeds: (seed, epoch, global start position, rank) decide them."""
        for start, indices in self.positions():
            yield BatchKey(tuple(indices), batch_seed(self.seed, self.epoch, start, self.rank))


class _KeyedSampler(Sampler[BatchKey]):
    """The DataLoader's sampler: one BatchKey per micro-batch (the loader runs with batch_size=None)."""

    def __init__(self, sampler: ResumableBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[BatchKey]:
        return self.sampler.keys()


def _custom(kind: str, what: Any, detail: str = "") -> UsageError:
    return UsageError(
        f"train_data's DataLoader has a custom {kind} ({type(what).__name__}{detail}); the trainer owns the sample "
        f"order so it can resume mid-epoch: pass the Dataset, or a DataLoader with shuffle=True/False and drop_last, "
        f"and no {kind}"
    )


def _order_of(loader: DataLoader) -> tuple[bool, bool, Optional[int]]:
    """(shuffle, drop_last, batch size or None when unbatched) a given DataLoader asks for.

    Only torch's own RandomSampler (a plain permutation) and SequentialSampler, batched by torch's
    BatchSampler, have a meaning the trainer can reproduce at any cursor; anything else is refused.
    """
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        sampler, drop_last, batch_size = loader.sampler, False, None
    elif type(batch_sampler) is BatchSampler:
        sampler, drop_last, batch_size = batch_sampler.sampler, batch_sampler.drop_last, batch_sampler.batch_size
    else:
        raise _custom("batch_sampler", batch_sampler)
    if type(sampler) is SequentialSampler:
        return False, drop_last, batch_size
    if type(sampler) is RandomSampler:
        if sampler.replacement or getattr(sampler, "_num_samples", None) is not None:
            raise _custom("sampler", sampler, " with replacement or num_samples")
        return True, drop_last, batch_size
    raise _custom("sampler", sampler)


def map_style_length(data: Any, dataset: Any, what: str) -> int:
    """The dataset's length, or a UsageError saying why it cannot be resumed at an exact sample."""
    if isinstance(dataset, IterableDataset):
        raise UsageError(f"{what} is an IterableDataset; give a map-style Dataset (with __len__ and __getitem__) "
                         "so the trainer can resume at an exact sample")
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise UsageError(f"{what} must be a torch Dataset or DataLoader, got {type(data).__name__}")
    try:
        return len(dataset)
    except TypeError:
        raise UsageError(f"{what} has no length; give a map-style Dataset with __len__") from None


def build_loader(
    data: Any, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int = 0
) -> tuple[DataLoader, ResumableBatchSampler]:
    """A DataLoader over `data` driven by a ResumableBatchSampler, each micro-batch fetched seeded.

    A given DataLoader keeps its dataset, collate_fn, workers and memory pinning, its batch size
    (which wins over the config's), its order (`shuffle=False` is sequential, still resumable at
    any cursor) and `drop_last`; a custom sampler or batch_sampler is refused (UsageError).
    """
    dataset, collate, unbatched = data, default_collate, False
    shuffle, drop_last = True, False
    settings: dict[str, Any] = {"num_workers": num_workers}
    if isinstance(data, DataLoader):
        dataset = data.dataset
        num_samples = map_style_length(data, dataset, "train_data")  # before the sampler check: an iterable one has a sampler of its own
        shuffle, drop_last, given = _order_of(data)
        unbatched = given is None
        batch_size = 1 if given is None else given
        collate = data.collate_fn
        settings = worker_settings(data)
    else:
        num_samples = map_style_length(data, dataset, "train_data")
    sampler = ResumableBatchSampler(num_samples, batch_size, seed, rank, world_size, shuffle=shuffle, drop_last=drop_last)
    loader = DataLoader(SeededBatches(dataset, collate, unbatched), batch_size=None, sampler=_KeyedSampler(sampler),
                        collate_fn=whole_batch, generator=loader_generator(), **settings)
    return loader, sampler


class BatchStream:
    """A map-style BatchSource: endless micro-batches across epochs, tracking (epoch, cursor) for checkpoints."""

    def __init__(self, loader: DataLoader, sampler: ResumableBatchSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self.epoch = 0
        self.cursor = 0
        self.last_consumed = 0  # samples (all ranks) the last micro-batch took
        self.last_local = 0  # of which on this rank: the length of the batch `next` returned
        self._iterator: Optional[Iterator[Any]] = None
        # no workers and no pinning: fetch in this process without the DataLoader's per-batch
        # machinery (profiler ranges, index plumbing: ~10 us of every micro-batch, see _fetched_here)
        self._here = loader.num_workers == 0 and not loader.pin_memory and isinstance(loader.dataset, SeededBatches)

    # -- the batch layout, from the sampler ------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def global_batch(self) -> int:
        return self.sampler.global_batch

    def layout(self) -> dict[str, Any]:
        return self.sampler.layout()

    def use_order(self, layout_order: Any) -> None:
        self.sampler.use_order(layout_order)

    # -- position ----------------------------------------------------------------------------------
    def seek(self, epoch: int, cursor: int, state: Any = None) -> None:
        """Continue at sample `cursor` of `epoch`; `state` (a rank's data entry, see `state_dict`) is not needed."""
        self.epoch, self.cursor = epoch, cursor
        self._iterator = None

    def state_dict(self) -> Optional[dict[str, Any]]:
        """A map-style position is global and lives in the progress counters: no per-rank entry (None)."""
        return None

    @property
    def completed_epochs(self) -> int:
        """Full passes behind: the current epoch counts once its last batch has been taken."""
        return self.epoch + (1 if self.sampler.consumed(self.cursor) == 0 else 0)

    def _fetched_here(self) -> Iterator[Any]:
        """The rest of the epoch's micro-batches, fetched in this process as a DataLoader without
        workers and without pinning fetches them: the same keys, the same SeededBatches fetch
        (indices, collate, seed), nothing else. A DataLoader's loop around that fetch is
        profiler ranges and bookkeeping for features this case does not use."""
        batches = self.loader.dataset
        for key in self.sampler.keys():
            yield batches[key]

    def next(self) -> Any:
        """The next micro-batch; the cursor advances by one global batch."""
        for _ in range(2):
            if self._iterator is None:
                if self.sampler.consumed(self.cursor) == 0:
                    self.epoch, self.cursor = self.epoch + 1, 0
                self.sampler.set_position(self.epoch, self.cursor)
                self._iterator = self._fetched_here() if self._here else iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            except Exception:
                if self._here:  # a generator that raised is finished: the next call starts at this batch again
                    self._iterator = None
                raise
            self.last_consumed = self.sampler.consumed(self.cursor)
            self.last_local = self.sampler.local_count(self.last_consumed)
            self.cursor += self.last_consumed
            return batch
        raise RuntimeError("the data loader yielded no batch for a whole epoch")  # guarded by the sampler's own check
