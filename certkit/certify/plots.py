"""Plots of certified accuracy against radius (several results on one axes).

Matplotlib is imported lazily with the non-interactive ``Agg`` backend when no display is set, so plots
work on headless machines and inside tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from certkit.errors import InputError
from certkit.io import atomic_write_bytes


def _pyplot() -> Any:
    import matplotlib

    if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(result: Any, max_radius: float | None = None, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Radii and certified accuracy, exact at every jump (accuracy is a step function of r)."""
    top = float(max_radius) if max_radius is not None else float(max(result.radius.max(initial=0.0), 1e-3) * 1.05)
    grid = np.linspace(0.0, top, points)
    jumps = result.radius[(result.radius > 0) & (result.radius <= top)]
    radii = np.unique(np.concatenate([grid, jumps, np.nextafter(jumps, np.inf)]))
    return radii, np.atleast_1d(result.certified_accuracy(radii))


def plot_certified_accuracy(
    results: Sequence[Any],
    labels: Sequence[str] | None = None,
    *,
    ax: Any = None,
    max_radius: float | None = None,
    title: str | None = None,
    markers: Sequence[float] | None = None,
    marker_label: str = "trigger l2 norm",
    **kwargs: Any,
) -> Any:
    """Certified accuracy vs l2 radius for each result on one axes.

    Args:
        results: the curves to draw.
        labels: legend entries (default: ``meta['name']`` or ``sigma=...``).
        ax: a matplotlib axes; a new figure is made when None.
        max_radius: right end of the x axis (default: largest radius plus 5%).
        title: axes title.
        markers: radii at which to draw dotted vertical lines (e.g. trigger norms).
        marker_label: legend entry of the marker lines.
    Returns the axes.
    """
    results = list(results)
    if not results:
        raise InputError("plot_certified_accuracy needs at least one result")
    if labels is not None and len(labels) != len(results):
        raise InputError(f"got {len(labels)} labels for {len(results)} results")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    if max_radius is None:
        max_radius = max(float(r.radius.max(initial=0.0)) for r in results) * 1.05 or 1.0
    for i, res in enumerate(results):
        if labels is not None:
            lab = labels[i]
        else:
            lab = res.meta.get("name") or f"sigma={np.nanmedian(res.sigma):g}"
        radii, acc = curve(res, max_radius=max_radius)
        ax.plot(radii, acc, label=lab, drawstyle="steps-post", **kwargs)
    for i, m in enumerate(markers or ()):
        ax.axvline(m, color="grey", linestyle=":", linewidth=1.5, label=marker_label if i == 0 else None)
    ax.set_xlabel("radius (l2, pixel units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(0.0, max_radius)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def save_figure(ax: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save the figure holding ``ax`` to ``path`` (parent folders created, atomic) and close it."""
    import io


    plt = _pyplot()
    fig = ax.figure
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
