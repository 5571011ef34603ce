"""Plots of certified accuracy against radius, and the figure conventions every certkit plot shares.

* :func:`style`: the one palette of certkit's figures, Okabe and Ito's colour-blind-safe colours with a marker
  per series (and, after eight series, another line style), so series stay distinct in grey and for readers
  with a colour vision deficiency.
* :func:`radius_cap`: the largest radius a result's certificate can give any point (all noise draws, or all
  members, vote for one class). Curves end in a cliff there; :func:`plot_certified_accuracy` marks it.
* Trigger norms far beyond the certified radii (more than :data:`FAR_MARKER` times the largest radius or
  cap) are annotated at the right edge ("trigger l2 norm 4 ->") instead of stretching the radius axis.
* :func:`add_caption`: the settings of a figure (dataset, points, n, alpha, sigma) on a line below it.
* :func:`save_figure` writes PNG, PDF or SVG at a chosen dpi; :func:`plot_options` sets format and dpi for
  every figure written inside it (the ``--format`` and ``--dpi`` flags of the commands that write plots).

Matplotlib is imported lazily with the non-interactive ``Agg`` backend when no display is set, so plots
work on headless machines and inside tests.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from certkit._validation import check_choice, check_positive_int
from certkit.certify.radius import cohen_certify_counts
from certkit.errors import InputError
from certkit.io import atomic_write_bytes

__all__ = ["FORMATS", "PALETTE", "PlotOptions", "add_caption", "after_layout", "curve", "figure_path", "legend_curves_first",
           "mark_radius_axis", "marker_positions", "plot_certified_accuracy", "plot_options", "radius_axis_end",
           "radius_cap", "radius_cap_label", "save_figure", "settings_caption", "style"]

#: Okabe & Ito (2008) colour-blind-safe colours, most distinct first (yellow, faint on white, last)
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
#: a trigger norm beyond this multiple of the largest radius (or radius cap) is annotated at the axis edge
FAR_MARKER = 1.5
#: file formats of :func:`save_figure`
FORMATS = ("png", "pdf", "svg")
DEFAULT_DPI = 200
CAPTION_FONTSIZE = 8
#: what the dashed radius-cap lines mean (added to a caption when caps are drawn)
CAP_NOTE = ("dashed: radius cap, the largest radius any point can certify (every noise draw, or every member, "
            "votes for its class)")


def style(i: int) -> dict[str, Any]:
    """Colour, marker and line style of the ``i``-th series of a figure: colours from :data:`PALETTE`, a
    marker per series (distinct without colour), and another line style every eight series."""
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]}


def _pyplot() -> Any:
    import matplotlib

    if not os.environ.get("DISPLAY") and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------ output options
@dataclass(frozen=True)
class PlotOptions:
    """File format (``png``, ``pdf``, ``svg``; ``None``: the suffix of the path given) and resolution."""

    format: str | None = None
    dpi: int | None = None

    def __post_init__(self) -> None:
        if self.format is not None:
            check_choice(self.format, FORMATS, "format")
        if self.dpi is not None:
            check_positive_int(self.dpi, "dpi")


_OPTIONS: ContextVar[PlotOptions | None] = ContextVar("certkit_plot_options", default=None)


def _current() -> PlotOptions:
    return _OPTIONS.get() or PlotOptions()


@contextmanager
def plot_options(format: str | None = None, dpi: int | None = None) -> Iterator[PlotOptions]:
    """Within this block :func:`save_figure` writes ``format`` files (the suffix of every plot path is replaced:
    ``plots/certified_accuracy.pdf``) at ``dpi`` (``None``: keep the enclosing setting)."""
    outer = _current()
    opts = PlotOptions(format if format is not None else outer.format, dpi if dpi is not None else outer.dpi)
    token = _OPTIONS.set(opts)
    try:
        yield opts
    finally:
        _OPTIONS.reset(token)


def figure_path(path: str | Path, format: str | None = None) -> Path:
    """``path`` with the suffix of the format that :func:`save_figure` will write there."""
    path = Path(path)
    fmt = format or _current().format or path.suffix.lstrip(".").lower() or "png"
    check_choice(fmt, FORMATS, "format")
    return path.with_suffix("." + fmt)


def add_caption(fig: Any, text: str | None) -> Any:
    """Write ``text`` (the figure's settings: dataset, points, n, alpha, sigma) in small type below the axes;
    :func:`save_figure` leaves room for it. Returns the text artist (None when ``text`` is empty)."""
    if not text:
        return None
    width = max(40, int(fig.get_figwidth() * 17))
    wrapped = "\n".join(textwrap.fill(part, width) for part in text.split("\n"))
    artist = fig.text(0.01, 0.01, wrapped, ha="left", va="bottom", fontsize=CAPTION_FONTSIZE, color="0.25",
                      gid="caption")
    fig._certkit_caption = artist
    return artist


def settings_caption(*, dataset: str | None = None, points: Any = None, n: Any = None, n0: Any = None,
                     alpha: Any = None, sigma: Any = None, extra: str | None = None) -> str:
    """One caption line from the settings that are known, e.g. ``digits, 540 test points; n=1000 noise draws
    (n0=100), α=0.001; σ=0.25``. Each setting may be a list (its distinct values are shown: ``σ=0.25/0.5``)."""

    def values(v: Any) -> str:
        vs = [v] if isinstance(v, (str, numbers.Real)) else list(dict.fromkeys(v))
        return "/".join(f"{x:g}" if isinstance(x, numbers.Real) else str(x) for x in vs)

    parts = []
    data = ", ".join(p for p in (dataset, f"{values(points)} test points" if points not in (None, []) else None) if p)
    if data:
        parts.append(data)
    if n is not None:
        parts.append(f"n={values(n)} noise draws" + (f" (n0={values(n0)})" if n0 is not None else "")
                     + (f", α={values(alpha)}" if alpha is not None else ""))
    elif alpha is not None:
        parts.append(f"α={values(alpha)}")
    if sigma not in (None, []):
        parts.append(f"σ={values(sigma)}")
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def save_figure(ax: Any, path: str | Path, dpi: int | None = None, *, format: str | None = None) -> Path:
    """Save the figure holding ``ax`` (parent folders created, atomic) and close it; returns the path written.

    The format is ``format``, else that of the enclosing :func:`plot_options`, else the suffix of ``path``
    (``png`` when it has none); the suffix of the path written is the format's. ``dpi`` likewise (default
    :data:`DEFAULT_DPI`; it sets the pixel size of a PNG and of the images inside a PDF or SVG). PDF and SVG
    files carry no creation date, so the same figure gives the same bytes."""
    opts = _current()
    path = figure_path(path, format)
    fmt = path.suffix.lstrip(".")
    dpi = check_positive_int(dpi if dpi is not None else opts.dpi or DEFAULT_DPI, "dpi")
    plt = _pyplot()
    fig = ax.figure
    caption = getattr(fig, "_certkit_caption", None)
    if caption is not None:
        lines = caption.get_text().count("\n") + 1
        bottom = min(0.4, (lines * CAPTION_FONTSIZE * 1.25 + 3) / (fig.get_figheight() * 72))
        fig.tight_layout(rect=(0, bottom, 1, 1))
    else:
        fig.tight_layout()
    for hook in getattr(fig, "_certkit_after_layout", ()):  # e.g. point labels placed in the final layout
        hook()
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)
    buf = io.BytesIO()
    with plt.rc_context({"svg.hashsalt": "certkit"}):  # SVG element ids from a fixed salt, not a random one
        fig.savefig(buf, dpi=dpi, format=fmt, bbox_inches="tight", pad_inches=0.05, metadata=metadata)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def after_layout(fig: Any, hook: Any) -> None:
    """Have :func:`save_figure` call ``hook()`` once the figure's final layout is set (before writing it):
    for artists placed by measuring the drawing, such as labels kept off each other."""
    if not hasattr(fig, "_certkit_after_layout"):
        fig._certkit_after_layout = []
    fig._certkit_after_layout.append(hook)


# ------------------------------------------------------------------------------------------ radius axis
def radius_cap(result: Any) -> float | None:
    """The largest radius ``result``'s certificate gives any point: every noise draw (Cohen et al.'s CERTIFY,
    ``meta`` with ``n`` and ``alpha``) or every member (ensembles, ``meta`` from
    :func:`~certkit.certify.ensemble.certify_votes`) votes for one class. ``None`` when the meta does not say,
    or when the points have different sigmas."""
    cap = radius_cap_label(result)
    return None if cap is None else cap[0]


def radius_cap_label(result: Any) -> tuple[float, str] | None:
    """``(cap, legend text saying what makes it)`` of :func:`radius_cap`, or None."""
    meta = getattr(result, "meta", None) or {}
    sigmas = np.unique(np.asarray(result.sigma, dtype=np.float64))
    if len(sigmas) != 1 or not (math.isfinite(sigmas[0]) and sigmas[0] > 0):
        return None
    sigma = float(sigmas[0])
    method = str(meta.get("method") or "")
    try:
        if method == "cohen-certify" and meta.get("n") and meta.get("alpha"):
            n, alpha = int(meta["n"]), float(meta["alpha"])
            cap = float(cohen_certify_counts(n, n, alpha, sigma)[1])
            return cap, f"σ={sigma:g}, n={n}"
        if method.startswith("ensemble-") and meta.get("radius_cap") is not None and meta.get("members"):
            # computed by certify_votes with the same bound, alpha and selection correction
            return float(meta["radius_cap"]), f"σ={sigma:g}, {int(meta['members'])} members"
    except (InputError, ValueError, TypeError):
        return None
    return None


def radius_axis_end(data_top: float, *, max_radius: float | None = None, markers: Sequence[float] | None = None,
                    caps: Sequence[tuple[float, str, Any]] = ()) -> float:
    """Right end of a radius axis: ``max_radius`` if given, else the largest of ``data_top`` (the largest
    radius drawn), the caps and the markers not far beyond them (:data:`FAR_MARKER`), plus 5%."""
    if max_radius is not None:
        return float(max_radius)
    top = max([float(data_top), 0.0] + [c[0] for c in _valid_caps(caps)])
    near = [m for m in _valid(markers) if top == 0.0 or m <= FAR_MARKER * top]
    return max([top] + near) * 1.05 or 1.0


def _valid(markers: Sequence[float] | None) -> list[float]:
    return [float(m) for m in (markers or ()) if m is not None and math.isfinite(m)]


def _valid_caps(caps: Sequence[tuple[float, str, Any]]) -> list[tuple[float, str, Any]]:
    return [c for c in caps if c[0] is not None and math.isfinite(c[0]) and c[0] > 0]


#: gids of the reference lines (listed after the curves in legends)
_REFERENCE = ("radius-cap", "trigger-norm")


def mark_radius_axis(ax: Any, right: float, *, markers: Sequence[float] | None = None,
                     marker_label: str = "trigger l2 norm", caps: Sequence[tuple[float, str, Any]] = ()) -> None:
    """Finish a radius axis whose curves are drawn: x from 0 to ``right`` (:func:`radius_axis_end`), each
    radius cap ``(radius, legend text, colour)`` a dashed line, each marker (a trigger norm) a dotted line.
    A marker beyond ``right`` is written at the right edge with an arrow ("trigger l2 norm 4 ->"), above the
    curves there when they leave room, instead of stretching the axis."""
    for value, text, colour in _valid_caps(caps):
        if value <= right:
            ax.axvline(value, color=colour if colour is not None else "0.35", linestyle=(0, (5, 2.5)),
                       linewidth=1.1, label=f"radius cap {value:.3g} ({text})", gid="radius-cap")
    markers = _valid(markers)
    shown = [m for m in markers if m <= right]
    for i, m in enumerate(shown):
        ax.axvline(m, color="0.45", linestyle=":", linewidth=1.6, label=marker_label if i == 0 else None,
                   gid="trigger-norm")
    far = sorted(m for m in markers if m > right)
    for m, y in zip(far, _free_bands(ax, right, len(far))):
        ax.annotate(f"{marker_label} {m:.3g} \u2192", xy=(0.995, y), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize="small", color="0.2", gid="far-trigger-norm",
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.9})
    ax.set_xlim(0.0, right)


def _free_bands(ax: Any, right: float, count: int, height: float = 0.075) -> list[float]:
    """Lower edges (data units, accuracy axis 0..1) of ``count`` bands at the right edge of ``ax`` that no
    curve crosses over the right 45% of the radius axis, lowest first (the bottom when none is free)."""
    ys = []
    for line in ax.get_lines():
        if line.get_gid() in _REFERENCE:
            continue
        x, y = (np.asarray(v, dtype=np.float64) for v in line.get_data())
        if len(x) and len(x) == len(y):
            ys.append(y[(x >= 0.55 * right) & np.isfinite(y)])
    occupied = np.concatenate(ys) if ys else np.zeros(0)
    free = [b for b in np.arange(0.03, 0.95, 0.02)
            if not ((occupied >= b - 0.015) & (occupied <= b + height)).any()]
    out: list[float] = []
    for b in free:
        if not out or b >= out[-1] + height + 0.01:
            out.append(float(b))
    out += [0.03 + (height + 0.01) * k for k in range(count - len(out))]
    return out[:count]


def curve(result: Any, max_radius: float | None = None, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Radii and certified accuracy, exact at every jump (accuracy is a step function of r)."""
    top = float(max_radius) if max_radius is not None else float(max(result.radius.max(initial=0.0), 1e-3) * 1.05)
    grid = np.linspace(0.0, top, points)
    jumps = result.radius[(result.radius > 0) & (result.radius <= top)]
    radii = np.unique(np.concatenate([grid, jumps, np.nextafter(jumps, np.inf)]))
    return radii, np.atleast_1d(result.certified_accuracy(radii))


