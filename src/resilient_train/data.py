"""The resumable sampler: a global sample cursor, a world-size-independent order, seeded batches.

Epoch `e` visits the dataset in a shuffled order keyed by (seed, e) that costs O(1) memory at any
size (a Feistel bijection, permutation.py; runs begun before it keep `randperm(n)`), or in index
order when the given DataLoader asked for `shuffle=False`. Global micro-batch `k` of the epoch
is `order[k*B*W : (k+1)*B*W]` (B per-device batch, W world size) and rank `r` takes its `r`-th
slice of `B`. Resuming at global cursor `c` (samples consumed in the epoch by all ranks together)
starts at `order[c:]` in O(1): nothing is iterated to skip. Because the cursor is global and the
order does not depend on W, a resume on another world size sees every sample of the interrupted
epoch exactly once. The tail that does not fill a global batch is split evenly across the ranks as
one smaller batch (dropped only when there are fewer samples than ranks), so no sample is skipped
whatever the world size; with `drop_last=True` the tail is dropped on every world size.

Randomness drawn while a batch is fetched (random crops or windows in `__getitem__`, masking in a
collate function) must not depend on which worker process fetches the batch or on when the loader
was created, or a resume (new loader, new workers, batches dealt to other workers) would differ
from an uninterrupted run. So every micro-batch carries a seed derived from (seed, epoch, the
global sample position where its global batch starts, rank), and Python's `random`, torch's CPU
generator and NumPy's global generator are seeded from it just before the items are fetched and
collated, whether that happens in a worker or, with `num_workers=0`, in the main process. The
previous RNG states are restored afterwards, so the main process's own stream (dropout) never
moves, and a batch is the same with 0 or N workers, persistent or not. Lightning seeds each
worker once (from the worker id and rank) and torchdata's StatefulDataLoader snapshots each
worker's RNG state; both tie a batch's randomness to the worker that happens to fetch it, which
a resume with a fresh loader cannot reproduce. Generators a dataset builds itself (say
`numpy.random.default_rng()` without a seed) are outside this and stay non-reproducible.

An iterable train_data (IterableDataset, torchdata's StatefulDataLoader) has no index to jump to:
`build_stream` hands it to data_iterable.py, which keeps each rank's position in the source's
own state (or skips what was consumed) instead of a global cursor.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from resilient_train.errors import UsageError
from resilient_train.permutation import FeistelOrder

FEISTEL, RANDPERM, SEQUENTIAL = "feistel-v1", "randperm-v1", "sequential"
ORDERS = (FEISTEL, RANDPERM, SEQUENTIAL)
ITERABLE = "iterable"  # the `order` of an iterable train_data: its own (data_iterable.py)


def saved_order(layout_order: Any, shuffle: bool) -> str:
    """The order algorithm a checkpoint's `order` field names (checkpoints before it: randperm)."""
    if not shuffle:
        return SEQUENTIAL
    if layout_order in (FEISTEL, RANDPERM):
        return layout_order
    return RANDPERM if layout_order is None else FEISTEL  # None: written before orders were recorded


def resumed_order(layout_order: Any, current: Any) -> str:
    """The order a resumed run continues with: the checkpoint's (see `saved_order`) unless either
    side is an iterable train_data, whose order is its own (a change of kind is labelled by the
    resume report, since the orders then differ)."""
    if current == ITERABLE or layout_order == ITERABLE:
        return str(current)
    return saved_order(layout_order, current != SEQUENTIAL)


