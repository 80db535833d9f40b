"""Shared helpers: running the real CLI in a subprocess and reading what it left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

# gcsfs 2026.x probes each bucket over gRPC, which hangs for a minute against the emulator; this
# must be set before gcsfs is first imported (the constructor argument comes too late).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# The emulator needs no credentials: gcsfs 2025.3 (what Colab pins, `make test-oldest`) otherwise
# looks for them at every new client and asks a GCE metadata server that is not there, ~15 s each
# (newer gcsfs goes anonymous on its own when STORAGE_EMULATOR_HOST is set). fsspec reads this at import.
os.environ.setdefault("FSSPEC_GS_TOKEN", "anon")

pytest_plugins = ["gcs_emulator", "storage_backends"]

REPO = Path(__file__).resolve().parent.parent
TINY_TASK = str(REPO / "tests" / "tasks" / "tiny.py")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("COLAB_RELEASE_TAG", None)
    return env


def run_cli(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m resilient_train ARGS` to completion, capturing output."""
    proc = subprocess.run(
        [sys.executable, "-m", "resilient_train", *args],
        capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def run_cli_fast(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """`run_cli` in this process (helpers.run_cli_inprocess) unless the arguments need a process of
    their own (helpers.needs_a_process: gs://, several devices or nodes)."""
    from helpers import needs_a_process, run_cli_inprocess

    runner = run_cli if needs_a_process(args) else run_cli_inprocess
    return runner(*args, timeout=timeout, check=check)


def start_cli(*args: str, **popen: Any) -> subprocess.Popen:
    """Start `python -m resilient_train ARGS` in its own process group (for signals)."""
    return subprocess.Popen(
        [sys.executable, "-m", "resilient_train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO,
        start_new_session=True, **popen,
    )


def checkpoints(run_dir: str | Path) -> list[dict]:
    proc = run_cli("ls", str(run_dir), "--json", check=True)
    return json.loads(proc.stdout)


def committed_steps_on_disk(run_dir: str | Path) -> list[int]:
    """Committed steps of a run folder, from the one listing tests share (fast enough to poll)."""
    from helpers import committed_steps

    return committed_steps(run_dir)


def saves_in_flight(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return [p for p in root.glob("step-*") if not (p / "manifest.json").exists() and any(p.iterdir())]


def wait_for(predicate, timeout: float = 120, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory):
    """Finished runs of the tiny task, trained once per session and copied per use (helpers.TrainedRuns)."""
    from helpers import TrainedRuns

    return TrainedRuns(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def tiny_task() -> str:
    return TINY_TASK


def pytest_collection_modifyitems(config: pytest.Config, items: Sequence[pytest.Item]) -> None:
    """Skip `gpu` tests where there is no CUDA device."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
