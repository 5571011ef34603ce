"""The README's Python examples run as written, on small settings (fewer epochs, draws, members and points).

Blocks that need the user's own files (``mydata.npz`` arrays, an exported ``noise-0.25.pt``) are skipped here;
``tests/test_data_formats.py`` and ``tests/test_export.py`` cover those formats."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
#: the settings the README uses, and the small ones the test substitutes (applied in this order)
SMALL = [("epochs=30", "epochs=1"), ("n0=100", "n0=10"), ("n=1000", "n=40"), ("members=50", "members=2"),
         ("steps=1000", "steps=2"), ("n_jobs=2", "n_jobs=1"), ("data.test.x", "data.test.x[:12]"),
         ("data.test.y", "data.test.y[:12]")]
#: blocks that read files the user brings
NEEDS_USER_FILES = ("x_train=x_train", 'torch.jit.load("noise-0.25.pt")')


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 3 and any("RandomizedSmoothing" in b for b in blocks)


def test_the_readme_python_examples_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {}
    ran = 0
    for block in _python_blocks():
        if any(marker in block for marker in NEEDS_USER_FILES):
            continue
        code = block
        for big, small in SMALL:
            code = code.replace(big, small)
        try:
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the project's own README
        except Exception as exc:  # pragma: no cover - the message names the failing example
            pytest.fail(f"README example failed: {type(exc).__name__}: {exc}\n{block}")
        ran += 1
    assert ran >= 3
    assert (tmp_path / "points.csv").is_file() and (tmp_path / "store.npz").is_file()
