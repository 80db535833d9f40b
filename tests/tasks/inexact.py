"""A task that is deterministic but NOT resume-exact, for `check-resume` to catch.

Its training step adds input noise drawn from a `torch.Generator` of its own, seeded from
`cfg.seed` in `build`. Two uninterrupted runs agree (the generator is seeded), but the trainer
neither sees nor checkpoints that generator: a resumed session rebuilds it from its seed, so the
noise after a resume repeats the noise of the run's first steps and the weights part from an
uninterrupted run, while the trainer's own RNG states (python, torch, numpy) still match.
"""

import torch
from torch import nn

CONFIG = {
    "task": {"n": 256, "dim": 16, "hidden": 32, "lr": 0.01, "noise": 0.5},
    "trainer": {"max_steps": 40, "batch_size": 8, "progress_bar": False},
    "checkpoint": {"every_n_steps": 5, "keep_last": 2},
}


def build(cfg):
    t = cfg.task
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(t.n, t.dim, generator=g)
    data = torch.utils.data.TensorDataset(x, (x.sum(dim=1, keepdim=True) > 0).float())
    model = nn.Sequential(nn.Linear(t.dim, t.hidden), nn.ReLU(), nn.Linear(t.hidden, 1))
    noise = torch.Generator().manual_seed(cfg.seed)  # the trainer's checkpoints never hold this

    def training_step(model, batch):
        inputs, targets = batch
        inputs = inputs + t.noise * torch.randn(inputs.shape, generator=noise)
        return nn.functional.binary_cross_entropy_with_logits(model(inputs), targets)

    return {
        "model": model,
        "optimizer": lambda params: torch.optim.AdamW(params, lr=t.lr),
        "train_data": data,
        "training_step": training_step,
    }
