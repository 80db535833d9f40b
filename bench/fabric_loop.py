"""The baseline of bench/overhead.py: the loop a user would write by hand with Lightning Fabric.

Same model, data, optimizer, batch size and steps as the task `resilient_train run` trains; a
shuffled DataLoader, no checkpoints, a loss line every `log_every` steps as a user would print.
`--accelerator cuda` runs it on a GPU (bench/overhead.py passes the same accelerator and precision
to both sides).

    python bench/fabric_loop.py --steps 1500 --batch 32 [--devices 2] [--hidden 256] [--accelerator cuda]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from lightning_fabric import Fabric
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead_task import CONFIG, make_problem, training_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=CONFIG["task"]["hidden"])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--per-sample", action="store_true", help="a Dataset of its own instead of a TensorDataset")
    args = parser.parse_args()
    task = {**CONFIG["task"], "hidden": args.hidden}
    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    precision=args.precision)
    fabric.launch()
    fabric.seed_everything(0)
    model, data = make_problem(task["hidden"], task["samples"], task["dim"], args.per_sample)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=task["lr"]))
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True))
    done = 0
    while done < args.steps:
        for batch in loader:
            loss = training_step(model, batch)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done % args.log_every == 0:
                fabric.print(f"step {done} loss {loss.item():.4f}")
            if done == args.steps:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