def marker_positions(x: np.ndarray, y: np.ndarray, right: float, i: int = 0, count: int = 9) -> list[int]:
    """Indices of about ``count`` evenly spaced markers on a curve (staggered by series ``i`` so markers of
    overlapping curves do not sit on each other), none on the flat zero tail after the curve's last drop."""
    if not len(x):
        return []
    positive = np.flatnonzero(np.asarray(y) > 0)
    end = positive[-1] + 1 if len(positive) else 0
    extent = float(x[min(end, len(x) - 1)]) or right
    step = extent / count
    targets = np.arange(step * (0.15 + 0.1 * (i % 8)), extent, step)
    idx = np.unique(np.clip(np.searchsorted(x, targets), 0, len(x) - 1))
    return [int(j) for j in idx if j <= end]


def plot_certified_accuracy(
    results: Sequence[Any],
    labels: Sequence[str] | None = None,
    *,
    ax: Any = None,
    max_radius: float | None = None,
    title: str | None = None,
    markers: Sequence[float] | None = None,
    marker_label: str = "trigger l2 norm",
    caps: bool = True,
    caption: str | None = None,
    **kwargs: Any,
) -> Any:
    """Certified accuracy vs l2 radius for each result on one axes.

    Args:
        results: the curves to draw.
        labels: legend entries (default: ``meta['name']`` or ``sigma=...``).
        ax: a matplotlib axes; a new figure is made when None.
        max_radius: right end of the x axis (default: the largest radius, cap or near marker plus 5%).
        title: axes title.
        markers: radii at which to draw dotted vertical lines (e.g. trigger norms); one far beyond the
            certified radii is annotated at the right edge instead (see :func:`mark_radius_axis`).
        marker_label: legend entry of the marker lines.
        caps: mark each result's :func:`radius_cap` (a dashed line in its colour; grey when shared).
        caption: settings line below the figure (:func:`add_caption`).
        kwargs: passed to ``ax.plot`` (override the :func:`style` of each curve).
    Returns the axes.
    """
    results = list(results)
    if not results:
        raise InputError("plot_certified_accuracy needs at least one result")
    if labels is not None and len(labels) != len(results):
        raise InputError(f"got {len(labels)} labels for {len(results)} results")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    found: dict[float, list[Any]] = {}
    for i, res in enumerate(results):
        cap = radius_cap_label(res) if caps else None
        if cap is not None:
            found.setdefault(round(cap[0], 9), []).append((cap[0], cap[1], i))
    cap_list = [(v[0][0], v[0][1], style(v[0][2])["color"] if len(v) == 1 else None) for v in found.values()]
    data_top = max(float(r.radius.max(initial=0.0)) for r in results)
    right = radius_axis_end(data_top, max_radius=max_radius, markers=markers, caps=cap_list)
    for i, res in enumerate(results):
        lab = labels[i] if labels is not None else res.meta.get("name") or f"sigma={np.nanmedian(res.sigma):g}"
        radii, acc = curve(res, max_radius=right)
        kw = {**style(i), "markevery": marker_positions(radii, acc, right, i), "markersize": 4.5, "linewidth": 1.6,
              **kwargs}
        ax.plot(radii, acc, label=lab, drawstyle="steps-post", **kw)
    mark_radius_axis(ax, right, markers=markers, marker_label=marker_label, caps=cap_list)
    ax.set_xlabel("radius (l2, pixel units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    legend_curves_first(ax)
    if title:
        ax.set_title(title)
    add_caption(ax.figure, f"{caption}; {CAP_NOTE}" if caption and cap_list else caption)
    return ax


def legend_curves_first(ax: Any, **kwargs: Any) -> Any:
    """The legend with the curves first and the reference lines (caps, trigger norm) after them."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    ref = [h.get_gid() in _REFERENCE for h in handles]
    order = [i for i, r in enumerate(ref) if not r] + [i for i, r in enumerate(ref) if r]
    return ax.legend([handles[i] for i in order], [labels[i] for i in order],
                     **{"loc": "best", "fontsize": "small", **kwargs})
