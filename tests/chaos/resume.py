"""ckpt-chaos resume command: what a supervisor does after a crash, plus our own lost-work check.

Run by the harness (unarmed) once per crash point, once per rank, on the crashed `{out}` folder:

    python tests/chaos/resume.py --out {out} --reference WORK/reference/out --mode resume -- RUN_CMD...

Before anything touches the folder, rank 0 records the newest checkpoint that is complete, judged
against its twin in the fault-free run. ckpt-chaos can judge that itself (`--checkpoint-glob`)
only while file names are the same in every run; ours carry a name unique to each save attempt
(`model.3f9a1c2b7d.safetensors`), so its own check finds no twin and never reports LOST_WORK.
Here a name is compared without those unique tokens, sizes as they are, so the rule is the
harness's rule. `chaos.py` reads the record next to the harness's `result.json`.

Then the job continues, as the documented supervisor loop would (docs/cli.md): `--mode resume`
runs `resume RUN` when the run exists (it has `run.yaml`) and the original `run` command when the
crash left nothing to resume; `--mode run` always reruns the original command (ckpt-chaos's
default). Every rank makes the same choice: rank 0 decides and the others wait for its record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

# A dot-separated part of a file name that is an attempt's unique token, e.g. the `3f9a1c2b7d` of
# `model.3f9a1c2b7d.safetensors` or the `421eadab` of a `.model...421eadab.tmp` staging name.
UNIQUE_TOKEN = re.compile(r"^[0-9a-f]{8,}$")
STEP_FOLDER = re.compile(r"^step-(\d+)$")
WAIT_FOR_RANK0_S = 120.0


def logical_name(name: str) -> str:
    """The file name without the unique tokens of the attempt that wrote it."""
    return ".".join(part for part in name.split(".") if not UNIQUE_TOKEN.match(part))


def signature(folder: Path) -> dict[str, int]:
    """What a checkpoint folder is made of: visible files by logical name, with their sizes.

    Hidden files (staging names that start with a dot) are left out: a committed checkpoint may
    keep the staging file of its manifest when the crash came between commit and clean-up.
    """
    return {
        logical_name(p.name): p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def checkpoints(run: Path) -> dict[int, dict[str, int]]:
    """Every `checkpoints/step-N` folder of a run folder: step -> signature."""
    root = run / "checkpoints"
    found: dict[int, dict[str, int]] = {}
    if root.is_dir():
        for folder in root.iterdir():
            match = STEP_FOLDER.match(folder.name)
            if match and folder.is_dir():
                found[int(match.group(1))] = signature(folder)
    return found


def newest_complete(reference: dict[int, dict[str, int]], got: dict[int, dict[str, int]]) -> int:
    """Highest step whose folder looks exactly like the fault-free twin (0 when none does)."""
    return max((step for step, sig in reference.items() if got.get(step) == sig), default=0)


def decide(out: Path, reference: Path, mode: str) -> dict:
    """Rank 0's record: what was complete after the crash, and which command continues the job."""
    run = out / "run"
    ref = checkpoints(reference / "run")
    got = checkpoints(run)
    action = "resume" if mode == "resume" and (run / "run.yaml").is_file() else "run"
    return {
        "newest_complete": newest_complete(ref, got),
        "reference_steps": sorted(ref),
        "found": {str(step): sig for step, sig in sorted(got.items())},
        "action": action,
    }


def write_record(path: Path, record: dict) -> None:
    """Write-then-rename, so a waiting rank never reads half a record."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def wait_for_record(path: Path) -> dict:
    deadline = time.monotonic() + WAIT_FOR_RANK0_S
    while not path.exists():
        if time.monotonic() > deadline:
            sys.exit(f"chaos resume: rank 0 wrote no {path} in {WAIT_FOR_RANK0_S:.0f}s")
        time.sleep(0.05)
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the crash point's {out}")
    ap.add_argument("--reference", type=Path, required=True, help="{out} of the harness's fault-free run")
    ap.add_argument("--mode", choices=["resume", "run"], default="resume")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the original `run` command, {out} filled in")
    a = ap.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        ap.error("give the original run command after --")
    record_path = a.out.parent / "chaos-resume.json"  # beside {out}: the crash point's own folder
    if int(os.environ.get("RANK", "0")) == 0:
        record = decide(a.out, a.reference, a.mode)
        write_record(record_path, record)
    else:
        record = wait_for_record(record_path)
    if record["action"] == "resume":
        command = [sys.executable, "-m", "resilient_train", "resume", str(a.out / "run")]
    sys.stdout.flush()
    os.execvp(command[0], command)  # the job's own exit code and output reach the harness unchanged


if __name__ == "__main__":
    main()
