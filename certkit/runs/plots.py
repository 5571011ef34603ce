"""The figures of a run directory: certified accuracy curves of its models (``plots/*.png``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certkit.certify.plots import _pyplot, plot_certified_accuracy, save_figure
from certkit.certify.results import CertificationResult
from certkit.runs.models import NOISE_SUFFIX, PURIFIED_PREFIX
from certkit.runs.rundir import RunDirectory

__all__ = ["plot_certified_rows", "write_plots", "write_purified_plot"]


def write_plots(run: RunDirectory, clean_results: Sequence[CertificationResult],
                trigger_norm: float | None = None) -> Path:
    """``plots/certified_accuracy.png``: clean-set curves, with the (median) trigger norm marked."""

    markers = [trigger_norm] if trigger_norm is not None and math.isfinite(trigger_norm) else None
    ax = plot_certified_accuracy(list(clean_results), markers=markers, marker_label="trigger l2 norm (median)",
                                 title="Test-time smoothing: clean test set")
    if markers:
        ax.set_xlim(0, max(ax.get_xlim()[1], markers[0] * 1.1))
    return save_figure(ax, run.file("plots/certified_accuracy.png"))


def write_purified_plot(run: RunDirectory, results: Sequence[tuple[str, Any]], trigger_norm: float | None = None):
    """``plots/purified_certified_accuracy.png``: certified accuracy (clean test set, test-time smoothing) of
    the purified models, without (left) and with (right) the Gaussian noise fine-tune. ``results`` holds
    ``(model name, CertificationResult)`` pairs; returns the path, or None when no purified model is among them."""

    plain = [r for name, r in results if name.startswith(PURIFIED_PREFIX) and not name.endswith(NOISE_SUFFIX)]
    noisy = [r for name, r in results if name.startswith(PURIFIED_PREFIX) and name.endswith(NOISE_SUFFIX)]
    if not plain and not noisy:
        return None
    plt = _pyplot()
    _, axes = plt.subplots(1, 2, figsize=(11, 4))
    top = max([float(r.radius.max(initial=0.0)) for r in plain + noisy] + [trigger_norm or 0.0]) * 1.05 or 1.0
    markers = [trigger_norm] if trigger_norm is not None and math.isfinite(trigger_norm) else None
    for ax, group, title in ((axes[0], plain, "purified"), (axes[1], noisy, "purified + noise fine-tune")):
        if group:
            plot_certified_accuracy(group, ax=ax, max_radius=top, markers=markers,
                                    marker_label="trigger l2 norm (median)", title=title)
        else:
            ax.set_title(f"{title}: not certified")
            ax.set_axis_off()
    return save_figure(axes[0], run.file("plots/purified_certified_accuracy.png"))


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
        result = CertificationResult.from_frame(_rows_of(frame, row),
                                                meta={"name": f"{row['model']}, sigma={row['sigma']:g}{suffix}"})
        results.append(result)
        if mode == "fixed":
            named.append((row["model"], result))
    write_plots(run, results, norm)
    write_purified_plot(run, named, norm)
