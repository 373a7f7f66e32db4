"""The analyst notebooks run top to bottom against a real warehouse (executed, not just parsed)."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from jobs import ingest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_explore_tables_notebook_runs(spark, warehouse, tmp_path, monkeypatch):
    from udfs.synth import generate

    data = tmp_path / "synth"
    generate(data, seed=1, n_items=20, n_users=10)
    assert ingest.main(["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={warehouse}",
                        "--set", f"dataset.paths.root={data}"]) == 0
    monkeypatch.setenv("VLM4REC_WAREHOUSE", str(warehouse))
    nb = nbformat.read(REPO / "notebooks" / "explore_tables.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(str(o.get("data", o.get("text", ""))) for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "synthetic" in outputs and "train" in outputs
