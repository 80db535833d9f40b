"""A resume is bit-exact with DataLoader workers, and the given DataLoader's settings are honoured.

Randomness drawn while batches are fetched (random windows in `__getitem__`, as nanoGPT's
`get_batch` draws them, and masking in a collate function) used to depend on which worker fetched a
batch and on how many batches that worker had fetched since the loader started; a resume restarts
the workers and deals batches to other workers, so its weights differed from an uninterrupted run.
Each test here trains in-process with `Trainer.fit`; a resume is a second `fit` on the same run
folder with a higher `max_steps`, which restores the checkpoint the first one committed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from resilient_train import Trainer, UsageError, seed_everything

try:
    import numpy as np
except ImportError:  # the test still covers random and torch
    np = None

N, BATCH = 20, 4  # 5 micro-batches per epoch


class NoisyWindows(Dataset):
    """Sample i: a randomly shifted window of row i plus noise from random, torch and NumPy."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 8, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.roll(self.x[i], random.randrange(8)) + 0.1 * torch.randn(8)
        if np is not None:
            x = x + torch.from_numpy(np.random.standard_normal(8)).float() * 0.1
        return x, self.x[i].sum(dim=0, keepdim=True)


def masking_collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks a random tenth of the inputs, as masking collators do."""
    x = torch.stack([item[0] for item in items])
    y = torch.stack([item[1] for item in items])
    return x * (torch.rand_like(x) > 0.1).float() * (1 + 0.01 * random.random()), y


def _model(batchnorm: bool = False) -> nn.Module:
    seed_everything(0)
    norm: list[nn.Module] = [nn.BatchNorm1d(16)] if batchnorm else []
    return nn.Sequential(nn.Linear(8, 16), *norm, nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))


def _mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _fit(run_dir: Path, data: Any, max_steps: int, model: Optional[nn.Module] = None,
         step: Callable[[nn.Module, Any], torch.Tensor] = _mse, **overrides: Any) -> dict[str, torch.Tensor]:
    """Train (or resume) to `max_steps`; the final weights."""
    model = model if model is not None else _model()
    settings = dict(run_dir=str(run_dir), max_steps=max_steps, batch_size=BATCH, every_n_steps=100,
                    progress_bar=False, accelerator="cpu", devices=1, seed=0)
    trainer = Trainer(**{**settings, **overrides})
    trainer.fit(model, lambda p: torch.optim.SGD(p, lr=0.05), data, training_step=step)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max().item()}"


def _loader(num_workers: int = 2, persistent: bool = False, **kwargs: Any) -> DataLoader:
    extra = {"persistent_workers": persistent} if num_workers else {}
    return DataLoader(NoisyWindows(), batch_size=BATCH, shuffle=True, collate_fn=masking_collate,
                      num_workers=num_workers, **extra, **kwargs)


# -- bit-exact with workers ----------------------------------------------------------------------


@pytest.mark.parametrize("persistent", [False, True])
def test_a_resume_with_workers_equals_an_uninterrupted_run(tmp_path: Path, persistent: bool) -> None:
    straight = _fit(tmp_path / "a", _loader(persistent=persistent), max_steps=8)
    again = _fit(tmp_path / "b", _loader(persistent=persistent), max_steps=8)
    _assert_same(straight, again)
    _fit(tmp_path / "c", _loader(persistent=persistent), max_steps=3)  # stops mid-epoch, odd batch: workers swap
    resumed = _fit(tmp_path / "c", _loader(persistent=persistent), max_steps=8, model=nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1)))  # another init: the checkpoint wins
    _assert_same(straight, resumed)


def test_batches_are_the_same_with_and_without_workers(tmp_path: Path) -> None:
    with_workers = _fit(tmp_path / "a", _loader(num_workers=2), max_steps=7)
    in_process = _fit(tmp_path / "b", _loader(num_workers=0), max_steps=7)
    _assert_same(with_workers, in_process)


def test_a_resume_without_workers_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = _fit(tmp_path / "a", _loader(num_workers=0), max_steps=8)
    _fit(tmp_path / "b", _loader(num_workers=0), max_steps=3)
    _assert_same(straight, _fit(tmp_path / "b", _loader(num_workers=0), max_steps=8))


def test_a_dataset_with_trainer_workers_resumes_exactly(tmp_path: Path) -> None:
    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        return _mse(model, masking_collate(list(zip(*batch))))

    straight = _fit(tmp_path / "a", NoisyWindows(), max_steps=7, step=step, num_workers=2)
    _fit(tmp_path / "b", NoisyWindows(), max_steps=4, step=step, num_workers=2)
    _assert_same(straight, _fit(tmp_path / "b", NoisyWindows(), max_steps=7, step=step, num_workers=2))


def test_a_users_worker_init_fn_still_runs(tmp_path: Path) -> None:
    marker = tmp_path / "workers"
    marker.mkdir()

    def init(worker_id: int) -> None:
        (marker / str(worker_id)).touch()

    _fit(tmp_path / "run", _loader(worker_init_fn=init), max_steps=2)
    assert sorted(p.name for p in marker.iterdir()) == ["0", "1"]


def test_fetching_in_the_main_process_does_not_move_the_training_rng(tmp_path: Path) -> None:
    from resilient_train.data import BatchStream, build_loader

    stream = BatchStream(*build_loader(_loader(num_workers=0), BATCH, seed=0, rank=0, world_size=1))
    torch.manual_seed(7)
    random.seed(7)
    before = (torch.get_rng_state(), random.getstate())
    for _ in range(7):  # crosses an epoch
        stream.next()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


# -- the given DataLoader's settings -------------------------------------------------------------


class Indexed(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((8,), float(i) / self.n), i


def _recording(seen: list[list[int]], batchnorm: bool = False) -> Callable[[nn.Module, Any], torch.Tensor]:
    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        x, index = batch
        seen.append(index.tolist())
        return model(x).square().mean()

    return step


def test_shuffle_false_trains_in_index_order_and_resumes_mid_epoch(tmp_path: Path) -> None:
    data = DataLoader(Indexed(10), batch_size=BATCH, shuffle=False)
    seen: list[list[int]] = []
    _fit(tmp_path / "run", data, max_steps=2, step=_recording(seen))
    _fit(tmp_path / "run", data, max_steps=5, step=_recording(seen))
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3], [4, 5, 6, 7]]
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step-000000005" / "manifest.json").read_text())
    assert (manifest["order"], manifest["drop_last"]) == ("sequential", False)


def test_drop_last_drops_the_tail_of_every_epoch(tmp_path: Path) -> None:
    data = DataLoader(Indexed(10), batch_size=BATCH, shuffle=True, drop_last=True)
    seen: list[list[int]] = []
    _fit(tmp_path / "run", data, max_steps=6, step=_recording(seen))
    assert [len(batch) for batch in seen] == [BATCH] * 6
    assert len({i for batch in seen[:2] for i in batch}) == 8  # each epoch: two full batches, no repeats


def test_batchnorm_with_drop_last_trains_past_a_size_one_tail_and_resumes(tmp_path: Path) -> None:
    data = DataLoader(Indexed(9), batch_size=BATCH, shuffle=True, drop_last=True)  # tail of 1 sample
    seen: list[list[int]] = []
    _fit(tmp_path / "a", data, max_steps=3, model=_model(batchnorm=True), step=_recording(seen))
    straight = _fit(tmp_path / "b", data, max_steps=7, model=_model(batchnorm=True), step=_recording([]))
    resumed = _fit(tmp_path / "a", data, max_steps=7, model=_model(batchnorm=True), step=_recording(seen))
    assert len(seen) == 7 and all(len(batch) == BATCH for batch in seen)
    _assert_same(straight, resumed)


class EvenFirst(torch.utils.data.Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([*range(0, self.n, 2), *range(1, self.n, 2)])

    def __len__(self) -> int:
        return self.n


def test_a_custom_sampler_is_refused_with_one_line(tmp_path: Path) -> None:
    data = DataLoader(Indexed(10), batch_size=BATCH, sampler=EvenFirst(10))
    with pytest.raises(UsageError) as caught:
        _fit(tmp_path / "run", data, max_steps=2, step=_recording([]))
    message = str(caught.value)
    assert "\n" not in message and "EvenFirst" in message and "pass the Dataset" in message
