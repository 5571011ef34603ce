"""Plots of a comparison directory (:mod:`certkit.compare`).

* ``plots/asr_vs_ctr.png``: for every finished cell, the empirical ASR of the defended model (x) against its
  certified trigger robustness (y), one panel per certificate kind that has values (l2 smoothing, patch,
  poisoning count; each CTR in its own unit), one colour per defense (the same in every plot of the
  directory), one marker per attack, and the defense's name next to its point. Points near the top left are
  defenses whose empirical and certified pictures agree; a point at the bottom left is a defense that looks
  good empirically but certifies nothing at the trigger's norm.
* ``plots/certified_accuracy_<attack>.png``: certified accuracy against l2 radius for every defense of one
  attack x poison rate (``<attack>``: :func:`plot_key`, e.g. ``badnets-p0.1``), with the radius caps and the
  median trigger norm marked (annotated at the right edge when far beyond the certified radii).

Each figure has its settings (dataset, points, n, alpha, sigma) on a caption line; the format and resolution
follow :func:`certkit.certify.plots.plot_options` (``--format``, ``--dpi``).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from certkit.certify.plots import (
    MARKERS,
    _pyplot,
    add_caption,
    after_layout,
    legend_curves_first,
    mark_radius_axis,
    marker_positions,
    radius_axis_end,
    radius_cap_label,
    save_figure,
    settings_caption,
    style,
)
from certkit.certify.radius import cohen_certify_counts
from certkit.runs.compare.table import load_cells
from certkit.runs.rundir import RunDirectory

#: the kinds of cell whose radius is not the plain l2 radius of the input, and its unit
ENSEMBLE_KINDS = {"rab": "joint l2", "cert-ssb": "test-sigma units"}


def certified_curve(curve: Mapping[str, Any], radii: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius from a cell's ``curve`` (``n_points`` and the sorted radii of the
    correctly certified points): the fraction of points correct with ``radius >= r``."""
    n = int(curve.get("n_points") or 0)
    if n == 0:
        return np.full(len(radii), np.nan)
    correct = np.sort(np.asarray(curve.get("correct_radii") or [], dtype=np.float64))
    return (len(correct) - np.searchsorted(correct, np.asarray(radii, dtype=np.float64), side="left")) / n


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "x".join(_value(x) for x in v)
    if isinstance(v, Mapping):
        return "_".join(f"{k}{_value(x)}" for k, x in sorted(v.items()))
    return str(v)


def attack_label(name: str, params: Mapping[str, Any] | None = None, rate: float | None = None) -> str:
    """A readable name of an attack (and poison rate) for titles and legends, e.g. ``blended (alpha=0.2) at
    poison rate 0.1``."""
    text = name + (" (" + ", ".join(f"{k}={_value(v)}" for k, v in sorted((params or {}).items())) + ")"
                   if params else "")
    return text if rate is None else f"{text} at poison rate {rate:g}"


def plot_key(name: str, params: Mapping[str, Any] | None, rate: float, *, limit: int = 40) -> str:
    """A readable, file-safe key of an attack at a poison rate for plot file names, e.g. ``badnets-p0.1`` or
    ``blended-alpha0.2-p0.1`` (parameters shortened to ``limit`` characters; :func:`write_plots` adds a
    number when two keys of one directory coincide)."""
    tag = "-".join(f"{k}{_value(v)}" for k, v in sorted((params or {}).items()))
    tag = re.sub(r"[^A-Za-z0-9._-]+", "", tag)[:limit].strip("-.")
    return "-".join(p for p in (re.sub(r"[^A-Za-z0-9._-]+", "", name), tag, f"p{rate:g}") if p)


#: the CTR columns of a comparison, one ASR-vs-CTR panel each: (column, axis label, panel title)
CTR_KINDS: tuple[tuple[str, str, str], ...] = (
    ("ctr", "certified trigger robustness (l2 smoothing)", "l2 smoothing: radius >= trigger norm"),
    ("patch_ctr", "patch CTR (certified at the trigger's side)", "patch certificates: side >= trigger side"),
    ("ctr_samples", "poisoning CTR (radius >= poisoned samples)", "aggregation: radius >= poisoned count"),
)


def _colours(defenses: Sequence[str], colours: Mapping[str, int] | None) -> dict[str, int]:
    out = dict(colours or {})
    for d in defenses:
        out.setdefault(d, len(out))
    return out


