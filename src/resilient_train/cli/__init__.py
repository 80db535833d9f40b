"""Command-line interface: argument parsing, dispatch, exit codes and one-line errors.

Every command is a module in `commands/`, listed in `commands.COMMANDS`, whose `run` returns an
exit code or raises one of the errors in `errors.py`; `main` turns those into `error: ...` lines
(a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any, NoReturn, Optional, Sequence, cast

from resilient_train.cli.commands import COMMANDS, load
from resilient_train.errors import EXIT_FAILED, ResilientTrainError, TrainingStopped, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus an error and exits 2; we want one `error:` line, via UsageError.

    `example` (a whole command line) is what a missing positional argument is answered with.
    """

    def __init__(self, *args: Any, example: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.example = example

    def error(self, message: str) -> NoReturn:
        prefix = "the following arguments are required: "
        if message.startswith(prefix):
            message = _missing(self.prog.split()[-1], [name for name in message[len(prefix):].split(", ") if name != "KEY=VALUE"],
                               self.example)
        raise UsageError(f"{message} (see `python -m resilient_train {self.prog.split()[-1]} --help`)"
                         if " " in self.prog else f"{message} (see `python -m resilient_train --help`)")


_WHAT = {"TASK": "TASK (a task file .py, or package.module, with build(cfg))", "RUN": "RUN (a run folder or URL)"}


def _missing(command: str, names: list[str], example: Optional[str]) -> str:
    """A missing positional argument, said with what it is and an example of the whole command."""
    what = " and ".join(_WHAT.get(name, name) for name in names) or "more arguments"
    return f"{command} needs {what}" + (f", e.g. `{example}`" if example else "")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of the commands in `commands.COMMANDS`, each with the common options (--debug).

    Only the command `argv` names when its first word other than `--debug` is a command (what
    parsing it needs); every command otherwise (the listing of `--help` or of an abbreviation of
    it, an unknown command's choices).
    """
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser = _Parser(
        prog="resilient_train",
        description="Train, resume and inspect interruptible runs. Every path may be an fsspec URL "
        "(local path, /content/drive/MyDrive/..., gs://bucket/prefix, memory://...).",
        parents=[common],
    )
    # every sub-parser is a _Parser; the commands only need the ArgumentParser interface
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
               parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser))
    sub.required = True
    for name in _commands_to_parse(argv):
        load(name).add_parser(sub, common)
    return parser


def _commands_to_parse(argv: Sequence[str]) -> Sequence[str]:
    first = next((word for word in argv if word != "--debug"), None)
    return [first] if first in COMMANDS else list(COMMANDS)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides come after options (`run t.py --run-dir x a=1`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `python -m resilient_train --help`)")
    return args


# commands that train: they take stop signals from the moment the CLI starts (preemption.py)
_TRAINING_COMMANDS = ("run", "resume")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    from resilient_train.console import AboveTheBar, Prefixed

    handler = AboveTheBar(sys.stderr)  # messages above the progress bar, never inside it
    handler.setFormatter(Prefixed())
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    for noisy in ("lightning_fabric", "lightning", "fsspec", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # gcsfs logs every exhausted retry as an ERROR with a traceback; our own retry lines and the
    # final `error:` line say the same in one line each
    for chatty in ("gcsfs", "aiohttp"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if debug else logging.CRITICAL)
    from resilient_train.preemption import StopRequest

    if next((word for word in argv if not word.startswith("-")), None) in _TRAINING_COMMANDS:
        StopRequest.listen_early()  # a stop from the first second: 75, never the signal's default action
    try:
        args = _parse(build_parser(argv), argv)
        return int(load(args.command).run(args) or 0)
    except TrainingStopped as stopped:  # the trainer has said where it stopped, in one line
        return stopped.code
    except ResilientTrainError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `inspect --json | head`: the reader stopped reading, nothing is wrong
        _silence_stdout()
        return 0
    except Exception as exc:  # a store out of reach, a bug in the task or here: one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"error: {_unexpected(exc)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        StopRequest.forget_early()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _unexpected(exc: Exception) -> str:
    """The one line for an error that is not ours: a store out of reach says so and what to do;
    anything else (the task's own code, a DataLoader worker lost on its own) is named as raised."""
    from resilient_train.storage.retry import unreachable  # only now: it imports fsspec

    if unreachable(exc):
        return (f"storage unreachable ({type(exc).__name__}: {_first_line(exc)}); check the network or the storage URL "
                "and run the command again (no committed checkpoint was changed)")
    return f"{type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)"


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
