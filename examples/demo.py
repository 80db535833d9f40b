"""`make demo`: train, get preempted, resume, export and sample, all through the public CLI.

What a run on a vanishing GPU goes through, compressed into about a minute and a half on two CPU
cores:

  1. start a run of the character-level GPT in examples/char_gpt.py, in a fresh runs/demo;
  2. once its first checkpoint is committed, send SIGTERM (what Colab, Kubernetes and SLURM send
     before they take the machine away): the trainer finishes its step, commits a checkpoint and
     exits with code 75, "resume me";
  3. list the checkpoints with `ls`;
  4. `resume` the run from the run folder alone (config and task source live in it) to the end;
  5. `export` the weights to one .safetensors file, load them into a fresh model and write text.

Every command is run as a user would type it, and its exit code is checked: the demo exits
non-zero as soon as a step does not do what the contract promises.
"""

from __future__ import annotations

import csv
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_DIR = "runs/demo"  # relative to ROOT, so the printed commands can be pasted as they are
TASK = "examples/char_gpt.py"
MAX_STEPS = 600  # ~0.1 s a step on 2 CPU cores; the task's own default is 300
EXIT_STOPPED = 75
FIRST_CHECKPOINT_TIMEOUT_S = 600.0  # generous: a busy machine can be 10x slower


class DemoFailed(Exception):
    """A step did not behave as promised; the message says which and how."""


