"""`ls`, `verify` and `sync` answer without torch: the storage layer imports none (issue 8).

Each command runs in a subprocess whose import system refuses torch and numpy, so a stray
`import torch` anywhere on their path fails the test instead of costing a second per command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_TASK, cli_env
from helpers import run_cli_inprocess

BLOCK = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'numpy', 'lightning_fabric', 'safetensors'):
            raise ImportError(f'{name} is blocked: this command must not need it')
sys.meta_path.insert(0, _Refuse())
from resilient_train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _torch_free(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("torch-free") / "run"
    run_cli_inprocess("run", TINY_TASK, "--run-dir", str(run), "trainer.max_steps=6", "checkpoint.every_n_steps=3", check=True)
    return run


def test_the_storage_layer_imports_no_torch() -> None:
    code = BLOCK.replace("from resilient_train.cli import main\nsys.exit(main(sys.argv[1:]))", (
        "import resilient_train.storage, resilient_train.checkpoint, resilient_train.checkpoint.manager\n"
        "import resilient_train.checkpoint.manifest, resilient_train.checkpoint.retention\n"
        "import resilient_train.checkpoint.lease, resilient_train.checkpoint.transfer, resilient_train.checkpoint.mirror\n"
        "import resilient_train.cli.commands\n"
        "assert 'torch' not in sys.modules\n"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_ls_and_verify_run_without_torch(run_dir: Path, command: str) -> None:
    proc = _torch_free(command, str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "committed" in proc.stdout or ": ok" in proc.stdout, proc.stdout


def test_sync_runs_without_torch(run_dir: Path, tmp_path: Path) -> None:
    proc = _torch_free("sync", str(run_dir), str(tmp_path / "copy"))
    assert proc.returncode == 0, proc.stderr
    assert "2 checkpoint(s) copied" in proc.stderr, proc.stderr
