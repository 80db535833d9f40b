"""`env`: torch, CUDA, cuDNN, the GPUs, Colab or not, and the precision `auto` would choose here."""

from __future__ import annotations

import argparse
import json

NAME = "env"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="show torch, CUDA, GPU and the precision `auto` would choose",
                       description="Show the environment: torch, CUDA, cuDNN, GPUs (name, memory, capability), Colab or not, and the "
                                   "precision trainer.precision=auto would choose here.")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from resilient_train.env import fingerprint
    from resilient_train.runtime import auto_precision

    info = {**fingerprint(), "precision_auto": auto_precision()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "gpus":
            value = "; ".join(f"{g['name']} ({g['memory_gib']} GiB, capability {g['capability']})" for g in value) or "none"
        print(f"{key:>16}: {value}")
    return 0
