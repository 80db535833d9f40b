"""The resumable sampler: deterministic order, rank sharding, O(1) resume, world-size independence."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from resilient_train.data import BatchStream, ResumableBatchSampler, build_loader, epoch_order
from resilient_train.errors import UsageError


class IndexDataset(Dataset):
    """Sample i is the integer i, so batches show exactly which samples they hold."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(10)


def _flatten(batches):
    return [i for batch in batches for i in batch]


def _global_batches(n: int, batch_size: int, world_size: int, seed: int, epoch: int = 0, cursor: int = 0):
    """Per global batch, the concatenation of every rank's micro-batch in rank order."""
    per_rank = []
    for rank in range(world_size):
        sampler = ResumableBatchSampler(n, batch_size, seed, rank=rank, world_size=world_size)
        sampler.set_position(epoch, cursor)
        per_rank.append(list(sampler))
    return [_flatten(parts) for parts in zip(*per_rank)]


# -- epoch_order ---------------------------------------------------------------------------------


def test_epoch_order_is_a_permutation():
    order = epoch_order(50, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(50))


def test_epoch_order_is_deterministic_per_seed_and_epoch():
    assert torch.equal(epoch_order(100, seed=7, epoch=2), epoch_order(100, seed=7, epoch=2))


def test_epoch_order_differs_across_epochs_and_seeds():
    assert not torch.equal(epoch_order(100, seed=7, epoch=0), epoch_order(100, seed=7, epoch=1))
    assert not torch.equal(epoch_order(100, seed=7, epoch=0), epoch_order(100, seed=8, epoch=0))


def test_epoch_order_does_not_touch_the_global_rng():
    before = torch.get_rng_state()
    epoch_order(100, seed=1, epoch=0)
    assert torch.equal(torch.get_rng_state(), before)


# -- ResumableBatchSampler -----------------------------------------------------------------------


