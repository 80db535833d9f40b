"""The device micro-batch follows the GPU at hand, and the samples stay the same (issue 12).

`trainer.micro_batch_size=N` puts each loaded batch through the model in chunks of N;
`auto` halves the chunk whenever a step runs out of memory and retries the step from its start.
The tiny task raises torch.OutOfMemoryError (what CUDA raises) above a chunk size, after its
forward pass, so a retry that did not put the RNG back or drop the failed attempt's gradients
would end with other weights than a run that used the small chunk from the start.
"""

from __future__ import annotations

import json
import os
import signal
from collections import UserDict, namedtuple
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASK, committed_steps_on_disk, error_lines, run_cli, run_cli_fast, start_cli, wait_for
from helpers import run_cli_inprocess
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from resilient_train import Trainer, seed_everything
from resilient_train.config import TrainerConfig
from resilient_train.errors import ConfigError, UsageError
from resilient_train.microbatch import split_batch

BASE = ["trainer.max_steps=12", "trainer.batch_size=8", "trainer.accumulate_grad_batches=2",
        "checkpoint.every_n_steps=4", "checkpoint.keep_last=null", "trainer.log_every_n_steps=4"]


def _run(tmp_path: Path, name: str, *extra: str, check_exit: int = 0) -> Path:
    run_dir = tmp_path / name
    proc = run_cli_fast("run", TINY_TASK, "--run-dir", str(run_dir), *BASE, *extra)
    assert proc.returncode == check_exit, proc.stderr[-3000:]
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = run_dir.parent / f"{run_dir.name}.safetensors"
    run_cli_inprocess("export", str(run_dir), str(out), check=True)
    return load_file(str(out))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- splitting a batch -----------------------------------------------------------------------------

def test_a_batch_splits_along_dimension_0_keeping_its_structure() -> None:
    Pair = namedtuple("Pair", "x y")

    class Encoding(UserDict):  # a BatchEncoding-like mapping, rebuilt from a dict
        pass

    batch = {"pair": Pair(torch.arange(10), torch.arange(10) * 2), "enc": Encoding({"ids": torch.ones(10, 3)}),
             "names": [f"s{i}" for i in range(10)], "scale": torch.tensor(2.0), "tag": "train"}
    chunks = split_batch(batch, 10, 4)
    assert [count for _, count in chunks] == [4, 4, 2]
    first, last = chunks[0][0], chunks[-1][0]
    assert isinstance(first["pair"], Pair) and first["pair"].y.tolist() == [0, 2, 4, 6]
    assert isinstance(first["enc"], Encoding) and first["enc"]["ids"].shape == (4, 3)
    assert last["names"] == ["s8", "s9"] and last["tag"] == "train" and last["scale"] is batch["scale"]
    assert torch.cat([c["pair"].x for c, _ in chunks]).tolist() == list(range(10))
    assert split_batch(batch, 10, 16) == [(batch, 10)]


def test_per_sample_lists_are_cut_by_sample_not_by_their_tensors_first_dimension() -> None:
    """A detection batch: images of 3 channels and one target dict per sample (4 samples)."""
    images = tuple(torch.full((3, 8, 8), float(i)) for i in range(4))
    targets = tuple({"boxes": torch.zeros(i + 1, 4)} for i in range(4))
    chunks = split_batch((images, targets), 4, 2)
    assert [count for _, count in chunks] == [2, 2]
    (imgs, tgts), _ = chunks[1]
    assert [int(img[0, 0, 0]) for img in imgs] == [2, 3] and [len(t["boxes"]) for t in tgts] == [3, 4]


def test_a_batch_without_the_sample_dimension_cannot_be_split_and_says_why() -> None:
    with pytest.raises(UsageError, match="cannot be split"):
        split_batch({"text": "a b c", "x": torch.zeros(3, 5)}, 4, 2)


