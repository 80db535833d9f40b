"""`make gpu-check`: every GPU promise of resilient_train checked in one command, one report.

GPU time is scarce and short, so this sets itself up from a fresh clone, runs each `gpu`-marked
test and the GPU benchmark as a process of its own with its own timeout (a hung check costs its
timeout, never the whole budget), prints a line per check as it goes, stops starting checks when
the time limit is spent (those are reported as not run) and writes one markdown report.

Without a GPU (or with GPU_CHECK_DRY_RUN=1) it is a dry run for CI: it checks that every test in
the table below is collected by `pytest -m gpu` (and that no gpu test is missing from it), that
the bench scripts load and that the QLoRA task imports, then prints one line and exits 0.

Environment:
  GPU_CHECK_SECONDS   time for the checks, set-up excluded (default 420)
  OUT                 folder of the report (default gpu-report/): report.md, records.jsonl, logs/
  GPU_CHECK_DRY_RUN   1: the dry run even where a GPU is present
  GPU_CHECK_TORCH     the torch version a new .venv-gpu gets from PyPI (default 2.13.0: PyPI's
                      Linux wheels are CUDA builds)

Stdlib only: it runs under any python3 and picks (or makes) the environment the checks run in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
GPU_TESTS = "tests/test_gpu.py::"
EXTRAS = ["pytest", "numpy", "psutil", "accelerate", "bitsandbytes"]  # beside -e .[hf,gpu] (nvidia-ml-py)
STAMP = ".gpu-check-installed"


@dataclass(frozen=True)
class Check:
    """One promise: what proves it (pytest node ids or a bench command), its goal, its timeout."""

    promise: str
    goal: str
    timeout: int
    tests: tuple[str, ...] = ()
    bench: tuple[str, ...] = ()


CHECKS = [
    Check("AMP chosen by compute capability", "auto = bf16-mixed from capability 8.0, 16-mixed below", 60,
          ("tests/test_trainer.py::test_auto_precision_follows_compute_capability_not_bf16_emulation",)),
    Check("fp16 with a real GradScaler", "forced 16-mixed (as on a T4): the checkpoint holds the scaler's state", 90,
          (GPU_TESTS + "test_fp16_checkpoint_stores_a_real_grad_scaler_state",)),
    Check("fp16 resume on the same GPU", "bit-exact weights, labelled bit-exact", 120,
          (GPU_TESTS + "test_fp16_resume_on_the_same_gpu_is_bit_exact",)),
    Check("fp16 -> bf16 -> fp16 resume", "each resume labelled sample-exact (precision change)", 150,
          (GPU_TESTS + "test_fp16_resumes_into_bf16_and_back",)),
    Check("GPU checkpoint resumed on CPU", "finite loss, labelled sample-exact (device -> CPU)", 120,
          (GPU_TESTS + "test_a_gpu_checkpoint_resumes_on_cpu_and_reports_the_cuda_rng",)),
    Check("async save from pinned buffers", "same weights as a synchronous save", 90,
          (GPU_TESTS + "test_async_save_uses_pinned_host_buffers_and_matches_sync",)),
    Check("gradient checkpointing", "peak memory <= 0.5x (asserted) at <= 1.35x step time (reported)", 150,
          (GPU_TESTS + "test_gradient_checkpointing_halves_the_peak_memory_of_a_small_transformer",)),
    Check("auto micro-batch under memory pressure", "batch 64 x 64 MiB with ~1.5 GiB free: a chunk <= 16 found", 120,
          (GPU_TESTS + "test_auto_micro_batch_finds_a_size_under_real_memory_pressure",)),
    Check("GPU stats columns", "metrics.csv: gpu_mem_peak_gb, gpu_util, gpu_temp_c ... filled", 90,
          (GPU_TESTS + "test_gpu_stats_log_the_peak_memory_of_each_window",)),
    Check("QLoRA killed and resumed", "4-bit base + LoRA: SIGKILL, resume, bit-identical; base stored once", 240,
          (GPU_TESTS + "test_a_qlora_run_killed_and_resumed_is_bit_identical_and_stores_the_4bit_base_once",)),
    Check("step time vs a hand-written Fabric loop", "whole-process ratio <= 1.02 (reported, not asserted)", 240,
          bench=("bench/overhead.py", "--accelerator", "cuda", "--pairs", "3", "--steps", "3000", "--batch", "256",
                 "--hidden", "1024")),
]


@dataclass
class Outcome:
    result: str  # pass | fail | skipped | timed out | not run | measured
    measured: str
    seconds: float = 0.0


# -- environment -----------------------------------------------------------------------------------


def gpu_present() -> bool:
    """Whether the driver sees a GPU (asked of nvidia-smi, so no torch is needed to know)."""
    if os.environ.get("GPU_CHECK_DRY_RUN") == "1" or shutil.which("nvidia-smi") is None:
        return False
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return proc.returncode == 0 and "GPU" in proc.stdout


def torch_has_cuda(python: str) -> bool:
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def pip(python: str, *args: str) -> None:
    print(f"gpu-check: pip install {' '.join(args)}", flush=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *args], cwd=REPO, check=True)


def set_up() -> str:
    """A Python whose torch sees the GPU, with the package and the GPU extras installed.

    `.venv-gpu` or `.venv` when its torch has CUDA; else a new `.venv-gpu`: on top of the system's
    packages where the system torch has CUDA (Colab: no 2.5 GB download), otherwise with torch
    from PyPI (a CUDA build on Linux). bitsandbytes and nvidia-ml-py are installed once (a stamp).
    """
    python = next((str(REPO / v / "bin" / "python") for v in (".venv-gpu", ".venv")
                   if (REPO / v / "bin" / "python").exists() and torch_has_cuda(str(REPO / v / "bin" / "python"))), None)
    if python is None:
        system_cuda = torch_has_cuda(sys.executable)
        venv = REPO / ".venv-gpu"
        print(f"gpu-check: creating {venv.name} ({'on the system torch' if system_cuda else 'torch from PyPI'})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", *(["--system-site-packages"] if system_cuda else []), str(venv)], check=True)
        python = str(venv / "bin" / "python")
        if not system_cuda:
            pip(python, f"torch=={os.environ.get('GPU_CHECK_TORCH', '2.13.0')}")
    stamp = Path(python).parent.parent / STAMP
    if not stamp.exists():
        pip(python, "-e", ".[hf,gpu]", *EXTRAS)
        stamp.touch()
    if not torch_has_cuda(python):
        raise SystemExit(f"gpu-check: error: the torch of {python} does not see the GPU; remove .venv-gpu and run again")
    return python


def describe(python: str) -> dict:
    """GPU name and capability, torch and CUDA versions, as the checks' Python sees them."""
    probe = ("import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps({'gpu': p.name, "
             "'capability': f'{p.major}.{p.minor}', 'memory_gib': round(p.total_memory / 2**30, 1), "
             "'torch': torch.__version__, 'cuda': torch.version.cuda}))")
    return json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout)


