# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: bytecode demo test test-fast test-oldest test-plain lint chaos chaos-ci bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build that lies on disk: a bare `torch` requirement would pull
# several GB of CUDA wheels. The package's own bound (torch>=2.6) is then already satisfied.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Bytecode for the package, as `pip install` (not -e) writes at install time: with
# PYTHONDONTWRITEBYTECODE set (as on this machine) every process would otherwise compile ~100
# modules again (~0.1 s per CLI start, paid by every subprocess a test starts).
bytecode: $(STAMP)
	$(PY) -m compileall -q src/resilient_train bench

demo: bytecode
	$(PY) examples/demo.py

# two workers, a test file each at a time (module fixtures stay in one process): the slow tests
# mostly wait on subprocesses, kills and torchrun, so two overlap well (13 min -> 7 min on 2 cores)
test: bytecode
	$(PY) -m pytest -q -n 2 --dist loadfile

# the same two workers (serial: ~3 min on two cores, over its budget as the suite grew)
test-fast: bytecode
	$(PY) -m pytest -q -n 2 --dist loadfile -m 'not slow and not gpu'

# ruff and mypy (dev extras); both read their settings from pyproject.toml
lint: $(STAMP)
	$(PY) -m ruff check src
	$(PY) -m mypy src

# Colab pins fsspec/gcsfs 2025.3.0: the storage tests also run against those oldest versions.
OLDEST := .venv-oldest
test-oldest:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q torch==2.13.0
	$(OLDEST)/bin/python -m pip install -q -e '.[dev]' fsspec==2025.3.0 gcsfs==2025.3.0
	$(OLDEST)/bin/python -m pytest -q -p no:cacheprovider -m 'not slow and not gpu' \
		tests/test_storage.py tests/test_checkpoint_manager.py tests/test_sync_and_mirror.py tests/test_tensorfile.py

# The package as a user installs it: a fresh .venv-plain, torch==2.13.0 and a plain `pip install .`
# (no extras, no numpy), then run, ls, verify, inspect, export and resume on a tiny task.
test-plain:
	PYTHON=$(PYTHON) bash tests/plain/check.sh

# ckpt-chaos (a dev extra, unmodified) kills the CLI at every file event of a short run, single
# process and 2-rank DDP, resumes it and compares the final weights: every crash point must PASS.
# Working folders go under /tmp. chaos-ci: 3 evenly spaced points per mode, single process, DDP and a frozen layer (shared files).
chaos: $(STAMP)
	$(PY) tests/chaos/chaos.py

chaos-ci: $(STAMP)
	$(PY) tests/chaos/chaos.py --setups single,ddp,single-frozen --max-points 6

bench: bytecode
	$(PY) bench/overhead.py
	$(PY) bench/checkpoint.py

# Every GPU promise in one command and one report ($$OUT, default gpu-report/; time limit
# GPU_CHECK_SECONDS, default 420). It sets up its own environment (.venv-gpu, or a .venv whose torch
# has CUDA). Without a GPU: a dry run (the gpu tests are collected, the bench scripts load), one line.
gpu-check:
	$(PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) $(OLDEST) .venv-plain .venv-gpu gpu-report runs .pytest_cache
