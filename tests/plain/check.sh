#!/usr/bin/env bash
# `make test-plain`: the package as a user installs it. A fresh venv with torch==2.13.0 (the CPU
# build) and a plain `pip install .` (no extras: no numpy, no pytest, no emulator), then every core
# command on a tiny task: run, ls, verify, inspect, export, resume. Exits non-zero on the first
# failure; prints one line per command.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-plain
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip uninstall -q -y numpy 2>/dev/null || true   # torch does not need it; users may not have it
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps .
"$VENV/bin/python" -m pip install -q .
if "$VENV/bin/python" -c "import numpy" 2>/dev/null; then
  echo "plain install: numpy is installed, so this check would prove nothing" >&2
  exit 1
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
RT() { (cd "$WORK" && "$OLDPWD/$VENV/bin/python" -m resilient_train "$@"); }
TASK="$PWD/tests/tasks/tiny.py"
RUN="$WORK/run"
RT run "$TASK" --run-dir "$RUN" trainer.max_steps=6 checkpoint.every_n_steps=3 >/dev/null 2>"$WORK/run.err" \
  || { tail -20 "$WORK/run.err"; exit 1; }
echo "plain install: run ok"
RT ls "$RUN" | grep -q committed && echo "plain install: ls ok"
RT verify "$RUN" | grep -q ": ok" && echo "plain install: verify ok"
RT inspect "$RUN" --json | grep -q '"checkpoint"' && echo "plain install: inspect ok"
RT export "$RUN" "$WORK/model.safetensors" 2>/dev/null && test -s "$WORK/model.safetensors" && echo "plain install: export ok"
RT resume "$RUN" trainer.max_steps=9 >/dev/null 2>"$WORK/resume.err" || { tail -20 "$WORK/resume.err"; exit 1; }
RT ls "$RUN" | grep -qE "^ +9 +committed" && echo "plain install: resume ok"
echo "plain install: every core command works without the dev extras"
