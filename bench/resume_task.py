"""The task `bench/resume.py` runs: a stack of 2048 x 2048 Linear layers of about `task.params` parameters.

With `RESUME_BENCH_STAMPS` set to a file path, the process writes wall-clock stamps (time.time())
there as JSON and ends itself with `os._exit(0)` right after its first optimizer step, so that a
measurement pays neither the rest of the run nor a final checkpoint:

    import       when this file was imported (the CLI has parsed its arguments, torch is loaded)
    build_start  `build(cfg)` called (the run folder is prepared, RNGs seeded)
    build_end    the model and data built
    first_step   the first call of the training step (everything before training is done)
    first_update the first optimizer step finished

Without it, the task trains like any other (this is how the checkpoint to resume from is made).
"""

import json
import os
import time

import torch
from torch import nn

STAMPS = os.environ.get("RESUME_BENCH_STAMPS")
_stamps = {"import": time.time()}

CONFIG = {
    "task": {"params": 124e6, "width": 2048, "n": 512, "lr": 1e-4},
    "trainer": {"max_steps": 2, "batch_size": 16, "log_every_n_steps": 1, "progress_bar": False},
    "checkpoint": {"every_n_steps": None, "keep_last": 2},
}


def _write_and_exit() -> None:
    with open(STAMPS, "w") as f:
        json.dump(_stamps, f)
    os._exit(0)


def build(cfg):
    _stamps["build_start"] = time.time()
    t = cfg.task
    width = int(t.width)
    layers = max(1, round(float(t.params) / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(int(t.n), width, generator=g)
    data = torch.utils.data.TensorDataset(x, x.roll(1, dims=1))

    def make_optimizer(params):
        optimizer = torch.optim.AdamW(params, lr=float(t.lr))
        if STAMPS:
            def after_step(*_):
                _stamps.setdefault("first_update", time.time())
                _write_and_exit()

            optimizer.register_step_post_hook(after_step)
        return optimizer

    def training_step(model, batch):
        _stamps.setdefault("first_step", time.time())
        inputs, targets = batch
        return nn.functional.mse_loss(model(inputs), targets)

    _stamps["build_end"] = time.time()
    return {"model": model, "optimizer": make_optimizer, "train_data": data, "training_step": training_step}
