"""The example notebooks execute top to bottom off Colab (nbclient, ipykernel) on small settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typing import Optional

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import REPO

pytestmark = pytest.mark.slow

NOTEBOOKS = REPO / "examples" / "notebooks"


def _execute(name: str, runs: Path, source: Optional[Path] = None) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ["RT_NOTEBOOK_RUNS"] = str(runs)
    if source is not None:
        os.environ["RT_SOURCE_RUN"] = str(source)
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        os.environ.pop("RT_NOTEBOOK_RUNS", None)
        os.environ.pop("RT_SOURCE_RUN", None)
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "") + json.dumps(out.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


def test_colab_then_local_notebooks_train_resume_plot_and_export(tmp_path: Path) -> None:
    colab = _execute("colab_train.ipynb", tmp_path)
    text = _outputs(colab)
    assert "not on Colab" in text and "finished at step 40" in text
    drive_run = tmp_path / "drive" / "char_gpt"
    assert (drive_run / "checkpoints" / "step-000000040" / "manifest.json").exists()

    local = _execute("local_resume.ipynb", tmp_path)
    text = _outputs(local)
    assert "resumed from step 40, now at step 60" in text
    assert (tmp_path / "local" / "char_gpt" / "checkpoints" / "step-000000060" / "manifest.json").exists()
    png = tmp_path / "local" / "char_gpt.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in local.cells for out in cell.get("outputs", []))
    assert "THE FOX" in text  # a generated sample from the exported weights

    # "run all" again after everything finished, as a Colab user does after a disconnect
    assert "finished at step 40" in _outputs(_execute("colab_train.ipynb", tmp_path))
    again = _outputs(_execute("local_resume.ipynb", tmp_path))
    assert "already holds the run" in again and "resumed from step 60, now at step 60" in again


def test_local_notebook_refuses_a_source_without_a_run(tmp_path: Path) -> None:
    (tmp_path / "typo").mkdir()
    with pytest.raises(CellExecutionError, match="holds no run"):
        _execute("local_resume.ipynb", tmp_path, source=tmp_path / "typo")
    assert not (tmp_path / "typo" / "checkpoints").exists() and not (tmp_path / "local").exists()
