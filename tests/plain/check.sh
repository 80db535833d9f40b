#!/usr/bin/env bash
# `make test-plain`: the package as a user installs it. A fresh venv with torch==2.13.0 (the CPU
# build where the package index serves it, as on the project VM) and a plain `pip install .` (no extras: no numpy, no pytest, no emulator), then every core
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
PLAIN_PY="$PWD/$VENV/bin/python"
RT() { (cd "$WORK" && "$PLAIN_PY" -m resilient_train "$@"); }
export -f RT; export WORK RUN PLAIN_PY
TASK="$PWD/tests/tasks/tiny.py"
RUN="$WORK/run"
RT run "$TASK" --run-dir "$RUN" trainer.max_steps=6 checkpoint.every_n_steps=3 >/dev/null 2>"$WORK/run.err" \
  || { tail -20 "$WORK/run.err"; exit 1; }
echo "plain install: run ok"
check() {  # check NAME COMMAND...: the command must succeed, or the check fails loudly
  local name="$1"; shift
  if "$@"; then echo "plain install: $name ok"; else echo "plain install: $name FAILED" >&2; exit 1; fi
}
check ls bash -o pipefail -c 'RT ls "$RUN" > "$WORK/ls.out" && grep -q committed "$WORK/ls.out"'
check verify bash -o pipefail -c 'RT verify "$RUN" > "$WORK/verify.out" && grep -q ": ok" "$WORK/verify.out" && ! grep -q BROKEN "$WORK/verify.out"'
check inspect bash -o pipefail -c 'RT inspect "$RUN" --json > "$WORK/inspect.out" && grep -q "\"checkpoint\"" "$WORK/inspect.out"'
check export bash -c 'RT export "$RUN" "$WORK/model.safetensors" 2>/dev/null && test -s "$WORK/model.safetensors"'
RT resume "$RUN" trainer.max_steps=9 >/dev/null 2>"$WORK/resume.err" || { tail -20 "$WORK/resume.err"; exit 1; }
check resume bash -o pipefail -c 'RT ls "$RUN" > "$WORK/ls2.out" && grep -qE "^ +9 +committed" "$WORK/ls2.out"'
echo "plain install: every core command works without the dev extras"
