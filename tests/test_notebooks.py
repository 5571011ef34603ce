"""Every notebook in notebooks/ runs top to bottom (fast settings via CERTKIT_NOTEBOOK_FAST=1)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_certified_accuracy_curves.ipynb", "04_certify_purified_models.ipynb",
            "05_empirical_vs_certified.ipynb", "06_patch_certificates.ipynb",
            "07_poisoning_certificates.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("CERTKIT_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "undefended: CA" in text or path.name != "01_certified_accuracy_curves.ipynb"
    assert "purified-fst-noise" in text or path.name != "04_certify_purified_models.ipynb"
    assert "cells, " in text or path.name != "05_empirical_vs_certified.ipynb"
    assert "patch CTR" in text or path.name != "06_patch_certificates.ipynb"
    assert ("refused: the 'fa' certificate" in text and "roe " in text) or path.name != "07_poisoning_certificates.ipynb"