# -- running the checks -----------------------------------------------------------------------------


def run_limited(command: list[str], log: Path, timeout: float, env: dict) -> Optional[int]:
    """Run to completion or `timeout` (then its whole process group is killed: None)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def test_outcome(xml: Path, rc: Optional[int]) -> tuple[str, str]:
    """pass / fail / skipped from pytest's junit XML, with the first line of a failure or skip."""
    if rc is None:
        return "timed out", ""
    if not xml.exists():
        return "fail", f"pytest exited {rc} without a result"
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    for kind in ("failure", "error"):
        bad = [c.find(kind) for c in cases if c.find(kind) is not None]
        if bad:
            return "fail", (bad[0].get("message") or "").splitlines()[0][:200] if bad[0].get("message") else kind
    skipped = [c.find("skipped") for c in cases if c.find("skipped") is not None]
    if cases and len(skipped) == len(cases):
        return "skipped", (skipped[0].get("message") or "")[:200]
    return ("pass", "") if cases and rc == 0 else ("fail", f"pytest exited {rc}")


def figures(records: Path, tests: tuple[str, ...]) -> str:
    """What the tests recorded (tests/test_gpu.py `_record`), as `key=value` text."""
    if not records.exists():
        return ""
    found = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    return "; ".join(", ".join(f"{k}={v}" for k, v in r.items() if k != "test") for r in found if r.get("test") in tests)


