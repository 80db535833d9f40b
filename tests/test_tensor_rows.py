"""A TensorDataset's micro-batch is gathered in one op per tensor, and is the batch the per-sample
fetch and `default_collate` give: the same bits, dtype, shape, strides and container, or not
gathered at all (a subclass, a custom collate, a tensor that is not plain, a DataLoader worker).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from torch.utils.data._utils.collate import default_collate_fn_map

from resilient_train import Trainer, seed_everything
from resilient_train.data import tensor_rows
from resilient_train.data.seeding import BatchKey, SeededBatches

N = 40
INDICES = (7, 0, 39, 7, 12, 3)  # unordered, a repeat, both ends


def _bits(tensor: torch.Tensor) -> bytes:
    """The raw bytes: NaN, -0.0 and every dtype compare exactly."""
    return bytes(tensor.flatten().view(torch.uint8).tolist())


def _assert_same_batch(got: Any, want: Any) -> None:
    assert type(got) is type(want) and len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.dtype, g.shape, g.stride(), g.device) == (w.dtype, w.shape, w.stride(), w.device)
        assert _bits(g) == _bits(w)


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)
    values = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    flat = values.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")], dtype=torch.float64).to(dtype)
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                                   torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(N,), (N, 3), (N, 2, 3, 4)])
def test_a_gathered_batch_is_the_per_sample_batch_bit_for_bit(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    dataset = TensorDataset(_tensor(dtype, shape), torch.arange(N))
    got = tensor_rows.gathered(dataset, default_collate, INDICES)
    assert got is not None
    _assert_same_batch(got, default_collate([dataset[i] for i in INDICES]))


def test_one_tensor_and_one_sample_are_gathered_as_default_collate_gives_them() -> None:
    dataset = TensorDataset(torch.randn(N, 5))
    for indices in ((3,), INDICES):
        got = tensor_rows.gathered(dataset, default_collate, indices)
        assert got is not None
        _assert_same_batch(got, default_collate([dataset[i] for i in indices]))


class _Rows(TensorDataset):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(tensor[index] * 2 for tensor in self.tensors)


class _Marked(torch.Tensor):
    pass


@pytest.mark.parametrize("case", ["subclass", "custom collate", "transposed", "needs grad", "tensor subclass", "no indices"])
def test_anything_but_a_plain_tensor_dataset_is_fetched_sample_by_sample(case: str) -> None:
    x = torch.randn(N, 4)
    dataset: Any = TensorDataset(x)
    collate: Any = default_collate
    indices: tuple[int, ...] = INDICES
    if case == "subclass":
        dataset = _Rows(x)
    elif case == "custom collate":
        collate = lambda items: default_collate(items)  # noqa: E731 - equal, but not known to be
    elif case == "transposed":
        dataset = TensorDataset(torch.randn(4, N).t())
    elif case == "needs grad":
        dataset = TensorDataset(x.clone().requires_grad_())
    elif case == "tensor subclass":
        dataset = TensorDataset(x.as_subclass(_Marked))
    else:
        indices = ()
    assert tensor_rows.gathered(dataset, collate, indices) is None


class _GatheredHere(Dataset):
    """One item: whether a TensorDataset batch would be gathered in the process that fetches it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> bool:
        return tensor_rows.gathered(TensorDataset(torch.zeros(3, 1)), default_collate, (0, 2)) is not None


def test_a_dataloader_worker_fetches_sample_by_sample_and_gets_the_same_batch() -> None:
    assert _GatheredHere()[0] is True
    assert list(DataLoader(_GatheredHere(), batch_size=None, num_workers=1)) == [False]
    dataset = TensorDataset(torch.randn(N, 4), torch.arange(N))
    keys = [BatchKey(INDICES, 5), BatchKey((1, 2), 6)]
    batches = SeededBatches(dataset, default_collate)
    in_process = [batches[key] for key in keys]
    loader = DataLoader(batches, batch_size=None, sampler=keys, collate_fn=lambda batch: batch, num_workers=1)
    for got, want in zip(loader, in_process):
        _assert_same_batch(got, want)


class _Drawing(Dataset):
    """A dataset of the user's own whose fetch draws from torch's generator."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(1)


def test_a_gathered_batch_is_fetched_without_seeding_and_leaves_every_stream_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    """No code of the user's runs in a gather, so there is no stream to seed: skipping the seeding
    (~30 us a step) changes neither the batch nor any RNG state. A dataset of one's own is still
    fetched under the batch's seed."""
    import random

    seeds: list[int] = []

    class Watched:  # torch's own generator, its seeding recorded
        def __init__(self, generator: torch.Generator) -> None:
            self.generator = generator

        def manual_seed(self, seed: int) -> torch.Generator:
            seeds.append(seed)
            return self.generator.manual_seed(seed)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.generator, name)

    monkeypatch.setattr(torch, "default_generator", Watched(torch.default_generator))
    dataset = TensorDataset(torch.randn(N, 4), torch.arange(N))
    before = (torch.get_rng_state(), random.getstate())
    got = SeededBatches(dataset, default_collate)[BatchKey(INDICES, 5)]
    _assert_same_batch(got, default_collate([dataset[i] for i in INDICES]))
    assert seeds == [] and torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    drawn = SeededBatches(_Drawing(), default_collate)[BatchKey(INDICES, 5)]
    assert seeds == [5] and torch.equal(drawn, SeededBatches(_Drawing(), default_collate)[BatchKey(INDICES, 5)])


