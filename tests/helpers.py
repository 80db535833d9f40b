"""What tests share: the one weight comparison, the one checkpoint listing, the in-process CLI
runner and the baseline runs trained once per session.

The weight comparison is the tool's own (resilient_train.tools.check_resume.compare), so a test
and `check-resume` agree on what "the same weights" means: same keys, shapes and dtypes, and
values equal bit for bit in torch.equal's sense (here NaN != NaN, as in torch.equal; the tool
itself counts NaN at the same places as equal).

The listing is the library's (`CheckpointManager.list`), so it works on any fsspec URL and sees a
checkpoint as committed exactly when `resume` would.

`run_cli_inprocess` runs `resilient_train.cli.main` in the test process (no interpreter start, no
torch import: ~0.1 s instead of 1.2-2 s) and isolates what a process boundary would: see its
docstring. Tests whose subject is the process itself (signals, kills, DDP, torch-free imports,
`python -m`, import-time audits, gs:// with its cached clients) keep `run_cli`'s subprocess.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import torch

from resilient_train.checkpoint.manager import COMMITTED, CheckpointManager
from resilient_train.storage import Storage
from resilient_train.tools.check_resume.compare import weight_difference

RunLocation = Union[str, "os.PathLike[str]", Path]


def assert_same_weights(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Same keys, and every tensor the same: shape, dtype and every value (torch.equal)."""
    assert got.keys() == want.keys()
    diff = weight_difference(got, want, nan_equal=False)
    assert diff is None, f"weights differ at {diff.where}: {diff.detail}"


def committed_steps(run: RunLocation) -> list[int]:
    """The committed checkpoint steps of a run folder (a path or any fsspec URL), oldest first."""
    return [info.step for info in CheckpointManager(Storage(os.fspath(run))).list() if info.status == COMMITTED]


# ---------------------------------------------------------------------------------------------
# The CLI in the test process

REPO = Path(__file__).resolve().parent.parent
_SRC = REPO / "src"
_MAIN_PY = str(_SRC / "resilient_train" / "__main__.py")  # sys.argv[0] under `python -m`
# what a fresh interpreter's warnings filters are (pytest records warnings instead of printing them)
_PROCESS_WARNING_FILTERS = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]
# loggers whose level cli.main sets
_CLI_LOGGERS = ("lightning_fabric", "lightning", "fsspec", "urllib3", "matplotlib", "gcsfs", "aiohttp", "resilient_train")


def _module_is_installed_code(module: Any) -> bool:
    """A module that a fresh process would share with this one: the library, the standard library
    and site-packages. Anything else imported by a CLI call (a task file, its sibling modules) is
    dropped afterwards, as a process exit would drop it, so the next call loads it again."""
    path = getattr(module, "__file__", None)
    if not path:
        return True
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(_SRC)}
    return any(os.path.abspath(path).startswith(os.path.abspath(root) + os.sep) for root in roots)


