"""`run TASK`: start a run of a task file, or continue it if its run folder already holds it."""

from __future__ import annotations

import argparse

NAME = "run"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="start (or continue) a run of a task file",
                       description="Start a run of TASK (a .py file or package.module), or continue it if RUN_DIR already holds it.",
                       example="python -m resilient_train run examples/char_gpt.py --run-dir runs/char trainer.max_steps=500")
    p.add_argument("task", metavar="TASK", help="task file (.py) or module with build(cfg)")
    p.add_argument("--run-dir", help="where the run lives (overrides run_dir from the config)")
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config layered over the task's CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. trainer.max_steps=500")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY", dest="allow_change",
                   help="continuing an existing run: let KEY change although it alters what the run computes "
                        "(seed, task.*, batch layout); the resume is labelled approximate. Repeatable")


def run(args: argparse.Namespace) -> int:
    from resilient_train.api import run_task
    from resilient_train.cli.commands._shared import report_done

    report_done(run_task(args.task, run_dir=args.run_dir, config=args.config, overrides=args.overrides,
                         allow_change=args.allow_change))
    return 0
