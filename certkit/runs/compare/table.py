"""The comparison table: one row per finished cell (``table.csv``, ``table.md``), rebuilt from ``cells/``."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from certkit.errors import RecordError
from certkit.runs.compare.spec import RUN_KIND, CompareSpec, _canonical
from certkit.runs.rundir import RunDirectory

TABLE_COLUMNS = ("attack", "poison_rate", "defense", "kind", "status", "reason", "ca", "asr", "ra", "der",
                 "ca_before", "asr_before", "reactivation_asr", "smoothed_ca", "acr", "ctr", "asr_bound_95",
                 "ctr_conditional", "trigger_norm", "abstain_rate", "patch_certificate", "patch_ca", "patch_ctr",
                 "ctr_samples", "poisoned_in_unit", "purify_s", "wall_s", "budget", "cell_id")
_TEXT_COLUMNS = ("attack", "defense", "kind", "status", "reason", "budget", "cell_id", "patch_certificate")


def load_cells(path: str | os.PathLike | RunDirectory) -> list[dict[str, Any]]:
    """The finished cell rows of a comparison directory (hash-checked), in the spec's table order."""
    run = path if isinstance(path, RunDirectory) else RunDirectory.open(path)
    if run.kind != RUN_KIND:
        raise RecordError(f"{run.path} holds a {run.kind!r} run, not a comparison directory")
    spec = CompareSpec.from_dict(run.config["compare"])
    rows, files = [], run.manifest["files"]
    for c in spec.cells():
        rel = f"cells/{c['id']}.json"
        if rel in files and run.file(rel).is_file():  # a deleted cell file is recomputed on the next run
            rows.append(run.read_json(rel))
    return rows


def build_table(rows: Sequence[Mapping[str, Any]], radii: Sequence[float]) -> pd.DataFrame:
    """One row per cell with :data:`TABLE_COLUMNS` and ``ca@<r>`` columns for each radius."""
    records = []
    for r in rows:
        rec = {c: r.get(c) for c in TABLE_COLUMNS}
        rec["budget"] = _canonical(r["budget"]) if r.get("budget") is not None else ""
        ca_r = r.get("certified_accuracy") or {}
        for rad in radii:
            rec[f"ca@{rad:g}"] = ca_r.get(f"{rad:g}")
        records.append(rec)
    cols = list(TABLE_COLUMNS[:16]) + [f"ca@{rad:g}" for rad in radii] + list(TABLE_COLUMNS[16:])
    frame = pd.DataFrame.from_records(records, columns=cols)
    for c in cols:
        if c not in _TEXT_COLUMNS:
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


def to_markdown(table: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table (3 decimals; empty cells for missing values)."""
    cols = list(columns) if columns is not None else [c for c in table.columns if c not in ("budget", "cell_id")]

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


MARKDOWN_NOTE = (
    "CA/ASR/RA: empirical clean accuracy, attack success rate and robust accuracy of the defended model "
    "(ensembles: majority vote; RA not measured); DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2 against the "
    "undefended model. smoothed_ca and ca@r: certified accuracy of the smoothed classifier (purified model "
    "after a Gaussian-noise fine-tune, or the ensemble) at radius r; acr: average certified radius; ctr: "
    "certified trigger robustness (non-target test points certified correct beyond the trigger's l2 norm, the "
    "joint norm for ensembles; each point's certificate holds with probability >= 1 - alpha on its own); "
    "asr_bound_95: a bound on the smoothed classifier's ASR over the whole test set that holds with probability "
    ">= 0.95 (1 - ctr + q/N, q the 95% quantile of the number of failed certificates; Markov form for ensembles, "
    "whose members' noise all points share); ctr_conditional: Cert-SSB's figure, which holds only for its "
    "data-chosen training scales held fixed (not a certificate against poisoning; its ctr is empty). "
    "patch_ca / patch_ctr: patch certificates (PatchCleanser over the model of the row, or the de-randomized "
    "smoothing cells) at the trigger's patch side in pixels, deterministic, empty for a global trigger; "
    "ctr_samples: non-target triggered inputs that the DPA / DPA+ROE / joint aggregate classifies correctly with "
    "a poisoning radius >= poisoned_in_unit (the attack's modified samples, each counting 2 inserted + deleted; "
    "deterministic; joint: together with any patch of the trigger's side). Times in seconds. Budgets per row in "
    "table.csv.\n"
)


#: the compact console table: (column of the full table, heading)
CONSOLE_COLUMNS = (("attack", "attack"), ("defense", "defense"), ("ca", "CA"), ("asr", "ASR"), ("ctr", "CTR (l2)"),
                   ("patch_ctr", "patch CTR"), ("ctr_samples", "CTR(samples)"), ("status", "status"))


def console_table(table: pd.DataFrame) -> str:
    """The compact console view of the comparison table, one line per cell (:data:`CONSOLE_COLUMNS`; the attack
    carries its poison rate when the grid has several; ``-``: not measured); the full table is ``table.md`` /
    ``table.csv``."""
    several_rates = table["poison_rate"].nunique() > 1 if len(table) else False

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [[h for _, h in CONSOLE_COLUMNS]]
    for _, r in table.iterrows():
        cells = [fmt(r[c]) for c, _ in CONSOLE_COLUMNS]
        if several_rates:
            cells[0] = f"{r['attack']}@{r['poison_rate']:g}"
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(CONSOLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 or i == len(widths) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_table(run: RunDirectory, spec: CompareSpec) -> pd.DataFrame:
    """Rebuild ``table.csv`` and ``table.md`` from ``cells/``."""
    table = build_table(load_cells(run), spec.radii)
    run.write_frame("table.csv", table)
    run.write_text("table.md", f"# certkit compare ({spec.dataset}, model {spec.model}, sigma {spec.sigma:g})\n\n"
                   + to_markdown(table) + "\n" + MARKDOWN_NOTE)
    return table
