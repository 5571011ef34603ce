"""``certkit compare``: attacks x defenses in one grid, empirical against certified robustness.

``spec`` (what runs), ``grid`` (running the cells), ``table`` (the tidy table), ``plots`` (its figures)."""

from certkit.runs.compare.grid import CompareResult, purifier_budget, report, run_cell, run_compare
from certkit.runs.compare.spec import (
           PRESET_BUDGET_CAPS,
           PRESET_PURIFIER_PARAMS,
           CompareSpec,
           attack_key,
           preset,
)
from certkit.runs.compare.table import build_table, console_table, load_cells, to_markdown

__all__ = ["PRESET_BUDGET_CAPS", "PRESET_PURIFIER_PARAMS", "CompareResult", "CompareSpec", "attack_key",
           "build_table", "console_table", "load_cells", "preset", "purifier_budget", "report", "run_cell", "run_compare",
           "to_markdown"]
