"""Command-line interface: argument parsing, dispatch, exit codes and one-line errors.

Every command is a function in `commands.py` that returns an exit code or raises one of the
errors in `errors.py`; `main` turns those into `error: ...` lines (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import NoReturn, Optional, Sequence

from resilient_train.errors import EXIT_FAILED, ResilientTrainError, TrainingStopped, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus an error and exits 2; we want one `error:` line, via UsageError."""

    def error(self, message: str) -> NoReturn:
        prefix = "the following arguments are required: "
        if message.startswith(prefix):
            message = _missing(self.prog.split()[-1], [name for name in message[len(prefix):].split(", ") if name != "KEY=VALUE"])
        raise UsageError(f"{message} (see `python -m resilient_train {self.prog.split()[-1]} --help`)"
                         if " " in self.prog else f"{message} (see `python -m resilient_train --help`)")


_EXAMPLES = {
    "run": "python -m resilient_train run examples/char_gpt.py --run-dir runs/char trainer.max_steps=500",
    "resume": "python -m resilient_train resume runs/char",
    "check-resume": "python -m resilient_train check-resume examples/char_gpt.py",
    "config": "python -m resilient_train config examples/char_gpt.py trainer.max_steps=500",
}
_WHAT = {"TASK": "TASK (a task file .py, or package.module, with build(cfg))", "RUN": "RUN (a run folder or URL)"}