def test_an_auto_retry_puts_batchnorm_statistics_back_and_matches_the_small_chunk_from_the_start(tmp_path: Path) -> None:
    """The chunk before the OOM already moved BatchNorm's running statistics: a retry restores them."""
    def fit(name: str, setting: object) -> nn.Module:
        seed_everything(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 1))
        calls = [0]

        def step(model: nn.Module, batch) -> torch.Tensor:
            calls[0] += 1
            x, y = batch
            out = model(x)
            if len(x) > 2 and calls[0] % 2 == 0:  # the second chunk of a step runs out of memory
                raise torch.OutOfMemoryError("simulated")
            return nn.functional.mse_loss(out, y)

        g = torch.Generator().manual_seed(3)
        x = torch.randn(64, 4, generator=g)
        # two batches per step: the first goes through whole, the second fails, so the retry must undo the first
        trainer = Trainer(run_dir=str(tmp_path / name), max_steps=6, batch_size=8, accumulate_grad_batches=2, every_n_steps=3,
                          progress_bar=False, accelerator="cpu", devices=1, micro_batch_size=setting)
        trainer.fit(model, lambda p: torch.optim.SGD(p, lr=0.1), TensorDataset(x, x.sum(1, keepdim=True)), training_step=step)
        return model

    auto, small = fit("auto", "auto"), fit("small", 2)
    for (key, a), b in zip(auto.state_dict().items(), small.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("value", [0, -2, "half", 1.5, True])
def test_a_micro_batch_size_that_is_not_a_size_is_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="trainer.micro_batch_size"):
        TrainerConfig(micro_batch_size=value)
    assert TrainerConfig(micro_batch_size="AUTO").micro_batch_size == "auto"


# -- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fixed_chunks_see_the_same_samples_in_the_same_order(tmp_path: Path) -> None:
    whole = tmp_path / "whole.log"
    _run(tmp_path, "whole", f"task.order_log={whole}")
    chunked = tmp_path / "chunked.log"
    _run(tmp_path, "chunked", "trainer.micro_batch_size=3", f"task.order_log={chunked}")
    samples = [line.split() for line in whole.read_text().splitlines()]
    chunks = [line.split() for line in chunked.read_text().splitlines()]
    assert [len(c) for c in chunks[:3]] == [3, 3, 2]  # 8 samples in chunks of 3
    regrouped, i = [], 0
    for batch in samples:
        got: list[str] = []
        while len(got) < len(batch):
            got += chunks[i]
            i += 1
        regrouped.append(got)
    assert regrouped == samples and i == len(chunks)


@pytest.mark.slow
def test_uneven_chunks_weigh_by_their_share_and_train_like_the_whole_batch(tmp_path: Path) -> None:
    """Without dropout, chunks of 3+3+2 give the gradient of the batch of 8 up to rounding."""
    whole = _weights(_run(tmp_path, "whole", "task.dropout=0"))
    chunked = _weights(_run(tmp_path, "chunked", "task.dropout=0", "trainer.micro_batch_size=3"))
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert torch.allclose(whole[key], chunked[key], rtol=1e-4, atol=1e-6), key
    halved = _weights(_run(tmp_path, "halved", "task.dropout=0", "trainer.micro_batch_size=3", "task.lr=0.005"))
    assert any(not torch.allclose(whole[k], halved[k], rtol=1e-4, atol=1e-6) for k in whole)  # the check can tell


@pytest.mark.slow
def test_auto_shrinks_on_out_of_memory_and_ends_bit_identical_to_the_small_chunk_from_the_start(tmp_path: Path) -> None:
    small = _weights(_run(tmp_path, "small", "trainer.micro_batch_size=2"))
    # OOM above 2 samples on every second call: the first chunk of a step has already put its
    # gradients in place when the second one fails, and dropout has drawn its masks
    run_dir = tmp_path / "auto"
    proc = run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run_dir), *BASE, "trainer.micro_batch_size=auto",
                   "task.oom_above=2", "task.oom_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retrying the step with 4" in proc.stderr and "retrying the step with 2" in proc.stderr
    assert json.loads((run_dir / "micro_batch.json").read_text()) == {"cpu": 2}
    assert _same(_weights(run_dir), small)


@pytest.mark.slow
def test_a_resumed_session_starts_at_the_size_found_on_this_device(tmp_path: Path) -> None:
    small = _weights(_run(tmp_path, "small", "trainer.micro_batch_size=2", "trainer.max_steps=24"))
    run_dir = tmp_path / "auto"
    args = ["run", TINY_TASK, "--run-dir", str(run_dir), *BASE, "trainer.max_steps=24", "trainer.micro_batch_size=auto",
            "task.oom_above=2", "task.sleep=0.03"]
    proc = start_cli(*args)
    wait_for(lambda: proc.poll() is not None or committed_steps_on_disk(run_dir))
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    resumed = run_cli_inprocess("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "device micro-batch 2 (found on cpu by an earlier session)" in resumed.stderr
    assert "out of memory" not in resumed.stderr  # no failed attempt: it started at the size that fits
    assert "sample-exact" in resumed.stderr  # auto: the split follows free memory, so no bit-exact promise
    assert _same(_weights(run_dir), small)


def test_auto_under_ddp_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = run_cli("run", TINY_TASK, "--run-dir", str(tmp_path / "run"), "trainer.micro_batch_size=auto",
                   "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(error_lines(proc.stderr)) == 1 and "trainer.micro_batch_size=N" in proc.stderr
