"""resilient_train from a plain Python script: no task file, no CLI.

    python examples/plain_script.py          # trains to step 200, checkpointing every 50 steps
    python examples/plain_script.py          # again: finds step 200 committed, nothing left to do
    python examples/plain_script.py 400      # a longer target: resumes at step 200, trains to 400

Interrupt it at any point (Ctrl-C, or `kill` = SIGTERM): it finishes the step, saves and exits
with code 75; the next run picks up from there. `fit` resumes from the newest valid checkpoint in
`run_dir` by itself, so the script needs no resume logic of its own.
"""

import sys

import torch
from torch import nn

from resilient_train import Trainer, seed_everything

RUN_DIR = "runs/plain_script"


class Line(torch.utils.data.Dataset):
    """y = 3x - 1 plus noise: small enough to train in a second, real enough to show a loss fall."""

    def __init__(self, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, generator=g) * 4 - 2
        self.y = 3 * self.x - 1 + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def training_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def main() -> None:
    max_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    # Seed before building the model so a fresh run starts from the same weights every time;
    # a resumed run overwrites them (and every RNG) from the checkpoint anyway.
    seed_everything(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    trainer = Trainer(run_dir=RUN_DIR, max_steps=max_steps, every_n_steps=50, batch_size=32,
                      progress_bar=False, log_every_n_steps=50)
    result = trainer.fit(
        model,
        lambda params: torch.optim.Adam(params, lr=0.01),  # a factory: built after the model is placed
        Line(),
        training_step=training_step,
    )
    if result.resumed_from == result.step:
        print(f"{RUN_DIR} is already at step {result.step}: nothing left to train (pass a larger max_steps)")
    else:
        start = "scratch" if result.resumed_from is None else f"step {result.resumed_from}"
        print(f"trained from {start} to step {result.step}, last loss {result.loss:.4f}; checkpoints in {RUN_DIR}")


if __name__ == "__main__":
    main()
