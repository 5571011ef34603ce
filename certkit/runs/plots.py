"""The figures of a run directory: certified accuracy curves of its models (``plots/*.png``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certkit.certify.plots import _pyplot, plot_certified_accuracy, save_figure, settings_caption
from certkit.certify.results import CertificationResult
from certkit.runs.models import NOISE_SUFFIX, PURIFIED_PREFIX
from certkit.runs.rundir import RunDirectory

__all__ = ["plot_certified_rows", "write_plots", "write_purified_plot"]


def write_plots(run: RunDirectory, clean_results: Sequence[CertificationResult],
                trigger_norm: float | None = None, caption: str | None = None) -> Path:
    """``plots/certified_accuracy.png``: clean-set curves, with the radius caps and the (median) trigger norm
    marked and the settings in ``caption``; returns the path written (its suffix: the plot format)."""

    markers = [trigger_norm] if trigger_norm is not None and math.isfinite(trigger_norm) else None
    ax = plot_certified_accuracy(list(clean_results), markers=markers, marker_label="trigger l2 norm (median)",
                                 title="Test-time smoothing: clean test set", caption=caption)
    return save_figure(ax, run.file("plots/certified_accuracy.png"))


def write_purified_plot(run: RunDirectory, results: Sequence[tuple[str, Any]], trigger_norm: float | None = None,
                        caption: str | None = None) -> Path | None:
    """``plots/purified_certified_accuracy.png``: certified accuracy (clean test set, test-time smoothing) of
    the purified models, without (left) and with (right) the Gaussian noise fine-tune (one panel when only one
    kind was certified). ``results`` holds ``(model name, CertificationResult)`` pairs; returns the path, or
    None when no purified model is among them."""

    plain = [r for name, r in results if name.startswith(PURIFIED_PREFIX) and not name.endswith(NOISE_SUFFIX)]
    noisy = [r for name, r in results if name.startswith(PURIFIED_PREFIX) and name.endswith(NOISE_SUFFIX)]
    panels = [(g, t) for g, t in ((plain, "purified"), (noisy, "purified + noise fine-tune")) if g]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False, sharey=True)
    top = max(float(r.radius.max(initial=0.0)) for g, _ in panels for r in g)
    for k, (ax, (group, title)) in enumerate(zip(axes[0], panels)):
        plot_certified_accuracy(group, ax=ax, markers=[trigger_norm] if trigger_norm is not None else None,
                                marker_label="trigger l2 norm (median)", title=title,
                                caption=caption if k == 0 else None)
    right = max(ax.get_xlim()[1] for ax in axes[0])
    for ax in axes[0]:  # one radius scale for both panels
        ax.set_xlim(0.0, max(right, top))
    return save_figure(axes[0][0], run.file("plots/purified_certified_accuracy.png"))


def _rows_of(frame: pd.DataFrame, row: dict[str, Any], which: str = "clean") -> pd.DataFrame:
    """The ``points.csv`` rows of one summary row (model, base sigma, sigma mode) in set ``which``."""
    mode = row.get("sigma_mode", "fixed")
    sigma_col = frame["base_sigma"] if "base_sigma" in frame else frame["sigma"]
    sel = (frame["model"] == row["model"]) & (frame["set"] == which) & np.isclose(sigma_col, row["sigma"])
    if "sigma_mode" in frame:
        sel &= frame["sigma_mode"] == mode
    return frame[sel]


def plot_certified_rows(run: RunDirectory, rows: Sequence[dict[str, Any]], frame: pd.DataFrame) -> None:
    """Redraw ``plots/certified_accuracy.png`` (every certified row of the run) and the purified-model plot
    from ``summary.json``'s ``"certified"`` rows and ``points.csv``."""
    triggered = frame[frame["set"] == "triggered"]
    norm = float(triggered["trigger_norm"].median()) if len(triggered) else None
    results, named = [], []
    for row in rows:
        mode = row.get("sigma_mode", "fixed")
        suffix = "" if mode == "fixed" else " (sample-specific)"
        meta = {"name": f"{row['model']}, sigma={row['sigma']:g}{suffix}"}
        if mode == "fixed":  # Cohen's CERTIFY with one sigma: its radius cap is known
            meta.update(method="cohen-certify", n=row.get("n"), alpha=row.get("alpha"))
        result = CertificationResult.from_frame(_rows_of(frame, row), meta=meta)
        results.append(result)
        if mode == "fixed":
            named.append((row["model"], result))
    summary = run.read_summary() if "summary.json" in run.manifest["files"] else {}
    caption = settings_caption(
        dataset=(summary.get("dataset") or {}).get("name"), points=[len(r) for r in results],
        n=[row["n"] for row in rows if row.get("n") is not None] or None,
        n0=[row["n0"] for row in rows if row.get("n0") is not None] or None,
        alpha=[row["alpha"] for row in rows if row.get("alpha") is not None] or None,
        sigma=[row["sigma"] for row in rows],
        extra="sample-specific: base sigma" if any(r.get("sigma_mode", "fixed") != "fixed" for r in rows) else None)
    write_plots(run, results, norm, caption=caption)
    write_purified_plot(run, named, norm, caption=caption)
