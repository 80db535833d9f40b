"""`plot RUN OUT.png`: loss, learning rate and throughput across a run's sessions (needs matplotlib)."""

from __future__ import annotations

import argparse
import sys

NAME = "plot"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="draw loss, lr and throughput across a run's sessions",
                       description="Draw RUN's loss, learning rate and throughput against step into OUT.png, each session shaded and "
                                   "labelled with its machine and precision, resume points marked. Needs matplotlib (pip install "
                                   "'resilient_train[plot]').")
    p.add_argument("run", metavar="RUN")
    p.add_argument("out", metavar="OUT.png")


def run(args: argparse.Namespace) -> int:
    from resilient_train.cli.commands._shared import require_run
    from resilient_train.plot import plot_run

    require_run(args.run)
    history = plot_run(args.run, args.out)
    print(f"wrote {args.out}: {len(history.loss)} steps, {len(history.sessions)} session(s)", file=sys.stderr)
    return 0