@contextlib.contextmanager
def _process_like_state() -> Iterator[None]:
    """Everything a CLI process starts without and leaves behind at exit, saved and restored."""
    import numpy as np
    import torch
    from fsspec.implementations.memory import MemoryFileSystem

    environ = dict(os.environ)
    cwd = os.getcwd()
    argv, path = sys.argv[:], sys.path[:]
    modules = set(sys.modules)
    handlers = {sig: signal.getsignal(sig) for sig in signal.valid_signals()
                if sig not in (signal.SIGKILL, signal.SIGSTOP)}
    root = logging.getLogger()
    root_state = (root.handlers[:], root.level)
    logger_state = {name: (lg.handlers[:], lg.level, lg.propagate)
                    for name in _CLI_LOGGERS for lg in [logging.getLogger(name)]}
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    torch_state = (torch.get_default_dtype(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_float32_matmul_precision())
    memory = (dict(MemoryFileSystem.store), list(MemoryFileSystem.pseudo_dirs))
    threads = set(threading.enumerate())
    try:
        os.environ.pop("COLAB_RELEASE_TAG", None)  # as cli_env() does for a subprocess
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        os.chdir(REPO)
        root.handlers = []  # so that cli.main's logging.basicConfig installs its handler, as in a process
        for name in _CLI_LOGGERS:
            logging.getLogger(name).handlers = []
        MemoryFileSystem.store.clear()  # a process starts with an empty memory://
        MemoryFileSystem.pseudo_dirs[:] = [""]
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(_PROCESS_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            yield
    finally:
        for thread in set(threading.enumerate()) - threads:  # a save still writing, as exit would wait for
            if thread.name.startswith("checkpoint"):
                thread.join(timeout=30)
        for handler in root.handlers:
            if handler not in root_state[0]:
                handler.close()
        root.handlers, root.level = root_state
        for name, (hs, level, propagate) in logger_state.items():
            lg = logging.getLogger(name)
            lg.handlers, lg.level, lg.propagate = hs, level, propagate
        for sig, handler in handlers.items():
            if signal.getsignal(sig) is not handler and handler is not None:
                signal.signal(sig, handler)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.set_default_dtype(torch_state[0])
        torch.set_num_threads(torch_state[1])
        torch.use_deterministic_algorithms(torch_state[2], warn_only=torch_state[3])
        torch.set_float32_matmul_precision(torch_state[4])
        MemoryFileSystem.store.clear()
        MemoryFileSystem.store.update(memory[0])
        MemoryFileSystem.pseudo_dirs[:] = memory[1]
        for name in set(sys.modules) - modules:
            if not _module_is_installed_code(sys.modules[name]):
                del sys.modules[name]
        sys.argv[:], sys.path[:] = argv, path
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)


def needs_a_process(args: "tuple[str, ...] | list[str]") -> str:
    """Why a CLI call with these arguments must run as its own process ('' when it need not):
    gcsfs keeps clients and directory listings per process, and more than one device or node
    means DDP processes."""
    for arg in args:
        if "gs://" in arg:
            return "a gs:// command"
        key, _, value = arg.partition("=")
        if key in ("trainer.devices", "trainer.num_nodes") and value not in ("1", "auto", "cpu"):
            return f"{arg} starts several processes"
        if key == "trainer.strategy" and "ddp" in value:
            return f"{arg} starts several processes"
    return ""


def run_cli_inprocess(*args: str, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m resilient_train ARGS` as `resilient_train.cli.main(ARGS)` in this process.

    Shaped like `subprocess.run(..., capture_output=True, text=True)`'s result: returncode (main's
    return value or a SystemExit's code), stdout and stderr as text. Isolated as a process would
    be: cwd is the repository, COLAB_RELEASE_TAG is unset and every environment variable the run
    sets is undone, sys.argv is `python -m`'s, memory:// starts empty and is given back as it was,
    the logging handlers cli.main installs write to the captured stderr and are removed, signal
    handlers, Python/NumPy/torch RNG states, torch's default dtype, thread count, determinism flag
    and matmul precision are restored, warnings print as in a fresh interpreter, checkpoint
    threads are joined and modules loaded from outside the installed code (task files and their
    siblings) are forgotten. `timeout` is accepted for `run_cli`'s signature and not enforced.
    """
    from resilient_train.cli import main

    reason = needs_a_process(args)
    if reason:
        raise ValueError(f"{reason}: use conftest.run_cli (a subprocess)")
    out, err = io.StringIO(), io.StringIO()
    with _process_like_state():
        sys.argv[:] = [_MAIN_PY, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
            sys.stdout.flush()
            sys.stderr.flush()
    proc = subprocess.CompletedProcess([sys.executable, "-m", "resilient_train", *args], int(code or 0),
                                       out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


# ---------------------------------------------------------------------------------------------
# Baseline runs trained once per session

class TrainedRuns:
    """Runs of tests/tasks/tiny.py trained once per session (in process), one per list of `run`
    arguments, and handed out as copies: every module or test that asks gets a folder of its own,
    as if it had trained the run itself, and none sees another's changes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._runs: dict[tuple[str, ...], Path] = {}

    def copy(self, dest: Path, *args: str) -> Path:
        """A copy at `dest` of the finished run `run tiny.py --run-dir ... ARGS`."""
        if args not in self._runs:
            run_dir = self.root / f"run{len(self._runs)}" / "run"
            run_cli_inprocess("run", str(REPO / "tests" / "tasks" / "tiny.py"), "--run-dir", str(run_dir), *args, check=True)
            self._runs[args] = run_dir
        shutil.copytree(self._runs[args], dest)
        return dest
