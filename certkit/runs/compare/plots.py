"""Plots of a comparison directory (:mod:`certkit.compare`).

* ``plots/asr_vs_ctr.png``: for every finished cell, the empirical ASR of the defended model (x) against its
  certified trigger robustness (y), one panel per certificate kind (l2 smoothing, patch, poisoning count;
  each CTR in its own unit), one colour per defense and one marker per attack. Points near the top left are defenses whose empirical and certified pictures agree; a point at the
  bottom left is a defense that looks good empirically but certifies nothing at the trigger's norm.
* ``plots/certified_accuracy_<attack>.png``: certified accuracy against l2 radius for every defense of one
  attack x poison rate, with the median trigger norm marked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certkit.certify.plots import _pyplot, save_figure
from certkit.runs.compare.spec import attack_key
from certkit.runs.compare.table import load_cells

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def certified_curve(curve: Mapping[str, Any], radii: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius from a cell's ``curve`` (``n_points`` and the sorted radii of the
    correctly certified points): the fraction of points correct with ``radius >= r``."""
    n = int(curve.get("n_points") or 0)
    if n == 0:
        return np.full(len(radii), np.nan)
    correct = np.sort(np.asarray(curve.get("correct_radii") or [], dtype=np.float64))
    return (len(correct) - np.searchsorted(correct, np.asarray(radii, dtype=np.float64), side="left")) / n


#: the CTR columns of a comparison, one ASR-vs-CTR panel each: (column, axis label, panel title)
CTR_KINDS: tuple[tuple[str, str, str], ...] = (
    ("ctr", "certified trigger robustness (l2 smoothing)", "l2 smoothing: radius >= trigger norm"),
    ("patch_ctr", "patch CTR (certified at the trigger's side)", "patch certificates: side >= trigger side"),
    ("ctr_samples", "poisoning CTR (radius >= poisoned samples)", "aggregation: radius >= poisoned count"),
)


def plot_asr_vs_ctr(table: pd.DataFrame, ax: Any = None, title: str | None = None, *, column: str = "ctr",
                    ylabel: str = "certified trigger robustness (smoothed)", legend: bool = True) -> Any:
    """Empirical ASR against a certified trigger robustness column (``ctr``, ``patch_ctr`` or
    ``ctr_samples``), one point per finished cell that has it."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    if column not in table:
        table = table.assign(**{column: np.nan})
    ok = table[(table["status"] == "ok") & table["asr"].notna() & table[column].notna()]
    groups = list(dict.fromkeys(zip(ok["attack"], ok["poison_rate"])))
    defenses = list(dict.fromkeys(ok["defense"]))
    cmap = plt.get_cmap("tab20")
    for d_i, d in enumerate(defenses):
        for g_i, (a, p) in enumerate(groups):
            sel = ok[(ok["defense"] == d) & (ok["attack"] == a) & (ok["poison_rate"] == p)]
            if len(sel):
                ax.scatter(sel["asr"], sel[column], color=cmap(d_i % 20), marker=_MARKERS[g_i % len(_MARKERS)],
                           s=60, edgecolor="black", linewidth=0.5, label=d if g_i == 0 or d_i == 0 else None)
    for g_i, (a, p) in enumerate(groups):  # marker legend for the attacks
        ax.scatter([], [], color="white", edgecolor="black", marker=_MARKERS[g_i % len(_MARKERS)],
                   label=f"{a} @ {p:g}")
    ax.set_xlabel("empirical ASR of the defended model")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    if seen and legend:
        ax.legend(seen.values(), seen.keys(), fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title or "Empirical ASR vs certified trigger robustness")
    return ax


def plot_certified_curves(rows: Sequence[Mapping[str, Any]], ax: Any = None, *, max_radius: float | None = None,
                          trigger_norm: float | None = None, title: str | None = None) -> Any:
    """Certified accuracy vs radius for each finished cell in ``rows`` (one attack x rate)."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in rows if r.get("status") == "ok" and r.get("curve")]
    top = max_radius
    if top is None:
        tops = [max(r["curve"]["correct_radii"] or [0.0]) for r in rows]
        top = max(tops + [trigger_norm or 0.0, 1e-3]) * 1.05
    grid = np.linspace(0.0, top, 400)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rows):
        style = "--" if r.get("kind") in ("rab", "cert-ssb") else "-"
        ax.plot(grid, certified_curve(r["curve"], grid), drawstyle="steps-post", linestyle=style,
                color=cmap(i % 20), label=r["defense"])
    if trigger_norm is not None and math.isfinite(trigger_norm):
        ax.axvline(trigger_norm, color="grey", linestyle=":", linewidth=1.5, label="trigger l2 norm (median)")
    ax.set_xlabel("radius (l2, pixel units; ensembles: joint / test-sigma units)")
    ax.set_ylabel("certified accuracy")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title)
    return ax


def write_plots(run: Any, table: pd.DataFrame) -> list[Path]:
    """Write ``plots/asr_vs_ctr.png`` and one ``plots/certified_accuracy_<attack>.png`` per attack x rate
    into the comparison directory ``run`` (files recorded in its manifest); returns their paths."""

    written: list[Path] = []
    if not len(table):
        return written
    ok = table[(table["status"] == "ok") & table["asr"].notna()]
    panels = [k for k in CTR_KINDS if k[0] in ok and ok[k[0]].notna().any()] or [CTR_KINDS[0]]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.2, 4.8), squeeze=False)
    for i, (column, ylabel, title) in enumerate(panels):  # one panel per certificate kind: units never mixed
        plot_asr_vs_ctr(table, axes[0][i], title=title, column=column, ylabel=ylabel, legend=i == len(panels) - 1)
    rel = "plots/asr_vs_ctr.png"
    written.append(save_figure(axes[0][0], run.file(rel)))
    run.record_file(rel)
    rows = load_cells(run)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(attack_key(r["attack"], r.get("attack_params") or {}, r["poison_rate"]), []).append(r)
    for key, grp in groups.items():
        norms = [r["trigger_norm"] for r in grp if r.get("kind") in ("undefended", "purifier")
                 and r.get("trigger_norm") is not None]
        ax = plot_certified_curves(grp, trigger_norm=float(np.median(norms)) if norms else None,
                                   title=f"Certified accuracy, {grp[0]['attack']} at poison rate "
                                         f"{grp[0]['poison_rate']:g}")
        rel = f"plots/certified_accuracy_{key}.png"
        written.append(save_figure(ax, run.file(rel)))
        run.record_file(rel)
    return written
