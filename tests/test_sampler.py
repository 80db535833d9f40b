"""The resumable sampler: deterministic order, rank sharding, O(1) resume, world-size independence."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, WeightedRandomSampler

from resilient_train.data import BatchStream, ResumableBatchSampler, build_eval_loader, build_loader, epoch_order
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


class _FailsOnce(Dataset):
    """Item 5 raises the first time it is fetched (a flaky read)."""

    def __init__(self, n: int) -> None:
        self.n, self.failed = n, False

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == 5 and not self.failed:
            self.failed = True
            raise OSError("flaky read")
        return i


def test_a_batch_whose_fetch_raised_is_fetched_again_by_the_next_call():
    loader, sampler = build_loader(_FailsOnce(10), 2, seed=0, rank=0, world_size=1)
    stream = BatchStream(loader, sampler)
    order = epoch_order(10, 0, 0).tolist()
    failing = order.index(5) // 2
    for _ in range(failing):
        stream.next()
    with pytest.raises(OSError, match="flaky read"):
        stream.next()
    assert (stream.epoch, stream.cursor) == (0, 2 * failing)  # the failed batch is not counted
    assert stream.next().tolist() == order[2 * failing : 2 * failing + 2]  # the same batch, not a skip to the next epoch
    assert (stream.epoch, stream.cursor) == (0, 2 * failing + 2)


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
    batch = next(iter(loader))  # collated by _pairs
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


# -- the given DataLoader's order, drop_last and sampler --------------------------------------


def _stream_of(loader: DataLoader, seed: int = 0, rank: int = 0, world_size: int = 1) -> BatchStream:
    return BatchStream(*build_loader(loader, batch_size=99, seed=seed, rank=rank, world_size=world_size))


def test_shuffle_false_visits_samples_in_index_order_every_epoch():
    stream = _stream_of(DataLoader(IndexDataset(10), batch_size=4, shuffle=False))
    batches = [stream.next().tolist() for _ in range(6)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2
    assert stream.sampler.layout() == {"order": "sequential", "drop_last": False}


def test_shuffle_false_resumes_mid_epoch_at_the_cursor():
    stream = _stream_of(DataLoader(IndexDataset(10), batch_size=4, shuffle=False))
    stream.seek(0, 4)
    assert stream.next().tolist() == [4, 5, 6, 7]
    assert (stream.epoch, stream.cursor) == (0, 8)


def test_shuffle_true_keeps_the_seeded_random_order():
    stream = _stream_of(DataLoader(IndexDataset(12), batch_size=4, shuffle=True), seed=5)
    assert stream.next().tolist() == epoch_order(12, 5, 0).tolist()[:4]
    assert stream.sampler.layout() == {"order": "feistel-v1", "drop_last": False}


def test_new_runs_use_the_constant_memory_order_and_old_checkpoints_keep_randperm():
    sampler = ResumableBatchSampler(64, 8, seed=3)
    assert sampler.layout()["order"] == "feistel-v1"
    feistel = [i for _, batch in sampler.positions() for i in batch]
    assert sorted(feistel) == list(range(64))
    sampler.use_order(None)  # a checkpoint written before the order was recorded
    assert sampler.layout()["order"] == "randperm-v1"
    old = [i for _, batch in sampler.positions() for i in batch]
    generator = torch.Generator()
    generator.manual_seed(3 * 1_000_003)
    assert old == torch.randperm(64, generator=generator).tolist()  # exactly the order runs had before
    sampler.use_order("feistel-v1")
    assert [i for _, batch in sampler.positions() for i in batch] == feistel


def test_a_resume_at_any_cursor_of_a_huge_epoch_is_cheap():
    sampler = ResumableBatchSampler(2 * 10**9, 512, seed=1)
    sampler.set_position(epoch=3, cursor=1_234_567_936)
    _, batch = next(iter(sampler.positions()))
    assert len(batch) == 512 and len(set(batch)) == 512 and all(0 <= i < 2 * 10**9 for i in batch)


def test_drop_last_drops_the_epochs_tail_on_one_process():
    stream = _stream_of(DataLoader(IndexDataset(10), batch_size=4, shuffle=False, drop_last=True))
    batches = [stream.next().tolist() for _ in range(4)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert stream.sampler.layout()["drop_last"] is True


@pytest.mark.parametrize("drop_last, expected", [(False, [4, 4]), (True, [3, 3])])
def test_drop_last_drops_the_tail_on_every_rank_of_two(drop_last, expected):
    n, b, w = 23, 3, 2  # global batch 6: 3 full global batches and a tail of 5
    per_rank = [list(ResumableBatchSampler(n, b, 0, rank=r, world_size=w, drop_last=drop_last)) for r in range(w)]
    assert [len(batches) for batches in per_rank] == expected
    assert all(len(batch) == b for batches in per_rank for batch in batches[:3])
    lengths = [len(ResumableBatchSampler(n, b, 0, rank=r, world_size=w, drop_last=drop_last)) for r in range(w)]
    assert lengths == expected
    if drop_last:
        assert len(set(_flatten([_flatten(batches) for batches in per_rank]))) == 18


def test_drop_last_cursor_at_the_tail_rolls_into_the_next_epoch():
    sampler = ResumableBatchSampler(10, 4, 0, drop_last=True, shuffle=False)
    assert sampler.consumed(8) == 0
    sampler.set_position(0, 8)
    assert list(sampler) == [] and len(sampler) == 0


def test_an_explicit_batch_sampler_over_a_torch_sampler_is_honoured():
    given = BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=True)
    stream = _stream_of(DataLoader(IndexDataset(10), batch_sampler=given))
    assert [stream.next().tolist() for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]


def test_a_dataloader_without_batching_yields_one_item_per_micro_batch():
    stream = _stream_of(DataLoader(IndexDataset(5), batch_size=None, shuffle=False))
    assert [int(stream.next()) for _ in range(6)] == [0, 1, 2, 3, 4, 0]


class EvenFirst(torch.utils.data.Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([*range(0, self.n, 2), *range(1, self.n, 2)])

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=2, sampler=EvenFirst(len(ds))),
    lambda ds: DataLoader(ds, batch_sampler=BatchSampler(EvenFirst(len(ds)), 2, False)),
    lambda ds: DataLoader(ds, batch_sampler=[[0, 1], [2, 3]]),
    lambda ds: DataLoader(ds, batch_size=2, sampler=WeightedRandomSampler([1.0] * len(ds), len(ds))),
    lambda ds: DataLoader(ds, batch_size=2, sampler=RandomSampler(ds, replacement=True)),
])
def test_a_custom_sampler_is_refused_in_one_line_saying_what_to_do(make):
    with pytest.raises(UsageError) as caught:
        build_loader(make(IndexDataset(8)), batch_size=2, seed=0, rank=0, world_size=1)
    message = str(caught.value)
    assert "\n" not in message and "sampler" in message and "pass the Dataset" in message


# -- per-batch seeds -----------------------------------------------------------------------------


def test_batch_seeds_depend_on_seed_epoch_position_and_rank_only():
    def seeds(seed=0, epoch=0, cursor=0, rank=0, world_size=2):
        sampler = ResumableBatchSampler(24, 2, seed, rank=rank, world_size=world_size)
        sampler.set_position(epoch, cursor)
        return [key.seed for key in sampler.keys()]

    full = seeds()
    assert len(set(full)) == len(full)
    assert seeds(cursor=8) == full[2:]  # a resume mid-epoch sees the same seeds
    assert seeds(rank=1) != full and seeds(epoch=1) != full and seeds(seed=1) != full


# -- the validation loader -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")  # no accelerator here: pinning is a no-op
def test_eval_loader_keeps_the_given_loaders_workers_pinning_and_collate_fn():
    given = DataLoader(IndexDataset(10), batch_size=4, collate_fn=_pairs, num_workers=2, pin_memory=True,
                       persistent_workers=True, prefetch_factor=3)
    loader = build_eval_loader(given, batch_size=99, rank=0, world_size=1)
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers, loader.prefetch_factor) == (2, True, True, 3)
    batches = [batch["index"].tolist() for batch in loader]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_eval_loader_shards_by_rank_and_does_not_move_the_global_rng():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loader = build_eval_loader(IndexDataset(10), batch_size=2, rank=1, world_size=2)
    assert [batch.tolist() for batch in loader] == [[1, 3], [5, 7], [9]]
    assert torch.equal(torch.get_rng_state(), before)
