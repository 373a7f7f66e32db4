"""The analyst notebooks run top to bottom against a real warehouse (executed, not just parsed)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_explore_tables_notebook_runs(synthetic_run, monkeypatch):
    # The session's shared pipeline run (tests/conftest.py): tables, metrics and lists to plot.
    monkeypatch.setenv("VLM4REC_WAREHOUSE", str(synthetic_run.warehouse))
    nb = nbformat.read(REPO / "notebooks" / "explore_tables.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(str(o.get("data", o.get("text", ""))) for o in outputs)
    assert "synthetic" in text and "train" in text
    # The report's four figures, drawn for the run.
    assert f"figures of run {synthetic_run.run_id}" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