#: where a point's label may go, tried in this order: offsets (points) from the point
_LABEL_OFFSETS = ((7, 0), (-7, 0), (5, 8), (5, -8), (-5, 8), (-5, -8), (0, 13), (0, -13), (6, 19), (6, -19),
                  (-6, 19), (-6, -19), (0, 26), (0, -26), (8, 32), (-8, 32), (8, -32), (-8, -32))


def _label_points(ax: Any, points: Sequence[tuple[float, float, str]], *, near: float = 0.02) -> None:
    """Write each defense's name next to its point, in small type. Points closer than ``near`` (axis units)
    share one label ("ft, fst, nad"); each label takes the first place around its point (right, left, above,
    below, further out) that covers no other label, no marker and does not leave the axes (crudely: the
    extents are measured before the final layout)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    for old in [t for t in ax.texts if t.get_gid() == "point-label"]:  # placed again in the final layout
        old.remove()
    clusters: list[dict[str, Any]] = []
    for x, y, name in sorted(points, key=lambda p: (p[0], p[1])):
        for c in clusters:
            if abs(c["x"] - x) <= near and abs(c["y"] - y) <= near:
                c["xs"].append(x)
                c["ys"].append(y)
                if name not in c["names"]:
                    c["names"].append(name)
                break
        else:
            clusters.append({"x": x, "y": y, "xs": [x], "ys": [y], "names": [name]})
    try:
        renderer = ax.figure.canvas.get_renderer()
    except AttributeError:  # a canvas that cannot measure text: labels go to the right of their points
        renderer = None
    pad = 4.5 * ax.figure.dpi / 72  # about a marker's radius, in pixels
    taken = [Bbox.from_bounds(px - pad, py - pad, 2 * pad, 2 * pad)
             for px, py in ax.transData.transform([(p[0], p[1]) for p in points])] if points else []
    frame = ax.get_window_extent(renderer) if renderer is not None else None
    for c in clusters:
        x0, y0 = float(np.mean(c["xs"])), float(np.mean(c["ys"]))
        text = textwrap.fill(", ".join(c["names"]), 28)
        best, best_score, best_box = None, math.inf, None
        for dx, dy in _LABEL_OFFSETS:
            t = ax.annotate(text, xy=(x0, y0), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            color="0.15", gid="point-label", ha="left" if dx > 0 else "right" if dx < 0 else "center",
                            va="center" if dy == 0 else "bottom" if dy > 0 else "top",
                            arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.5, "shrinkA": 0,
                                        "shrinkB": 4} if abs(dy) > 10 else None)
            if renderer is None:
                best = t
                break
            t.update_positions(renderer)
            box = Text.get_window_extent(t, renderer).padded(1.5)  # the text's own box, not its leader line
            score = sum(box.overlaps(b) for b in taken) + (0 if frame.contains(box.x0, box.y0)
                                                            and frame.contains(box.x1, box.y1) else 3)
            if score < best_score:
                if best is not None:
                    best.remove()
                best, best_score, best_box = t, score, box
            else:
                t.remove()
            if score == 0:
                break
        if best_box is not None:
            taken.append(best_box)


def plot_asr_vs_ctr(table: pd.DataFrame, ax: Any = None, title: str | None = None, *, column: str = "ctr",
                    ylabel: str = "certified trigger robustness (smoothed)", legend: bool = True,
                    colours: Mapping[str, int] | None = None, labels: bool = True) -> Any:
    """Empirical ASR against a certified trigger robustness column (``ctr``, ``patch_ctr`` or
    ``ctr_samples``), one point per finished cell that has it: the defense's colour (``colours``: defense ->
    :func:`~certkit.certify.plots.style` index; default: table order), the attack's marker and, with
    ``labels``, the defense's name next to the point (the legend then lists the attacks only)."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    if column not in table:
        table = table.assign(**{column: np.nan})
    ok = table[(table["status"] == "ok") & table["asr"].notna() & table[column].notna()]
    groups = list(dict.fromkeys(zip(ok["attack"], ok["poison_rate"])))
    index = _colours(list(dict.fromkeys(table["defense"])), colours)
    points = []
    for d in dict.fromkeys(ok["defense"]):
        for g_i, (a, p) in enumerate(groups):
            sel = ok[(ok["defense"] == d) & (ok["attack"] == a) & (ok["poison_rate"] == p)]
            if len(sel):
                ax.scatter(sel["asr"], sel[column], color=style(index[d])["color"], marker=MARKERS[g_i % len(MARKERS)],
                           s=55, edgecolor="black", linewidth=0.5, zorder=3, label=None if labels else d)
                points += [(float(x), float(y), d) for x, y in zip(sel["asr"], sel[column])]
    for g_i, (a, p) in enumerate(groups):  # marker legend for the attacks
        ax.scatter([], [], color="white", edgecolor="black", marker=MARKERS[g_i % len(MARKERS)],
                   label=f"{a} @ {p:g}")
    ax.set_xlabel("empirical ASR of the defended model")
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.09, 1.04)
    ax.grid(alpha=0.3)
    if labels:
        _label_points(ax, points)
        after_layout(ax.figure, lambda: _label_points(ax, points))
    handles, names = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, names):
        seen.setdefault(lab, h)
    if seen and legend:
        ax.legend(seen.values(), seen.keys(), fontsize="x-small", loc="upper right",
                  title="attack @ poison rate" if labels else None, title_fontsize="x-small")
    ax.set_title(title or "Empirical ASR vs certified trigger robustness")
    return ax


