"""The CLI's commands, one module each, listed once in `COMMANDS`: the parser is built from this
table and `main` dispatches through it, so a new command is one new file and one line here.
A command's module is imported only when its command is parsed or listed (`load`): `run` starts
without building the other ten sub-parsers (~4 ms of every start).

Each module has `add_parser(sub, common)` (its sub-parser: help, description, example) and
`run(args) -> int` (an exit code, or one of the errors in `errors.py`). Modules import only the
standard library at the top and the rest inside `run`, so parsing (and a usage error) costs
nothing and the torch-free commands stay torch-free.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Protocol, cast


class Command(Protocol):
    """What a command module provides."""

    NAME: str

    def add_parser(self, sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


# command name -> its module in this package, in the order `--help` lists them
COMMANDS: dict[str, str] = {
    "run": "run", "resume": "resume", "ls": "ls", "export": "export", "verify": "verify", "sync": "sync",
    "inspect": "inspect", "plot": "plot", "env": "env", "config": "config", "check-resume": "check_resume",
}


def load(name: str) -> Command:
    """The module of command `name` (a key of COMMANDS)."""
    return cast(Command, importlib.import_module(f"{__name__}.{COMMANDS[name]}"))
