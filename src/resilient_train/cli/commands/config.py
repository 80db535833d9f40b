"""`config TASK`: the resolved config, each value with the layer that set it. Nothing is trained or written."""

from __future__ import annotations

import argparse
from typing import Any, Mapping, Optional, Sequence

NAME = "config"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="print TASK's resolved config, each value with the layer it came from",
                       description="Resolve TASK's config (defaults < the task's CONFIG < --config YAML < KEY=VALUE) and print every key "
                                   "with its value and the layer that set it. Nothing is trained or written.",
                       example="python -m resilient_train config examples/char_gpt.py trainer.max_steps=500")
    p.add_argument("task", metavar="TASK", help="task file (.py) or module with build(cfg)")
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config layered over the task's CONFIG")
    p.add_argument("--run-dir", help="as for run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for run")


def run(args: argparse.Namespace) -> int:
    from resilient_train.config import load_yaml_layer, parse_overrides, sourced_values
    from resilient_train.task import load_task

    layers: list[tuple[str, Any]] = [("task CONFIG", load_task(args.task).defaults)]
    if args.config:
        layers.append((f"--config {args.config}", load_yaml_layer(args.config)))
    layers.append(("KEY=VALUE", parse_overrides(args.overrides)))
    if args.run_dir:
        layers.append(("--run-dir", {"run_dir": args.run_dir}))
    print(render(sourced_values(layers)))
    return 0


def render(rows: Sequence[tuple[str, Any, str]]) -> str:
    """One `key: value  # layer` line per key, values in YAML flow style."""
    shown = [(key, _flow(value), origin) for key, value, origin in rows]
    width = max((len(key) + len(value) + 2 for key, value, _ in shown), default=0)
    return "\n".join(f"{f'{key}: {value}':<{width}}  # {origin}" for key, value, origin in shown)


def _flow(value: Optional[Any]) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value or value != value.strip()):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {_flow(item)}" for key, item in value.items()) + "}"
    return str(value)
