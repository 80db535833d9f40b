"""The CLI's commands, one module each, listed once in `COMMANDS`: the parser is built from this
table and `main` dispatches through it, so a new command is one new file and one line here.

Each module has `add_parser(sub, common)` (its sub-parser: help, description, example) and
`run(args) -> int` (an exit code, or one of the errors in `errors.py`). Modules import only the
standard library at the top and the rest inside `run`, so parsing (and a usage error) costs
nothing and the torch-free commands stay torch-free.
"""

from __future__ import annotations

import argparse
from typing import Protocol

from resilient_train.cli.commands import check_resume, config, env, export, inspect, ls, plot, resume, run, sync, verify


class Command(Protocol):
    """What a command module provides."""

    NAME: str

    def add_parser(self, sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


_MODULES: tuple[Command, ...] = (run, resume, ls, export, verify, sync, inspect, plot, env, config, check_resume)
COMMANDS: dict[str, Command] = {module.NAME: module for module in _MODULES}  # in the order `--help` lists them
