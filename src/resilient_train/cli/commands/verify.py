"""`verify TARGET`: re-read every byte of checkpoints against their manifests; exit 1 naming the broken files."""

from __future__ import annotations

import argparse
from typing import Optional

NAME = "verify"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(NAME, parents=[common], help="re-read every byte of checkpoints against their manifests",
                       description="Check every file of TARGET (a run: all its checkpoints; or one checkpoint folder) against the sizes "
                                   "and checksums in its manifest. Exit 1 naming the broken files.")
    p.add_argument("target", metavar="TARGET")


def run(args: argparse.Namespace) -> int:
    from resilient_train.cli.commands._shared import VerificationFailed, resolve_checkpoint
    from resilient_train.errors import NotFoundError

    manager, info = resolve_checkpoint(args.target)
    infos = [info] if info is not None else manager.list()
    if not infos:
        raise NotFoundError(f"no checkpoints in '{args.target}'")
    broken: list[str] = []
    seen: dict[str, Optional[str]] = {}  # shared files: each is read once, whatever references it
    for item in infos:
        if item.status == "incomplete" and info is None:
            print(f"step {item.step}: incomplete, not verified ({item.reason})")
            continue
        problems = manager.verify(item, seen)
        print(f"step {item.step}: " + ("ok" if not problems else "BROKEN"))
        for problem in problems:
            print(f"  {problem}")
        broken += problems
    if broken:
        names = ", ".join(p.split(":")[0] for p in broken)
        raise VerificationFailed(f"{len(broken)} file(s) failed verification: {names}")
    return 0
