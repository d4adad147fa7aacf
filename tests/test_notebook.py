"""The quickstart notebook executes top to bottom (a handful of steps) and trains."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="install the dev extra: pip install -e '.[dev]'")
    nbclient = pytest.importorskip("nbclient", reason="install the dev extra: pip install -e '.[dev]'")
    monkeypatch.setenv("RLR_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("RLR_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
    )
    assert "reward before:" in outputs and "reward after:" in outputs
    assert "pytorch_lora_weights.safetensors" in outputs
    figures = [
        o
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(figures) == 2  # the reward curve and the before/after grid