def test_rank_shards_of_a_global_batch_are_disjoint_and_cover_the_global_slice():
    n, b, w, seed = 36, 3, 4, 11  # 3 full global batches of 12, no tail
    order = epoch_order(n, seed, 0).tolist()
    per_rank = [list(ResumableBatchSampler(n, b, seed, rank=r, world_size=w)) for r in range(w)]
    assert all(len(batches) == n // (b * w) for batches in per_rank)
    for k, parts in enumerate(zip(*per_rank)):
        assert all(len(part) == b for part in parts)
        flat = _flatten(parts)
        assert len(set(flat)) == len(flat), "ranks overlap within a global batch"
        assert flat == order[k * b * w : (k + 1) * b * w]


def test_one_epoch_visits_each_sample_exactly_once_including_the_tail():
    seen = _flatten(_global_batches(37, 4, 2, seed=0))
    assert sorted(seen) == list(range(37))


def test_resuming_at_a_cursor_yields_exactly_the_remaining_batches():
    n, b, w, seed = 64, 4, 2, 5
    for rank in range(w):
        full = list(ResumableBatchSampler(n, b, seed, rank=rank, world_size=w))
        for consumed in range(len(full) + 1):
            resumed = ResumableBatchSampler(n, b, seed, rank=rank, world_size=w)
            resumed.set_position(0, consumed * b * w)
            assert list(resumed) == full[consumed:]
            assert len(resumed) == len(full) - consumed


def test_resuming_in_a_later_epoch_uses_that_epochs_order():
    sampler = ResumableBatchSampler(20, 5, seed=2)
    sampler.set_position(3, 5)
    order = epoch_order(20, 2, 3).tolist()
    assert _flatten(list(sampler)) == order[5:20]


def test_order_does_not_depend_on_world_size():
    n, seed = 48, 9
    one = _global_batches(n, batch_size=4, world_size=1, seed=seed)
    two = _global_batches(n, batch_size=2, world_size=2, seed=seed)
    four = _global_batches(n, batch_size=1, world_size=4, seed=seed)
    assert one == two == four


def test_resume_on_another_world_size_sees_the_rest_of_the_epoch_exactly_once():
    n, seed = 48, 4
    full = _flatten(_global_batches(n, batch_size=4, world_size=1, seed=seed))
    before = full[:16]  # 4 global batches of 4 on one process
    after = _flatten(_global_batches(n, batch_size=2, world_size=2, seed=seed, cursor=16))
    assert before + after == full


def test_trailing_partial_global_batch_is_split_across_ranks():
    n, b, w = 23, 3, 2  # global batch 6: 3 full global batches, 5 samples left over
    per_rank = [list(ResumableBatchSampler(n, b, 0, rank=r, world_size=w)) for r in range(w)]
    assert [len(batches) for batches in per_rank] == [4, 4]
    assert [len(batches[-1]) for batches in per_rank] == [3, 2]  # earlier ranks take the extra one
    assert sorted(_flatten([_flatten(batches) for batches in per_rank])) == list(range(n))
    assert len(ResumableBatchSampler(n, b, 0, rank=0, world_size=w)) == 4


def test_a_tail_smaller_than_the_world_size_is_dropped():
    n, b, w = 25, 4, 3  # global batch 12: 2 full, 1 sample left for 3 ranks
    per_rank = [list(ResumableBatchSampler(n, b, 0, rank=r, world_size=w)) for r in range(w)]
    assert [len(batches) for batches in per_rank] == [2, 2, 2]


def test_dataset_smaller_than_a_global_batch_is_a_usage_error():
    with pytest.raises(UsageError, match="batch_size"):
        ResumableBatchSampler(7, 4, seed=0, rank=0, world_size=2)


def test_dataset_exactly_one_global_batch_is_accepted():
    sampler = ResumableBatchSampler(8, 4, seed=0, rank=1, world_size=2)
    assert len(list(sampler)) == 1


# -- BatchStream ---------------------------------------------------------------------------------


def _stream(n: int, batch_size: int, seed: int = 0) -> BatchStream:
    loader, sampler = build_loader(IndexDataset(n), batch_size, seed, rank=0, world_size=1)
    return BatchStream(loader, sampler)


def test_batch_stream_crosses_epochs_and_tracks_epoch_and_cursor():
    n, b, seed = 10, 3, 1  # 3 full batches and a tail of 1 per epoch
    stream = _stream(n, b, seed)
    positions, batches = [], []
    for _ in range(9):
        batches.append(stream.next().tolist())
        positions.append((stream.epoch, stream.cursor))
    assert positions == [(0, 3), (0, 6), (0, 9), (0, 10), (1, 3), (1, 6), (1, 9), (1, 10), (2, 3)]
    order0, order1, order2 = (epoch_order(n, seed, e).tolist() for e in range(3))
    assert _flatten(batches[:4]) == order0
    assert _flatten(batches[4:8]) == order1
    assert batches[8] == order2[:3]


def test_batch_stream_seek_resumes_at_exactly_the_same_next_batch():
    n, b = 20, 4
    reference = _stream(n, b, seed=3)
    expected, positions = [], []
    for _ in range(12):
        positions.append((reference.epoch, reference.cursor))
        expected.append(reference.next().tolist())
    for k in (0, 3, 4, 5, 9):
        resumed = _stream(n, b, seed=3)
        resumed.seek(*positions[k])
        got = [resumed.next().tolist() for _ in range(12 - k)]
        assert got == expected[k:]


def test_batch_stream_seek_at_the_end_of_an_epoch_continues_with_the_next_epoch():
    stream = _stream(10, 3, seed=2)
    stream.seek(0, 10)  # the epoch is used up
    batch = stream.next().tolist()
    assert batch == epoch_order(10, 2, 1).tolist()[:3]
    assert (stream.epoch, stream.cursor) == (1, 3)


# -- build_loader --------------------------------------------------------------------------------


def _pairs(batch):
    return {"index": torch.tensor(batch), "double": torch.tensor(batch) * 2}


def test_build_loader_keeps_a_dataloaders_batch_size_and_collate_fn():
    user_loader = DataLoader(IndexDataset(30), batch_size=5, collate_fn=_pairs, shuffle=True)
    loader, sampler = build_loader(user_loader, batch_size=99, seed=0, rank=0, world_size=1)
    assert sampler.batch_size == 5
    assert loader.collate_fn is _pairs
    batch = next(iter(loader))
    assert set(batch) == {"index", "double"}
    assert batch["index"].tolist() == epoch_order(30, 0, 0).tolist()[:5]
    assert torch.equal(batch["double"], batch["index"] * 2)


def test_build_loader_over_a_dataset_uses_the_given_batch_size():
    loader, sampler = build_loader(IndexDataset(30), batch_size=6, seed=4, rank=1, world_size=2)
    assert sampler.batch_size == 6
    assert (sampler.rank, sampler.world_size) == (1, 2)
    assert next(iter(loader)).tolist() == epoch_order(30, 4, 0).tolist()[6:12]


def test_creating_a_loader_iterator_does_not_consume_the_global_torch_rng():
    loader, _ = build_loader(IndexDataset(16), batch_size=4, seed=0, rank=0, world_size=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    iterator = iter(loader)
    next(iterator)
    assert torch.equal(torch.get_rng_state(), before)


def test_batch_stream_epoch_rollover_does_not_consume_the_global_torch_rng():
    stream = _stream(8, 4)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    for _ in range(5):  # crosses two epoch boundaries, creating a new iterator each time
        stream.next()
    assert torch.equal(torch.get_rng_state(), before)


def test_iterable_dataset_is_a_usage_error():
    with pytest.raises(UsageError, match="IterableDataset"):
        build_loader(Stream(), batch_size=2, seed=0, rank=0, world_size=1)


def test_dataloader_over_an_iterable_dataset_is_a_usage_error():
    with pytest.raises(UsageError, match="IterableDataset"):
        build_loader(DataLoader(Stream(), batch_size=2), batch_size=2, seed=0, rank=0, world_size=1)


def test_build_loader_with_too_small_a_dataset_is_a_usage_error():
    with pytest.raises(UsageError):
        build_loader(IndexDataset(3), batch_size=4, seed=0, rank=0, world_size=1)