def plot_certified_curves(rows: Sequence[Mapping[str, Any]], ax: Any = None, *, max_radius: float | None = None,
                          trigger_norm: float | None = None, title: str | None = None,
                          caps: Sequence[tuple[float, str, Any]] = (), colours: Mapping[str, int] | None = None,
                          caption: str | None = None) -> Any:
    """Certified accuracy vs radius for each finished cell in ``rows`` (one attack x rate), with the radius
    ``caps`` ``(radius, legend text, colour or None)`` and the median ``trigger_norm`` marked (a norm far
    beyond the certified radii is annotated at the right edge). Ensemble cells are in their own radius units
    (joint l2 or test-sigma), said in their legend entries and on the x label."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(8.6, 4.8))
    rows = [r for r in rows if r.get("status") == "ok" and r.get("curve")]
    index = _colours([r["defense"] for r in rows], colours)
    tops = [max(r["curve"]["correct_radii"] or [0.0]) for r in rows]
    right = radius_axis_end(max(tops + [1e-3]), max_radius=max_radius,
                            markers=[trigger_norm] if trigger_norm is not None else None, caps=caps)
    grid = np.linspace(0.0, right, 400)
    for r in rows:
        i = index[r["defense"]]
        acc = certified_curve(r["curve"], grid)
        unit = ENSEMBLE_KINDS.get(r.get("kind"))
        ax.plot(grid, acc, drawstyle="steps-post", linewidth=1.4, markersize=4,
                label=r["defense"] + (f" ({unit})" if unit else ""),
                **{**style(i), "markevery": marker_positions(grid, acc, right, i, count=6)})
    mark_radius_axis(ax, right, markers=[trigger_norm] if trigger_norm is not None else None,
                     marker_label="trigger l2 norm (median)", caps=caps)
    units = [f"{k}: {ENSEMBLE_KINDS[k]}" for k in dict.fromkeys(r.get("kind") for r in rows) if k in ENSEMBLE_KINDS]
    ax.set_xlabel("radius (l2, pixel units" + ("; " + ", ".join(units) if units else "") + ")")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    if rows:
        legend_curves_first(ax, fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title)
    add_caption(ax.figure, caption)
    return ax


def _ensemble_cap(run: Any, row: Mapping[str, Any], colour: Any) -> tuple[float, str, Any] | None:
    """The radius cap of a RAB cell, from its ensemble run's summary (None when unknown)."""
    try:
        summary = RunDirectory.open(Path(run.path) / "ensembles" / row["cell_id"]).read_summary()
    except Exception:  # noqa: BLE001 - a missing or unreadable sub-run only loses its cap line
        return None
    ens, data = summary.get("ensemble") or {}, summary.get("dataset") or {}
    if not ens.get("sigma") or not data.get("num_classes") or ens.get("noise", "fixed") != "fixed":
        return None
    stub = SimpleNamespace(sigma=np.array([float(ens["sigma"])]), meta={
        "method": f"ensemble-{ens.get('bound', 'clopper-pearson')}", "members": ens.get("members"),
        "num_classes": data["num_classes"], "alpha": ens.get("alpha", 0.001), "bound": ens.get("bound"),
        "selection_correction": ens.get("selection_correction", True), "radius_cap": ens.get("radius_cap")})
    cap = radius_cap_label(stub)
    return None if cap is None else (cap[0], f"{row['defense']}: {cap[1]}", colour)