def test_under_a_torch_mode_a_batch_is_fetched_sample_by_sample_and_seeded() -> None:
    """A TorchFunctionMode runs code of its own around every op (here it adds noise drawn from
    torch's generator to each stack): the batch then takes the per-sample road, fetched under its
    key's seed, so it is the same whatever the state of the process's own stream."""
    from torch.overrides import TorchFunctionMode

    class Jitter(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            return out + torch.rand(out.shape) if func is torch.stack and out.is_floating_point() else out

    dataset = TensorDataset(torch.randn(N, 4), torch.arange(N))
    batches = SeededBatches(dataset, default_collate)
    fetched = []
    for stream_seed in (1, 2):
        torch.manual_seed(stream_seed)
        with Jitter():
            assert tensor_rows.gathered(dataset, default_collate, INDICES) is None
            fetched.append(batches[BatchKey(INDICES, 5)])
    _assert_same_batch(fetched[0], fetched[1])
    assert not torch.equal(fetched[0][0], default_collate([dataset[i] for i in INDICES])[0])  # the mode did run


@pytest.fixture
def collate_map() -> Any:
    """torch's `default_collate_fn_map`, put back as it was after the test changes it."""
    saved = dict(default_collate_fn_map)
    yield default_collate_fn_map
    default_collate_fn_map.clear()
    default_collate_fn_map.update(saved)


@pytest.mark.parametrize("registered", ["tensors", "tuples", "sequences"])
def test_a_default_collate_extended_through_its_map_is_followed_not_gathered(collate_map: Any, registered: str) -> None:
    def halves(batch: Any, *, collate_fn_map: Any = None) -> Any:
        return torch.stack(batch).half()

    def firsts(batch: Any, *, collate_fn_map: Any = None) -> Any:
        return torch.stack([item[0] for item in batch])

    kind: Any = {"tensors": torch.Tensor, "tuples": tuple, "sequences": Sequence}[registered]
    collate_map[kind] = halves if registered == "tensors" else firsts
    dataset = TensorDataset(torch.randn(N, 3), torch.arange(N))
    assert tensor_rows.gathered(dataset, default_collate, INDICES) is None
    batches = SeededBatches(dataset, default_collate)
    want = default_collate([dataset[i] for i in INDICES])
    got = batches[BatchKey(INDICES, 5)]
    assert type(got) is type(want)
    assert torch.equal(got[0] if registered == "tensors" else got, want[0] if registered == "tensors" else want)


def test_a_default_device_set_by_the_task_does_not_move_the_gather() -> None:
    dataset = TensorDataset(torch.arange(N, dtype=torch.float32), torch.arange(N))
    want = default_collate([dataset[i] for i in INDICES])
    torch.set_default_device("meta")  # any device but the tensors' own; meta needs no GPU
    try:
        got = tensor_rows.gathered(dataset, default_collate, INDICES)
    finally:
        torch.set_default_device(None)
    assert got is not None
    _assert_same_batch(got, want)


def _fit(run_dir: Path, dataset: Any, max_steps: int) -> dict[str, torch.Tensor]:
    seed_everything(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))
    trainer = Trainer(run_dir=str(run_dir), max_steps=max_steps, batch_size=6, every_n_steps=100, progress_bar=False,
                      accelerator="cpu", devices=1, seed=0)
    trainer.fit(model, lambda p: torch.optim.SGD(p, lr=0.05), dataset,
                training_step=lambda m, batch: nn.functional.mse_loss(m(batch[0]), batch[1]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _SameRows(TensorDataset):
    """A TensorDataset that is not gathered: it takes the per-sample road to the same batches."""


def test_a_run_and_its_resume_over_a_tensor_dataset_train_what_the_per_sample_fetch_trains(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    per_sample = _fit(tmp_path / "a", _SameRows(x, y), max_steps=9)  # 9 steps of 6 over 40 samples: two epochs
    gathered = _fit(tmp_path / "b", TensorDataset(x, y), max_steps=9)
    _fit(tmp_path / "c", TensorDataset(x, y), max_steps=4)
    resumed = _fit(tmp_path / "c", TensorDataset(x, y), max_steps=9)
    _fit(tmp_path / "d", _SameRows(x, y), max_steps=4)  # a checkpoint written sample by sample (before gathering)...
    resumed_across = _fit(tmp_path / "d", TensorDataset(x, y), max_steps=9)  # ...resumed gathering
    for key in per_sample:
        assert torch.equal(per_sample[key], gathered[key]), key
        assert torch.equal(per_sample[key], resumed[key]), key
        assert torch.equal(per_sample[key], resumed_across[key]), key