def run_check(check: Check, python: str, out: Path, budget: float) -> Outcome:
    slug = re.sub(r"[^a-z0-9]+", "-", check.promise.lower()).strip("-")
    log = out / "logs" / f"{slug}.log"
    env = {**os.environ, "GPU_CHECK_RECORD": str(out / "records.jsonl"), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    if check.bench:
        result_json = out / f"{slug}.json"
        rc = run_limited([python, *check.bench, "--json", str(result_json)], log, budget, env)
        seconds = time.monotonic() - start
        if rc is None or rc != 0 or not result_json.exists():
            return Outcome("timed out" if rc is None else "fail", f"see logs/{log.name}", seconds)
        f = json.loads(result_json.read_text())
        return Outcome("measured", f"ratio {f['ratio']:.3f} [min {f['ratio_min']:.3f}, max {f['ratio_max']:.3f}] (goal <= {f['goal']}); "
                                   f"run {f['run_s']:.1f} s, Fabric loop {f['fabric_loop_s']:.1f} s, {f['pairs']} pairs", seconds)
    xml = out / "logs" / f"{slug}.xml"
    # the node ids choose; "gpu or not gpu" lifts pyproject's default `-m 'not gpu'`
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu or not gpu", f"--junitxml={xml}", *check.tests]
    rc = run_limited(command, log, budget, env)
    result, detail = test_outcome(xml, rc)
    measured = "; ".join(x for x in (figures(out / "records.jsonl", check.tests), detail) if x)
    return Outcome(result, measured, time.monotonic() - start)


def write_report(out: Path, info: dict, outcomes: list[tuple[Check, Outcome]], limit: float, setup_s: float) -> Path:
    cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "# GPU check report", "",
        f"GPU: {info['gpu']} (compute capability {info['capability']}, {info['memory_gib']} GiB); "
        f"torch {info['torch']}, CUDA {info['cuda']}", "",
        f"Time limit {limit:.0f} s for the checks; set-up took {setup_s:.0f} s; "
        f"the checks took {sum(o.seconds for _, o in outcomes):.0f} s.", "",
        "| promise | goal | measured | result | seconds |", "|---|---|---|---|---|",
    ]
    for check, o in outcomes:
        lines.append(f"| {cell(check.promise)} | {cell(check.goal)} | {cell(o.measured)} | {o.result} | {o.seconds:.0f} |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def full_run(limit: float, out: Path) -> int:
    started = time.monotonic()
    python = set_up()
    setup_s = time.monotonic() - started
    info = describe(python)
    print(f"gpu-check: {info['gpu']} (capability {info['capability']}), torch {info['torch']}, CUDA {info['cuda']}; "
          f"{len(CHECKS)} checks, {limit:.0f} s", flush=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "records.jsonl").unlink(missing_ok=True)
    deadline = time.monotonic() + limit
    outcomes = []
    for n, check in enumerate(CHECKS, 1):
        left = deadline - time.monotonic()
        if left < 15:  # not even a process start and a CUDA init: say so rather than time out
            outcome = Outcome("not run", "the time limit was spent")
        else:
            print(f"gpu-check: [{n}/{len(CHECKS)}] {check.promise} ...", flush=True)
            outcome = run_check(check, python, out, min(check.timeout, left))
        print(f"gpu-check: [{n}/{len(CHECKS)}] {check.promise}: {outcome.result} ({outcome.seconds:.0f} s) {outcome.measured}", flush=True)
        outcomes.append((check, outcome))
    report = write_report(out, info, outcomes, limit, setup_s)
    print(report.read_text())
    print(f"gpu-check: report written to {report}")
    return 1 if any(o.result in ("fail", "timed out") for _, o in outcomes) else 0


# -- the dry run ------------------------------------------------------------------------------------


def dry_run() -> int:
    """Everything but the GPU: the table's tests are collected, the bench scripts and the QLoRA task load."""
    python = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
    problems = []
    collect = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/"],
                             cwd=REPO, capture_output=True, text=True)
    collected = {line.strip() for line in collect.stdout.splitlines() if "::" in line}
    wanted = {test for check in CHECKS for test in check.tests}
    if collect.returncode != 0:
        problems.append(f"pytest --collect-only -m gpu exited {collect.returncode}: {collect.stdout[-300:]}")
    else:
        problems += [f"not collected: {t}" for t in sorted(wanted - collected)]
        problems += [f"a gpu test no check runs: {t}" for t in sorted(collected - wanted)]
    loads = [[python, "bench/overhead.py", "--help"], [python, "bench/fabric_loop.py", "--help"],
             [python, "-c", "import runpy; runpy.run_path('tests/tasks/qlora_gpt2.py')"]]
    for command in loads:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            problems.append(f"{' '.join(command[1:])} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    if problems:
        print(f"gpu-check: no GPU here; dry run FAILED: {' | '.join(problems)}")
        return 1
    print(f"gpu-check: no GPU here, nothing measured; dry run OK: {len(CHECKS)} checks ready "
          f"({len(collected)} gpu tests collected, bench/overhead.py, bench/fabric_loop.py and the QLoRA task load)")
    return 0


def main() -> int:
    if not gpu_present():
        return dry_run()
    limit = float(os.environ.get("GPU_CHECK_SECONDS", "420"))
    return full_run(limit, Path(os.environ.get("OUT") or REPO / "gpu-report"))


if __name__ == "__main__":
    raise SystemExit(main())
