"""Task files: loading one (the only dynamic import in the package) and snapshotting its source.

A task is a `.py` file or an importable `package.module` with a `build(cfg)` function and,
optionally, `CONFIG` (default config) and `ASSETS` (files next to it that it reads, copied into the
run's snapshot so `resume` works from the run folder alone).

While a task file loads and while its `build` runs, its folder is first on `sys.path`, so a
sibling module listed in `ASSETS` imports by name (`from model import GPT`, as nanoGPT's
`train.py` does) whatever the working folder: the original folder at `run`, the snapshot at
`resume`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import posixpath
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

from resilient_train.errors import UsageError

BUILD_KEYS_REQUIRED = ("model", "optimizer", "train_data")
BUILD_KEYS_OPTIONAL = ("training_step", "scheduler", "val_data", "tokenizer")
BUILD_KEYS_NOT_FOR_FIT = ("tokenizer",)  # kept for `export --format hf`, not passed to Trainer.fit


@dataclass
class Task:
    """A loaded task: its module, default config and the files a snapshot must carry."""

    name: str
    module: ModuleType
    source: str | None  # path of the .py file
    defaults: dict = field(default_factory=dict)
    assets: list[str] = field(default_factory=list)
    folder: Optional[str] = None  # a task file's folder, on sys.path while it loads and builds

    def build(self, cfg: Any) -> dict[str, Any]:
        """Call the task's `build(cfg)` and check it returned what `Trainer.fit` takes."""
        with folder_on_sys_path(self.folder):
            parts = self.module.build(cfg)
        if not isinstance(parts, dict):
            raise UsageError(f"task {self.name}: build(cfg) must return a dict, got {type(parts).__name__}")
        missing = [k for k in BUILD_KEYS_REQUIRED if k not in parts]
        unknown = [k for k in parts if k not in BUILD_KEYS_REQUIRED + BUILD_KEYS_OPTIONAL]
        if missing or unknown:
            raise UsageError(
                f"task {self.name}: build(cfg) returned {sorted(parts)}; it needs "
                f"{list(BUILD_KEYS_REQUIRED)} and may add {list(BUILD_KEYS_OPTIONAL)}"
            )
        return parts


@contextlib.contextmanager
def folder_on_sys_path(folder: Optional[str]) -> Iterator[None]:
    """Put `folder` first on `sys.path` for the block, then take it off again.

    It stays only where it already was before: a folder that was on the path (anywhere) keeps
    that entry, a folder that was not leaves no trace.
    """
    if folder is None:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        try:
            sys.path.remove(folder)  # the first occurrence: the one inserted above
        except ValueError:  # the task removed it itself
            pass


def _defines_build(path: str) -> bool:
    """Whether the file's source binds the name `build` anywhere (a def, an assignment, an import,
    or a `from x import *` that may bring it). Checked before the file runs: a script that trains
    at import (calls `Trainer.fit` at module level) would otherwise train to the end before we
    could say it is not a task. A syntax error is left for the import to report with its line."""
    import ast

    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError):
        return True
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == "build":
            return True
        if isinstance(node, ast.Name) and node.id == "build" and isinstance(node.ctx, ast.Store):
            return True
        if isinstance(node, ast.alias) and (node.asname or node.name).split(".")[0] in ("build", "*"):
            return True
    return False


def _module_from_file(path: str) -> ModuleType:
    if not _defines_build(path):
        raise UsageError(f"task file '{path}' defines no build(cfg) function, so it is not a task (it was not run); "
                         "a script that calls Trainer.fit itself runs as `python SCRIPT.py`, see docs/configuration.md#task-files")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"resilient_train_task_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load task file '{path}'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and DataLoader workers look modules up by name
    try:
        with folder_on_sys_path(os.path.dirname(path)):
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise UsageError(f"task file '{path}' line {exc.lineno}: syntax error: {exc.msg}") from None
    return module


def load_task(spec: str) -> Task:
    """Load TASK as given on the command line: a `.py` path or a `package.module` name."""
    path: Optional[str]  # None for a module without __file__
    if spec.endswith(".py") or os.sep in spec or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise UsageError(f"task file '{spec}' does not exist")
        path = os.path.abspath(spec)
        folder: Optional[str] = os.path.dirname(path)
        module = _module_from_file(path)
    else:
        folder = None  # an importable module's siblings are importable through its package
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            if exc.name and spec.startswith(exc.name):
                raise UsageError(f"task module '{spec}' cannot be imported; give a .py path or an installed module") from None
            raise
        path = getattr(module, "__file__", None)
    build: Callable[..., Any] | None = getattr(module, "build", None)
    if not callable(build):
        raise UsageError(f"task '{spec}' has no build(cfg) function")
    defaults = getattr(module, "CONFIG", {}) or {}
    if not isinstance(defaults, dict):
        raise UsageError(f"task '{spec}': CONFIG must be a dict")
    assets = list(getattr(module, "ASSETS", []) or [])
    for asset in assets:
        norm = posixpath.normpath(asset)
        if os.path.isabs(asset) or norm.startswith(".."):
            raise UsageError(f"task '{spec}': ASSETS entry '{asset}' must be a path inside the task's folder")
    return Task(name=spec, module=module, source=path, defaults=defaults, assets=assets, folder=folder)
