"""A small task for the tests: an MLP with dropout on synthetic data, logging its data order.

`task.order_log` (optional) appends the sample indices of every micro-batch, one line each, so a
test can compare the data order of an interrupted run with an uninterrupted one. `task.sleep`
slows each step so a test can interrupt mid-run. `task.ballast` adds that many trained
parameters so checkpoints are large and a save takes long enough to be killed in the middle.
`task.frozen` freezes the first layer (its tensors go to the run's shared files, stored once).
`task.fail_at` makes the training step raise on that call (a bug in user code mid-run).
`task.oom_above` makes the step raise torch.OutOfMemoryError, after the forward pass (so dropout
has drawn its masks), when it gets more samples than that, on every `task.oom_every`-th call (so
an earlier chunk of the same optimizer step may already have put gradients in place): what a
smaller GPU does to a micro-batch that fit a larger one. `task.kill_at` SIGKILLs the process
of global rank `task.kill_rank` at that call, in the first incarnation of a torchrun worker group
only (TORCHELASTIC_RESTART_COUNT 0): a worker that dies, for torchrun to restart.
`task.lose_batch_at` makes the process of global rank `task.kill_rank` lose its batch at that call
as a group stop signal makes it lose one: SIGUSR1 goes to the whole process group (every rank),
then the fetch's connection is reset (ConnectionResetError), before the step's collectives.
`task.val_lose_at` does the same in the validation data: the fetch of that validation sample on rank
`task.kill_rank` signals the group and fails.
`task.linger` keeps the main process (local rank 0) alive that many seconds after it is done, as a
mirror upload or a tracker closing can (an atexit hook). `task.child_exit` ends every other process
Fabric started with that exit code once it is done (an atexit hook), as an interpreter that aborts
in its teardown does (134, SIGABRT).
`task.fetch_sleep` slows every sample's fetch (a data-bound run: the loop waits on its workers).
`task.val_workers` adds validation data: a DataLoader with that many workers, each sample taking
`task.val_fetch_sleep`; `task.val_marker` names a file the validation workers create when they
start fetching (a test waits for it to signal a run in the middle of its validation).
"""

import atexit
import os
import signal
import time

import torch
from torch import nn

CONFIG = {
    "task": {"n": 256, "dim": 16, "hidden": 32, "lr": 0.01, "order_log": "", "sleep": 0.0, "dropout": 0.1, "ballast": 0, "fail_at": 0, "oom_above": 0, "oom_every": 1, "kill_at": 0, "kill_rank": 0, "lose_batch_at": 0, "val_lose_at": -1, "linger": 0.0, "child_exit": 0, "frozen": False, "fetch_sleep": 0.0, "val_workers": 0, "val_fetch_sleep": 0.0, "val_marker": ""},
    "trainer": {"max_steps": 40, "batch_size": 8, "log_every_n_steps": 5, "progress_bar": False},
    "checkpoint": {"every_n_steps": 5, "keep_last": 2},
}


class IndexedData(torch.utils.data.Dataset):
    def __init__(self, n: int, dim: int, fetch_sleep: float = 0.0, marker: str = "", lose_at: int = -1, lose_rank: int = 0) -> None:
        self.fetch_sleep, self.marker, self.lose_at, self.lose_rank = fetch_sleep, marker, lose_at, lose_rank
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x.sum(dim=1, keepdim=True) > 0).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.lose_at and _rank() == self.lose_rank:
            os.killpg(os.getpgrp(), signal.SIGUSR1)
            raise ConnectionResetError(104, "Connection reset by peer")
        if self.marker:
            open(self.marker, "a").close()
        if self.fetch_sleep:
            time.sleep(self.fetch_sleep)
        return {"x": self.x[i], "y": self.y[i], "index": i}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def build(cfg):
    t = cfg.task
    if t.get("linger", 0.0) and os.environ.get("LOCAL_RANK", "0") == "0":
        atexit.register(time.sleep, t.linger)
    if t.get("child_exit", 0) and os.environ.get("LOCAL_RANK", "0") != "0":
        atexit.register(os._exit, t.child_exit)
    model = nn.Sequential(nn.Linear(t.dim, t.hidden), nn.ReLU(), nn.Dropout(t.dropout), nn.Linear(t.hidden, 1))
    if t.ballast:
        model.register_parameter("ballast", nn.Parameter(torch.zeros(t.ballast)))
    if t.frozen:
        model[0].requires_grad_(False)
    log_path = t.order_log
    calls = [0]

    def training_step(model, batch):
        calls[0] += 1
        if t.fail_at and calls[0] == t.fail_at:
            raise RuntimeError(f"task bug at call {calls[0]}")
        if t.kill_at and calls[0] == t.kill_at and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" \
                and int(os.environ.get("RANK", "0")) == t.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if t.get("lose_batch_at", 0) and calls[0] == t.lose_batch_at and _rank() == t.kill_rank:
            os.killpg(os.getpgrp(), signal.SIGUSR1)
            raise ConnectionResetError(104, "Connection reset by peer")
        if log_path:
            with open(log_path, "a") as f:
                f.write(" ".join(str(int(i)) for i in batch["index"]) + "\n")
        if t.sleep:
            time.sleep(t.sleep)
        out = model(batch["x"])
        if t.oom_above and len(batch["x"]) > t.oom_above and calls[0] % t.oom_every == 0:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {len(batch['x'])} samples > {t.oom_above})")
        loss = nn.functional.binary_cross_entropy_with_logits(out, batch["y"])
        if t.ballast:
            loss = loss + 1e-6 * model.ballast.square().mean() + 1e-6 * model.ballast.sum()
        return loss

    extra = {}
    if t.get("val_workers", 0) or t.get("val_lose_at", -1) >= 0:
        val = IndexedData(64, t.dim, t.val_fetch_sleep, t.val_marker, t.get("val_lose_at", -1), t.kill_rank)
        extra["val_data"] = torch.utils.data.DataLoader(val, batch_size=8, num_workers=t.val_workers)
    return {
        **extra,
        "model": model,
        "optimizer": lambda params: torch.optim.AdamW(params, lr=t.lr),
        "scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5),
        "train_data": IndexedData(t.n, t.dim, t.get("fetch_sleep", 0.0)),
        "training_step": training_step,
    }