def heading(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def cli(*args: str) -> list[str]:
    """`python -m resilient_train ARGS` with this interpreter, so the demo uses its own venv."""
    return [sys.executable, "-m", "resilient_train", *args]


def show(cmd: list[str]) -> None:
    shown = ["python" if part == sys.executable else part for part in cmd]
    print("$ " + " ".join(shown), flush=True)


def finish(proc: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """Wait for a training process, letting it save on the way out if the demo is abandoned.

    On Ctrl-C the terminal signals the child too, and it is busy committing a checkpoint: unlike
    `subprocess.call`, which kills it at once, give it time, then SIGTERM, and SIGKILL last.
    """
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            try:
                proc.wait(timeout=timeout_s)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.terminate()
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_cli(*args: str, expect: int = 0) -> None:
    """Run a CLI command in the foreground (its output goes straight to the terminal)."""
    cmd = cli(*args)
    show(cmd)
    code = finish(subprocess.Popen(cmd))
    if code != expect:
        raise DemoFailed(f"`{' '.join(args[:1])}` exited with {code}, expected {expect}")


def committed_steps(run_dir: str) -> list[int]:
    """Steps whose checkpoint has a manifest: the commit marker, written last (design 2.3)."""
    steps = []
    for manifest in glob.glob(os.path.join(run_dir, "checkpoints", "step-*", "manifest.json")):
        match = re.fullmatch(r"step-(\d+)", os.path.basename(os.path.dirname(manifest)))
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def wait_for_first_checkpoint(proc: subprocess.Popen, run_dir: str, timeout_s: float) -> int:
    """Poll the run folder (cheap: no interpreter start per poll) until a checkpoint commits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = committed_steps(run_dir)
        if steps:
            return steps[0]
        if proc.poll() is not None:
            raise DemoFailed(f"the run exited with {proc.returncode} before committing any checkpoint")
        time.sleep(0.1)
    raise DemoFailed(f"no checkpoint committed within {timeout_s:.0f} s")


def final_metrics(run_dir: str) -> dict[str, float]:
    """The last logged loss and val_loss from logs/metrics.csv.

    A resumed session re-logs the steps after its checkpoint, so per step the newest session's row
    wins; the last values by (step, session) are the run's final ones.
    """
    with open(os.path.join(run_dir, "logs", "metrics.csv"), newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: (int(r["step"]), int(r["session"])))
    found: dict[str, float] = {}
    for row in rows:
        for key in ("loss", "val_loss"):
            if row.get(key):
                found[key] = float(row[key])
                found[f"{key}_step"] = int(row["step"])
    return found


def sample_from_export(run_dir: str, weights: str) -> tuple[str, float]:
    """Load the exported weights into a fresh char_gpt model; returns (sample text, val loss).

    The model's shape comes from the run's own run.yaml and the vocabulary from the text
    snapshot in its task/ folder: what was trained, not what examples/ holds today.
    """
    import char_gpt  # examples/ is on sys.path: it is this script's folder
    import torch
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(run_dir, "run.yaml"))
    text_path = os.path.join(run_dir, "task", *char_gpt.ASSETS[0].split("/"))
    vocab = char_gpt.load_vocab(text_path)
    model = char_gpt.load_model(cfg, weights, vocab=vocab)

    # The held-out loss of the exported weights, batched as the trainer batches validation, as
    # a check that export wrote the weights the trainer ended with.
    val = char_gpt.build(cfg)["val_data"]
    losses = []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val, batch_size=int(cfg.trainer.batch_size)):
            losses.append(model(x, y)[1].item())
    text = char_gpt.generate(model, "THE FOX AND THE ", 320, vocab=vocab, temperature=0.8, top_k=10, seed=0)
    return text, sum(losses) / len(losses)


def main() -> int:
    os.chdir(ROOT)
    started = time.monotonic()
    progress_bar = "true" if sys.stderr.isatty() else "false"  # no \r-spam in logs and CI

    heading(f"1. Fresh run folder {RUN_DIR}")
    if os.path.exists(RUN_DIR):
        shutil.rmtree(RUN_DIR)
        print(f"removed the old {RUN_DIR}")
    else:
        print(f"{RUN_DIR} does not exist yet")

    heading(f"2. Train {TASK} and interrupt it with SIGTERM after its first checkpoint")
    cmd = cli("run", TASK, "--run-dir", RUN_DIR, f"trainer.max_steps={MAX_STEPS}", f"trainer.progress_bar={progress_bar}")
    show(cmd)
    proc = subprocess.Popen(cmd)
    try:
        first = wait_for_first_checkpoint(proc, RUN_DIR, FIRST_CHECKPOINT_TIMEOUT_S)
    except (DemoFailed, KeyboardInterrupt):
        proc.terminate()  # do not leave a training process behind; it saves before it exits
        finish(proc)
        raise
    print(f"\n[demo] checkpoint step {first} is committed; sending SIGTERM to the run (pid {proc.pid})", flush=True)
    proc.send_signal(signal.SIGTERM)
    code = finish(proc)
    if code != EXIT_STOPPED:
        raise DemoFailed(f"the interrupted run exited with {code}, expected {EXIT_STOPPED} (stopped, checkpoint committed)")
    steps = committed_steps(RUN_DIR)
    print(f"[demo] the run exited with code {code}: it finished its step, committed step {steps[-1]} and stopped", flush=True)

    heading("3. The checkpoints on disk")
    run_cli("ls", RUN_DIR)

    heading("4. Resume from the run folder alone, to the end")
    run_cli("resume", RUN_DIR)
    steps = committed_steps(RUN_DIR)
    if not steps or steps[-1] != MAX_STEPS:
        raise DemoFailed(f"after resume the newest checkpoint is {steps[-1:]}, expected step {MAX_STEPS}")
    metrics = final_metrics(RUN_DIR)
    print(f"[demo] final training loss {metrics['loss']:.4f} at step {metrics['loss_step']}, "
          f"validation loss {metrics.get('val_loss', float('nan')):.4f}", flush=True)

    heading("5. Export the weights and sample from them")
    weights = f"{RUN_DIR}/model.safetensors"
    run_cli("export", RUN_DIR, weights)
    text, val_loss = sample_from_export(RUN_DIR, weights)
    print(f"[demo] validation loss of the exported weights: {val_loss:.4f}"
          f" (the trainer logged {metrics.get('val_loss', float('nan')):.4f})")
    print("[demo] a sample, prompted with 'THE FOX AND THE ':\n")
    print("    " + text.replace("\n", "\n    "))

    heading(f"Done in {time.monotonic() - started:.0f} s")
    print(f"The run is in {RUN_DIR}; continue it with `python -m resilient_train resume {RUN_DIR} trainer.max_steps=2000`.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DemoFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        sys.exit(130)
