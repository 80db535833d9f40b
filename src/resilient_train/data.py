"""The resumable sampler: a global sample cursor and a world-size-independent order.

Epoch `e` visits the dataset in `randperm(n)` drawn from a generator seeded by (seed, e). Global
micro-batch `k` of the epoch is `order[k*B*W : (k+1)*B*W]` (B per-device batch, W world size) and
rank `r` takes its `r`-th slice of `B`. Resuming at global cursor `c` (samples consumed in the epoch
by all ranks together) starts at `order[c:]` in O(1): nothing is iterated to skip. Because the cursor
is global and the order does not depend on W, a resume on another world size sees every sample of
the interrupted epoch exactly once. The tail that does not fill a global batch is split evenly
across the ranks as one smaller batch (dropped only when there are fewer samples than ranks), so
no sample is skipped whatever the world size.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from resilient_train.errors import UsageError


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global visiting order of one epoch (a pure function of seed and epoch)."""
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_samples, generator=generator)


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of one epoch, starting at a global cursor."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
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

    def set_position(self, epoch: int, cursor: int) -> None:
        """Start the next iteration at sample `cursor` of epoch `epoch` (cursor counts all ranks)."""
        self.epoch, self.cursor = epoch, cursor

    def consumed(self, cursor: int) -> int:
        """Samples (all ranks together) the global batch starting at `cursor` takes: the tail is smaller."""
        left = self.num_samples - cursor
        if left >= self.global_batch:
            return self.global_batch
        return left if left >= self.world_size else 0

    def __len__(self) -> int:
        left = self.num_samples - self.cursor
        return max(0, left // self.global_batch) + (1 if left % self.global_batch >= self.world_size else 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.num_samples, self.seed, self.epoch)
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
            yield order[lo:hi].tolist()
            start += take


def build_loader(
    data: Any, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int = 0
) -> tuple[DataLoader, ResumableBatchSampler]:
    """A DataLoader over `data` driven by a ResumableBatchSampler.

    A given DataLoader keeps its dataset, collate_fn, workers and memory pinning; its own batch
    size wins over the config's. The loader gets its own `generator` so that creating an iterator
    (which draws worker seeds) never consumes the global torch RNG: that would shift dropout masks
    after a mid-epoch resume and break bit-exactness.
    """
    kwargs: dict[str, Any] = {"num_workers": num_workers}
    dataset = data
    if isinstance(data, DataLoader):
        dataset = data.dataset
        batch_size = data.batch_size or (data.batch_sampler.batch_size if hasattr(data.batch_sampler, "batch_size") else batch_size)
        kwargs = {
            "num_workers": data.num_workers,
            "collate_fn": data.collate_fn,
            "pin_memory": data.pin_memory,
            "worker_init_fn": data.worker_init_fn,
            "persistent_workers": data.persistent_workers if data.num_workers > 0 else False,
        }
        if data.num_workers > 0 and data.prefetch_factor is not None:
            kwargs["prefetch_factor"] = data.prefetch_factor
    if isinstance(dataset, IterableDataset):
        raise UsageError("train_data is an IterableDataset; give a map-style Dataset (with __len__ and __getitem__) so the trainer can resume at an exact sample")
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise UsageError(f"train_data must be a torch Dataset or DataLoader, got {type(data).__name__}")
    try:
        num_samples = len(dataset)
    except TypeError:
        raise UsageError("train_data has no length; give a map-style Dataset with __len__") from None
    sampler = ResumableBatchSampler(num_samples, batch_size, seed, rank, world_size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(dataset, batch_sampler=sampler, generator=generator, **kwargs)
    return loader, sampler


def build_eval_loader(data: Any, batch_size: int, rank: int, world_size: int) -> DataLoader:
    """A sequential, rank-sharded loader for validation (order does not matter, RNG must not move)."""
    if isinstance(data, DataLoader):
        dataset, batch_size, collate = data.dataset, data.batch_size or batch_size, data.collate_fn
    else:
        dataset, collate = data, None
    indices = list(range(rank, len(dataset), world_size))
    generator = torch.Generator()
    generator.manual_seed(0)
    kwargs: dict[str, Any] = {"collate_fn": collate} if collate is not None else {}
    return DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False, generator=generator, **kwargs)


class BatchStream:
    """Endless micro-batches across epochs that tracks (epoch, cursor) for checkpoints."""

    def __init__(self, loader: DataLoader, sampler: ResumableBatchSampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self.epoch = 0
        self.cursor = 0
        self.last_consumed = 0  # samples (all ranks) the last micro-batch took
        self._iterator: Optional[Iterator[Any]] = None

    def seek(self, epoch: int, cursor: int) -> None:
        self.epoch, self.cursor = epoch, cursor
        self._iterator = None

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
            self.cursor += self.last_consumed
            return batch
        raise RuntimeError("the data loader yielded no batch for a whole epoch")  # guarded by the sampler's own check
