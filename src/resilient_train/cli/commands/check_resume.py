"""`check-resume TASK`: train TASK straight and interrupted, and say whether the two agree bit for bit."""

from __future__ import annotations

import argparse

NAME = "check-resume"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="check that TASK resumes bit-exactly: straight vs interrupted runs",
                       description="Train TASK N steps straight and the same N steps interrupted (SIGKILL at a save boundary, SIGKILL and "
                                   "SIGTERM between saves, each resumed), in a temporary folder, then compare weights, optimizer state, "
                                   "RNG streams, data position and losses. Prints bit-exact (exit 0) or the first difference and its "
                                   "likely cause (exit 1).",
                       example="python -m resilient_train check-resume examples/char_gpt.py")
    p.add_argument("task", metavar="TASK", help="task file (.py) or module with build(cfg)")
    p.add_argument("--steps", type=int, default=20, metavar="N", help="steps of each run (default 20, at least 10)")
    p.add_argument("--config", metavar="FILE.yaml", help="a YAML config layered over the task's CONFIG")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders and their logs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for run")


def run(args: argparse.Namespace) -> int:
    from resilient_train.check_resume import check_resume

    return check_resume(args.task, overrides=args.overrides, steps=args.steps, config=args.config, keep=args.keep,
                        debug=args.debug)
