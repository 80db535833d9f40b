"""`resume RUN`: continue a run from its newest valid checkpoint, with the config it stores."""

from __future__ import annotations

import argparse

NAME = "resume"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="continue a run from its newest valid checkpoint",
                       description="Continue RUN from its newest valid checkpoint, with the config and task snapshot stored in RUN.",
                       example="python -m resilient_train resume runs/char")
    p.add_argument("run", metavar="RUN", help="the run folder (URL)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config changes, e.g. trainer.max_steps=2000")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY", dest="allow_change",
                   help="let KEY change although it alters what the run computes (seed, task.*, batch layout); "
                        "the resume is labelled approximate. Repeatable")


def run(args: argparse.Namespace) -> int:
    from resilient_train.api import resume_run
    from resilient_train.cli.commands._shared import report_done

    report_done(resume_run(args.run, overrides=args.overrides, allow_change=args.allow_change))
    return 0