def _missing(command: str, names: list[str]) -> str:
    """A missing positional argument, said with what it is and an example of the whole command."""
    what = " and ".join(_WHAT.get(name, name) for name in names) or "more arguments"
    example = _EXAMPLES.get(command)
    return f"{command} needs {what}" + (f", e.g. `{example}`" if example else "")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser = _Parser(
        prog="resilient_train",
        description="Train, resume and inspect interruptible runs. Every path may be an fsspec URL "
        "(local path, /content/drive/MyDrive/..., gs://bucket/prefix, memory://...).",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", parents=[common], help="start (or continue) a run of a task file",
                       description="Start a run of TASK (a .py file or package.module), or continue it if RUN_DIR already holds it.")
    p.add_argument("task", metavar="TASK", help="task file (.py) or module with build(cfg)")
    p.add_argument("--run-dir", help="where the run lives (overrides run_dir from the config)")
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config layered over the task's CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. trainer.max_steps=500")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY", dest="allow_change",
                   help="continuing an existing run: let KEY change although it alters what the run computes "
                        "(seed, task.*, batch layout); the resume is labelled approximate. Repeatable")
    p.set_defaults(command="run")

    p = sub.add_parser("resume", parents=[common], help="continue a run from its newest valid checkpoint",
                       description="Continue RUN from its newest valid checkpoint, with the config and task snapshot stored in RUN.")
    p.add_argument("run", metavar="RUN", help="the run folder (URL)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config changes, e.g. trainer.max_steps=2000")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY", dest="allow_change",
                   help="let KEY change although it alters what the run computes (seed, task.*, batch layout); "
                        "the resume is labelled approximate. Repeatable")
    p.set_defaults(command="resume")

    p = sub.add_parser("ls", parents=[common], help="list a run's checkpoints",
                       description="List RUN's checkpoints: step, status (committed / incomplete / corrupt), size, time, metrics.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(command="ls")

    p = sub.add_parser("export", parents=[common], help="write the model weights alone (safetensors), or a Hugging Face folder",
                       description="Write the model weights of TARGET (a run: its newest valid checkpoint; or one checkpoint folder) to "
                                   "OUT, keys as in your model. With --format hf, OUT is a folder that Hugging Face's from_pretrained "
                                   "loads (config, weights, tokenizer; a PEFT model's adapter files), the model rebuilt from the run's "
                                   "task snapshot; needs pip install 'resilient_train[hf]'.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("out", metavar="OUT", help="OUT.safetensors, or a folder with --format hf")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors",
                   help="safetensors (default): one file of weights; hf: a save_pretrained folder")
    p.set_defaults(command="export")
    p = sub.add_parser("verify", parents=[common], help="re-read every byte of checkpoints against their manifests",
                       description="Check every file of TARGET (a run: all its checkpoints; or one checkpoint folder) against the sizes "
                                   "and checksums in its manifest. Exit 1 naming the broken files.")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(command="verify")

    p = sub.add_parser("sync", parents=[common], help="copy a run between storages, verifying what arrives",
                       description="Copy run SRC to DST (e.g. Drive to local disk, local disk to gs://): config, task snapshot, logs and "
                                   "every committed checkpoint, each file verified at DST and committed there with the manifest last. A "
                                   "checkpoint DST already holds is never overwritten; a DST that has moved past SRC, or holds a different "
                                   "run, is refused.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--force", action="store_true",
                   help="replace DST's config, sessions and logs even when DST has moved past SRC "
                        "(committed checkpoints are never overwritten)")
    p.set_defaults(command="sync")

    p = sub.add_parser("inspect", parents=[common], help="show a run's or checkpoint's metadata",
                       description="Show TARGET's metadata: step, config, sessions, the environment each checkpoint was written in, "
                                   "precision, world size.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(command="inspect")

    p = sub.add_parser("plot", parents=[common], help="draw loss, lr and throughput across a run's sessions",
                       description="Draw RUN's loss, learning rate and throughput against step into OUT.png, each session shaded and "
                                   "labelled with its machine and precision, resume points marked. Needs matplotlib (pip install "
                                   "'resilient_train[plot]').")
    p.add_argument("run", metavar="RUN")
    p.add_argument("out", metavar="OUT.png")
    p.set_defaults(command="plot")

    p = sub.add_parser("env", parents=[common], help="show torch, CUDA, GPU and the precision `auto` would choose",
                       description="Show the environment: torch, CUDA, cuDNN, GPUs (name, memory, capability), Colab or not, and the "
                                   "precision trainer.precision=auto would choose here.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(command="env")

    p = sub.add_parser("config", parents=[common], help="print TASK's resolved config, each value with the layer it came from",
                       description="Resolve TASK's config (defaults < the task's CONFIG < --config YAML < KEY=VALUE) and print every key "
                                   "with its value and the layer that set it. Nothing is trained or written.")
    p.add_argument("task", metavar="TASK", help="task file (.py) or module with build(cfg)")
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config layered over the task's CONFIG")
    p.add_argument("--run-dir", help="as for run")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for run")
    p.set_defaults(command="config")

    p = sub.add_parser("check-resume", parents=[common], help="check that TASK resumes bit-exactly: straight vs interrupted runs",
                       description="Train TASK N steps straight and the same N steps interrupted (SIGKILL at a save boundary, SIGKILL and "
                                   "SIGTERM between saves, each resumed), in a temporary folder, then compare weights, optimizer state, "
                                   "RNG streams, data position and losses. Prints bit-exact (exit 0) or the first difference and its "
                                   "likely cause (exit 1).")
    p.add_argument("task", metavar="TASK", help="task file (.py) or module with build(cfg)")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="steps of each run (default 20, at least 10)")
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config layered over the task's CONFIG")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders and their logs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for run")
    p.set_defaults(command="check_resume")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides come after options (`run t.py --run-dir x a=1`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `python -m resilient_train --help`)")
    return args


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
    try:
        args = _parse(build_parser(), argv)
        from resilient_train.cli import commands  # after parsing: usage errors stay fast

        return int(getattr(commands, f"cmd_{args.command}")(args) or 0)
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
    except (ConnectionError, TimeoutError) as exc:
        if debug:
            traceback.print_exc()
        print(f"error: storage unreachable ({type(exc).__name__}: {_first_line(exc)}); check the network or the "
              "storage URL and run the command again (no checkpoint was changed)", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a bug in the task or here: one line unless --debug
        if debug:
            traceback.print_exc()
        if _is_connection_error(exc):
            print(f"error: storage unreachable ({type(exc).__name__}: {_first_line(exc)}); check the network or the "
                  "storage URL and run the command again (no checkpoint was changed)", file=sys.stderr)
            return EXIT_FAILED
        print(f"error: {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _is_connection_error(exc: BaseException) -> bool:
    """aiohttp's connection errors (gcsfs) are OSErrors but not ConnectionErrors; match by type."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError))


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