def _caption(spec: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], extra: str | None = None) -> str:
    points = sorted({int(r["curve"]["n_points"]) for r in rows if r.get("status") == "ok" and r.get("curve")})
    members = spec.get("ensemble_members") if any(r.get("kind") in ENSEMBLE_KINDS for r in rows) else None
    return settings_caption(dataset=spec.get("dataset"), points=points or spec.get("max_points"), n=spec.get("n"),
                            n0=spec.get("n0"), alpha=spec.get("alpha"), sigma=spec.get("sigma"),
                            extra="; ".join(e for e in (f"ensembles: {members} members" if members else None, extra)
                                            if e))


def write_plots(run: Any, table: pd.DataFrame) -> list[Path]:
    """Write ``plots/asr_vs_ctr.png`` and one ``plots/certified_accuracy_<attack>.png`` per attack x rate
    (:func:`plot_key`) into the comparison directory ``run`` (files recorded in its manifest; suffix and
    resolution from :func:`~certkit.certify.plots.plot_options`); returns their paths."""
    written: list[Path] = []
    if not len(table):
        return written
    spec = dict((run.config or {}).get("compare") or {})
    colours = _colours(list(spec.get("defenses") or []) + list(dict.fromkeys(table["defense"])), None)
    rows = load_cells(run)
    plt = _pyplot()

    def save(ax: Any, rel: str) -> None:
        path = save_figure(ax, run.file(rel))
        run.record_file(path.relative_to(run.path).as_posix())
        written.append(path)

    ok = table[(table["status"] == "ok") & table["asr"].notna()]
    panels = [k for k in CTR_KINDS if k[0] in ok and ok[k[0]].notna().any()]  # no empty panels
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 0.6, 5.2), squeeze=False)
        heading = "Empirical ASR vs certified trigger robustness"
        for i, (column, ylabel, title) in enumerate(panels):  # one panel per certificate kind: units never mixed
            plot_asr_vs_ctr(table, axes[0][i], title=title if len(panels) > 1 else f"{heading}\n({title})",
                            column=column, ylabel=ylabel, legend=i == 0, colours=colours)
        if len(panels) > 1:
            fig.suptitle(heading)
        add_caption(fig, _caption(spec, rows, "ASR of the deployed (defended) model on triggered non-target "
                                              "test inputs; CTR: fraction of them certified correct at the "
                                              "trigger's size"))
        save(axes[0][0], "plots/asr_vs_ctr.png")
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        params = r.get("attack_params") or {}
        groups.setdefault((r["attack"], _value(params), r["poison_rate"]), []).append(r)
    used: set[str] = set()
    test_cap = None
    if spec.get("n") and spec.get("alpha") and spec.get("sigma"):
        value = float(cohen_certify_counts(int(spec["n"]), int(spec["n"]), float(spec["alpha"]),
                                           float(spec["sigma"]))[1])
        test_cap = (value, f"test-time smoothing: σ={float(spec['sigma']):g}, n={int(spec['n'])}", None)
    for grp in groups.values():
        if not any(r.get("status") == "ok" and r.get("curve") for r in grp):
            continue  # no empty plots
        first = grp[0]
        params = first.get("attack_params") or {}
        key = base = plot_key(first["attack"], params, first["poison_rate"])
        k = 2
        while key in used:  # readable keys of different parameters can coincide once shortened
            key, k = f"{base}-{k}", k + 1
        used.add(key)
        norms = [r["trigger_norm"] for r in grp if r.get("kind") in ("undefended", "purifier")
                 and r.get("trigger_norm") is not None]
        curves = [r for r in grp if r.get("status") == "ok" and r.get("curve")]
        caps = [test_cap] if test_cap and any(r.get("kind") in ("undefended", "purifier") for r in curves) else []
        caps += [c for r in curves if r.get("kind") == "rab"
                 for c in [_ensemble_cap(run, r, style(colours[r["defense"]])["color"])] if c is not None]
        ax = plot_certified_curves(grp, trigger_norm=float(np.median(norms)) if norms else None,
                                   title=f"Certified accuracy, {attack_label(first['attack'], params, first['poison_rate'])}",
                                   caps=caps, colours=colours,
                                   caption=_caption(spec, curves, "dashed vertical: radius cap, the largest radius "
                                                                   "any point can certify"))
        save(ax, f"plots/certified_accuracy_{key}.png")
    return written