class EpochOrder:
    """One epoch's visiting order, sliced on demand.

    `feistel-v1` (new runs) is a keyed bijection evaluated per index: O(1) memory and O(batch) per
    slice at any dataset size (permutation.py). `randperm-v1` is the `torch.randperm(n)` order of
    runs started before it (8 bytes per sample), kept so their checkpoints resume with the order
    they started; `sequential` is index order (`shuffle=False`).
    """

    BLOCK = 1 << 16  # feistel positions computed at once

    def __init__(self, algorithm: str, num_samples: int, seed: int, epoch: int) -> None:
        self.algorithm = algorithm
        self._feistel: Optional[FeistelOrder] = None
        self._table: Optional[torch.Tensor] = None
        self._block: Optional[torch.Tensor] = None  # feistel: order[_block_start : _block_start + len(_block)]
        self._block_start = 0
        if algorithm == FEISTEL:
            self._feistel = FeistelOrder(num_samples, seed, epoch)
        elif algorithm == RANDPERM:
            generator = torch.Generator()
            generator.manual_seed((seed * 1_000_003 + epoch) % 2**63)
            self._table = torch.randperm(num_samples, generator=generator)
        elif algorithm != SEQUENTIAL:
            raise UsageError(f"unknown epoch order '{algorithm}' (one of {', '.join(ORDERS)}); upgrade resilient_train")

    def slice(self, lo: int, hi: int) -> list[int]:
        if self._feistel is not None:
            return self._feistel_slice(self._feistel, lo, hi)
        if self._table is not None:
            return self._table[lo:hi].tolist()
        return list(range(lo, hi))

    def _feistel_slice(self, order: FeistelOrder, lo: int, hi: int) -> list[int]:
        """order[lo:hi] from a block of the order computed ahead in one go.

        Evaluating the Feistel network costs tens of small tensor operations per call whatever
        the length, so a micro-batch at a time spent ~1 ms per batch (a fifth of a small model's
        step); a block of BLOCK positions amortises that to nothing and holds 512 KB.
        """
        start, block = self._block_start, self._block
        if block is None or lo < start or hi > start + len(block):
            stop = min(order.n, max(hi, lo + self.BLOCK))
            block = self._block = order.positions(torch.arange(lo, stop, dtype=torch.int64))
            start = self._block_start = lo
        return block[lo - start : hi - start].tolist()


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True, algorithm: Optional[str] = None) -> torch.Tensor:
    """The whole global visiting order of one epoch as a tensor (for tests and tools; O(n))."""
    algorithm = algorithm or (FEISTEL if shuffle else SEQUENTIAL)
    return torch.tensor(EpochOrder(algorithm, num_samples, seed, epoch).slice(0, num_samples), dtype=torch.int64)


def batch_seed(*parts: Any) -> int:
    """A 63-bit seed that is a pure function of `parts` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class BatchKey(NamedTuple):
    """What the DataLoader hands a worker for one micro-batch: its sample indices and its seed."""

    indices: tuple[int, ...]
    seed: int


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


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed `random`, torch's CPU generator and NumPy's global one; restore all three afterwards.

    Only the CPU generator is touched (`torch.manual_seed` would also reseed CUDA and so move the
    main process's GPU dropout stream when batches are fetched in the main process).
    """
    np = _numpy()
    saved_py, saved_torch = random.getstate(), torch.get_rng_state()
    saved_np = np.random.get_state() if np is not None else None
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(saved_py)
        torch.set_rng_state(saved_torch)
        if np is not None:
            np.random.set_state(saved_np)


class SeededBatches(Dataset):
    """The dataset as the DataLoader sees it: item `BatchKey` is one whole micro-batch.

    Fetching and collating both happen under the batch's seed, in whichever process fetches it.
    `unbatched` mirrors a DataLoader with `batch_size=None`: each micro-batch is one item, given to
    the collate function alone.
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[Any], Any], unbatched: bool = False) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.unbatched = unbatched

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: BatchKey) -> Any:
        with seeded(key.seed):
            if self.unbatched:
                return self.collate_fn(self.dataset[key.indices[0]])
            getitems = getattr(self.dataset, "__getitems__", None)  # batched fetch, as torch's fetcher does
            items = getitems(list(key.indices)) if getitems else [self.dataset[i] for i in key.indices]
            return self.collate_fn(items)


def _whole_batch(batch: Any) -> Any:
    """The loader's collate function: SeededBatches already collated the micro-batch."""
    return batch


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


def _worker_settings(loader: DataLoader) -> dict[str, Any]:
    """The given DataLoader's process and memory settings, carried over unchanged."""
    settings: dict[str, Any] = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory,
                                "worker_init_fn": loader.worker_init_fn, "timeout": loader.timeout}
    if loader.num_workers > 0:
        settings["persistent_workers"] = loader.persistent_workers
        settings["multiprocessing_context"] = loader.multiprocessing_context
        if loader.prefetch_factor is not None:
            settings["prefetch_factor"] = loader.prefetch_factor
        if getattr(loader, "in_order", True) is False:
            settings["in_order"] = False
    device = getattr(loader, "pin_memory_device", None)
    if loader.pin_memory and device:
        settings["pin_memory_device"] = device
    return settings


def _map_style(data: Any, dataset: Any, what: str) -> int:
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


