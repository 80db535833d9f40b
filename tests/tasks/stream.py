"""A small task over iterable text data: lines of local text files, streamed, never downloaded.

`task.data_dir` holds `*.txt` files (the tests write them). `task.source` picks the train_data:
  hf              Hugging Face `load_dataset("text", data_files=..., streaming=True)` (has state)
  hf_shuffled     the same, `.shuffle(seed, buffer_size=8)` (its buffer is not in its state)
  hf_loader       a torch DataLoader over the streaming dataset (batch size 4, num_workers=0)
  to_iterable     `Dataset.from_dict(...).to_iterable_dataset(num_shards=3)` (has state)
  stateful_loader torchdata's StatefulDataLoader over the streaming dataset, `task.workers` workers
  torch           a plain torch IterableDataset reading the files (no state: resumed by skipping);
                  each item draws noise from torch's global RNG while it is read
The model encodes each line's characters, with dropout; `task.order_log` appends each batch's
lines (one line per micro-batch, per rank: `<order_log>.rank<N>`). `task.kill_at` SIGKILLs the
whole process group (every rank) at that training-step call, once: the file `task.kill_marker`
records that it happened.
"""

import glob
import os
import signal

import torch
from torch import nn

CONFIG = {
    "task": {"data_dir": "", "source": "hf", "workers": 2, "order_log": "", "kill_at": 0, "kill_marker": "",
             "dim": 16, "lr": 0.01},
    "trainer": {"max_steps": 30, "batch_size": 4, "log_every_n_steps": 5, "progress_bar": False},
    "checkpoint": {"every_n_steps": 4, "keep_last": 2},
}

WIDTH = 24


class TextLines(torch.utils.data.IterableDataset):
    """Every line of the files, in order; a plain torch IterableDataset without state."""

    def __init__(self, files):
        self.files = list(files)

    def __iter__(self):
        for path in self.files:
            with open(path) as f:
                for line in f:
                    yield {"text": line.rstrip("\n"), "noise": torch.rand(1)}


def encode(texts):
    codes = torch.zeros(len(texts), WIDTH, dtype=torch.long)
    for row, text in enumerate(texts):
        for col, char in enumerate(text[:WIDTH]):
            codes[row, col] = ord(char) % 64
    return codes


def _files(cfg):
    files = sorted(glob.glob(os.path.join(cfg.task.data_dir, "*.txt")))
    if not files:
        raise FileNotFoundError(f"no *.txt in task.data_dir={cfg.task.data_dir!r}")
    return files


def _train_data(cfg):
    t, files = cfg.task, _files(cfg)
    if t.source == "torch":
        return TextLines(files)
    from datasets import Dataset, load_dataset

    if t.source == "to_iterable":
        lines = [line.rstrip("\n") for path in files for line in open(path)]
        return Dataset.from_dict({"text": lines}).to_iterable_dataset(num_shards=3)
    ds = load_dataset("text", data_files=files, streaming=True, split="train")
    if t.source == "hf":
        return ds
    if t.source == "hf_shuffled":
        return ds.shuffle(seed=7, buffer_size=8)
    if t.source == "hf_loader":
        return torch.utils.data.DataLoader(ds, batch_size=cfg.trainer.batch_size)
    if t.source == "stateful_loader":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(ds, batch_size=cfg.trainer.batch_size, num_workers=t.workers)
    raise ValueError(f"unknown task.source {t.source!r}")


def build(cfg):
    t = cfg.task
    model = nn.Sequential(nn.Embedding(64, t.dim), nn.Flatten(), nn.Dropout(0.1), nn.Linear(WIDTH * t.dim, 1))
    calls = [0]
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))

    def training_step(model, batch):
        calls[0] += 1
        if t.kill_at and calls[0] == t.kill_at and t.kill_marker and not os.path.exists(t.kill_marker):
            try:
                fd = os.open(t.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
            except FileExistsError:
                pass  # another rank is killing the group
            else:
                os.killpg(os.getpgid(0), signal.SIGKILL)
        texts = list(batch["text"])
        if t.order_log:
            with open(f"{t.order_log}.rank{rank}", "a") as f:
                f.write(" | ".join(texts) + "\n")
        codes = encode(texts).to(next(model.parameters()).device)
        target = torch.tensor([[sum(c.isdigit() for c in text) / 4.0] for text in texts], device=codes.device)
        if "noise" in batch:
            target = target + 0.1 * batch["noise"].to(codes.device).reshape(-1, 1)
        return nn.functional.mse_loss(model(codes), target)

    return {
        "model": model,
        "optimizer": lambda params: torch.optim.AdamW(params, lr=t.lr),
        "train_data": _train_data(cfg),
        "training_step": training_step,
    }
