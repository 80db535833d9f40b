"""`make gpu-check` stays ready for the first GPU: its dry run (no GPU, or GPU_CHECK_DRY_RUN=1)
collects every gpu test the check runs, loads the bench scripts and says so in one line."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, cli_env


def test_the_gpu_check_dry_run_says_in_one_line_that_there_is_no_gpu_and_exits_0() -> None:
    env = {**cli_env(), "GPU_CHECK_DRY_RUN": "1"}  # never the full check, even on a GPU machine
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU here") and "dry run OK" in lines[0], proc.stdout