def _generator() -> torch.Generator:
    """The loader's own generator: creating an iterator draws worker base seeds from it, never from
    the global torch RNG (that would shift dropout masks after a mid-epoch resume)."""
    generator = torch.Generator()
    generator.manual_seed(0)
    return generator


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
        num_samples = _map_style(data, dataset, "train_data")  # before the sampler check: an iterable one has a sampler of its own
        shuffle, drop_last, given = _order_of(data)
        unbatched = given is None
        batch_size = 1 if given is None else given
        collate = data.collate_fn
        settings = _worker_settings(data)
    else:
        num_samples = _map_style(data, dataset, "train_data")
    sampler = ResumableBatchSampler(num_samples, batch_size, seed, rank, world_size, shuffle=shuffle, drop_last=drop_last)
    loader = DataLoader(SeededBatches(dataset, collate, unbatched), batch_size=None, sampler=_KeyedSampler(sampler),
                        collate_fn=_whole_batch, generator=_generator(), **settings)
    return loader, sampler


def build_stream(data: Any, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int = 0,
                 max_epochs: Optional[int] = None) -> tuple[Any, Any]:
    """(stream, layout) for `train_data`: what the training loop pulls batches from, and what it reads
    the batch layout from (`batch_size`, `global_batch`, `layout()`, `use_order()`).

    A map-style Dataset (or DataLoader over one) gets a BatchStream and its ResumableBatchSampler;
    an IterableDataset, a DataLoader over one or torchdata's StatefulDataLoader gets an
    IterableStream (data_iterable.py), which is both. Both streams offer `next()`, `epoch`,
    `cursor`, `last_consumed`, `last_local`, `completed_epochs`, `seek(epoch, cursor, state)` and
    `state_dict()` (this rank's entry in a checkpoint; None for a map-style one).
    """
    from resilient_train import data_iterable

    if data_iterable.is_iterable(data):
        stream = data_iterable.build_iterable_stream(data, batch_size, seed, rank, world_size, num_workers, max_epochs)
        return stream, stream
    loader, sampler = build_loader(data, batch_size, seed, rank, world_size, num_workers)
    return BatchStream(loader, sampler), sampler


def build_eval_loader(data: Any, batch_size: int, rank: int, world_size: int, num_workers: int = 0) -> DataLoader:
    """A sequential, rank-sharded loader for validation (order does not matter, RNG must not move).

    A given DataLoader keeps its batch size, collate_fn, drop_last, workers and pinning; its
    sampler is ignored (validation visits every sample once). Batches are seeded like training
    ones (from their position alone), so validation randomness is the same on every resume.
    """
    dataset, collate, unbatched, drop_last = data, default_collate, False, False
    settings: dict[str, Any] = {"num_workers": num_workers}
    if isinstance(data, DataLoader):
        dataset, collate = data.dataset, data.collate_fn
        unbatched = data.batch_sampler is None
        drop_last = bool(getattr(data.batch_sampler, "drop_last", False))
        batch_size = 1 if unbatched else (getattr(data.batch_sampler, "batch_size", None) or batch_size)
        settings = _worker_settings(data)
    num_samples = _map_style(data, dataset, "val_data")
    shard = list(range(rank, num_samples, world_size))
    chunks = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    keys = [BatchKey(tuple(chunk), batch_seed("val", k, rank)) for k, chunk in enumerate(chunks)]
    return DataLoader(SeededBatches(dataset, collate, unbatched), batch_size=None, sampler=keys,
                      collate_fn=_whole_batch, generator=_generator(), **settings)


class BatchStream:
    """Endless micro-batches across epochs that tracks (epoch, cursor) for checkpoints."""

    def __init__(self, loader: DataLoader, sampler: ResumableBatchSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self.epoch = 0
        self.cursor = 0
        self.last_consumed = 0  # samples (all ranks) the last micro-batch took
        self.last_local = 0  # of which on this rank: the length of the batch `next` returned
        self._iterator: Optional[Iterator[Any]] = None

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

    def next(self) -> Any:
        """The next micro-batch; the cursor advances by one global batch."""
        for _ in range(2):
            if self._iterator is None:
                if self.sampler.consumed(self.cursor) == 0:
                    self.epoch, self.cursor = self.epoch + 1, 0
                self.sampler.set_position(self.epoch, self.cursor)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            self.last_consumed = self.sampler.consumed(self.cursor)
            self.last_local = self.sampler.local_count(self.last_consumed)
            self.cursor += self.last_consumed
            return batch
        raise RuntimeError("the data loader yielded no batch for a whole epoch")  # guarded by the sampler's own check
