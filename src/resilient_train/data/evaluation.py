"""The validation loader: sequential, rank-sharded, seeded by position."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from resilient_train.data.map_style import map_style_length
from resilient_train.data.seeding import BatchKey, SeededBatches, batch_seed, loader_generator, whole_batch, worker_settings


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
        settings = worker_settings(data)
    num_samples = map_style_length(data, dataset, "val_data")
    shard = list(range(rank, num_samples, world_size))
    chunks = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    keys = [BatchKey(tuple(chunk), batch_seed("val", k, rank)) for k, chunk in enumerate(chunks)]
    return DataLoader(SeededBatches(dataset, collate, unbatched), batch_size=None, sampler=keys,
                      collate_fn=whole_batch, generator=loader_generator(), **settings)
