"""Plots: radius caps, far trigger norms, the palette, captions, --format / --dpi, readable compare file names."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from scipy.stats import norm

from certkit.certify.plots import (
    PALETTE,
    plot_certified_accuracy,
    plot_options,
    radius_cap,
    save_figure,
    style,
)
from certkit.certify.radius import cohen_certify_counts
from certkit.certify.results import CertificationResult
from certkit.cli import build_parser, main
from certkit.errors import CertkitError, InputError


def cohen_result(sigma: float = 0.25, n: int = 200, alpha: float = 0.001, points: int = 120,
                 seed: int = 0) -> CertificationResult:
    """Cohen CERTIFY rows from made-up vote counts (some unanimous: those reach the radius cap)."""
    rng = np.random.default_rng(seed)
    k = np.minimum(n, rng.binomial(n, rng.beta(6, 1, points)))
    k[:5] = n
    p_lower, radius, abstain = cohen_certify_counts(k, n, alpha, sigma)
    label = rng.integers(0, 10, points)
    return CertificationResult(label=label, prediction=np.where(abstain, -1, label), radius=radius, p_lower=p_lower,
                               sigma=sigma, meta={"method": "cohen-certify", "n": n, "alpha": alpha,
                                                  "name": f"sigma={sigma:g}"})


def by_gid(ax, gid: str) -> list:
    return [a for a in [*ax.get_lines(), *ax.texts] if a.get_gid() == gid]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_radius_cap_is_sigma_times_the_quantile_of_alpha_to_the_one_over_n():
    res = cohen_result(sigma=0.25, n=200, alpha=0.001)
    want = 0.25 * norm.ppf(0.001 ** (1 / 200))
    assert radius_cap(res) == pytest.approx(want, rel=1e-9)
    assert res.radius.max() == pytest.approx(want, rel=1e-9)  # unanimous votes reach it exactly
    per_point = CertificationResult(label=res.label, prediction=res.prediction, radius=res.radius,
                                    p_lower=res.p_lower, sigma=np.linspace(0.2, 0.3, len(res)), meta=res.meta)
    assert radius_cap(per_point) is None  # no single cap when sigma differs per point
    assert radius_cap(CertificationResult(label=[0], prediction=[0], radius=[0.1], p_lower=[0.9], sigma=0.5)) is None


def test_an_ensembles_radius_cap_is_that_of_unanimous_members():
    from certkit.certify.ensemble import EnsembleVotes, certify_votes

    preds = np.zeros((20, 3), dtype=np.int64)
    preds[:3, 1] = 1  # two points not unanimous
    preds[:, 2] = 2
    soft = np.zeros((3, 10))
    soft[np.arange(3), [0, 0, 2]] = 20
    votes = EnsembleVotes(predictions=preds, soft_sum=soft, num_classes=10, meta={"sigma": 0.25})
    res = certify_votes(votes, np.array([0, 0, 2]), alpha=0.001)
    assert radius_cap(res) == pytest.approx(res.radius.max())
    assert res.radius[1] < radius_cap(res)


def test_the_cap_is_a_labelled_dashed_line_and_a_far_trigger_norm_an_edge_note():
    results = [cohen_result(0.25), cohen_result(0.5, seed=1)]
    ax = plot_certified_accuracy(results, markers=[4.0], marker_label="trigger l2 norm", caption="digits; n=200")
    caps = by_gid(ax, "radius-cap")
    assert sorted(c.get_xdata()[0] for c in caps) == pytest.approx([radius_cap(r) for r in results])
    assert all("radius cap" in c.get_label() for c in caps)
    assert [c.get_color() for c in caps] == [style(0)["color"], style(1)["color"]]  # each in its curve's colour
    # 4.0 is far beyond the largest cap (about 1.2): not a line, an annotation at the right edge
    assert not by_gid(ax, "trigger-norm")
    (note,) = by_gid(ax, "far-trigger-norm")
    assert note.get_text() == "trigger l2 norm 4 \u2192"
    assert ax.get_xlim()[1] < 1.5
    assert "dashed: radius cap" in ax.figure._certkit_caption.get_text()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["sigma=0.25", "sigma=0.5"]  # the curves first, the reference lines after them


def test_a_near_trigger_norm_is_a_line_inside_the_axis():
    res = cohen_result(0.25)
    ax = plot_certified_accuracy([res], markers=[radius_cap(res) * 1.3])
    (line,) = by_gid(ax, "trigger-norm")
    assert line.get_xdata()[0] < ax.get_xlim()[1]
    assert not by_gid(ax, "far-trigger-norm")
    ax = plot_certified_accuracy([res], markers=[0.9], max_radius=0.5)  # beyond an explicit axis end
    assert by_gid(ax, "far-trigger-norm") and ax.get_xlim() == (0.0, 0.5)
    ax = plot_certified_accuracy([res], caps=False)
    assert not by_gid(ax, "radius-cap")


def test_the_palette_is_okabe_ito_with_a_marker_per_series():
    assert PALETTE[0] == "#0072B2" and len(set(PALETTE)) == 8
    first = [style(i) for i in range(8)]
    assert len({s["color"] for s in first}) == 8 and len({s["marker"] for s in first}) == 8
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in (style(i) for i in range(32))}) == 32


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_plot_options_write_pdf_and_svg_with_their_suffix_and_the_same_bytes_twice(tmp_path, fmt, magic):
    outs = []
    for i in range(2):
        with plot_options(format=fmt):
            path = save_figure(plot_certified_accuracy([cohen_result()]), tmp_path / str(i) / "certified_accuracy.png")
        assert path.name == f"certified_accuracy.{fmt}" and path.read_bytes()[:len(magic)] == magic
        assert not path.with_suffix(".png").exists()
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]  # no creation date, no random element ids
    if fmt == "svg":
        assert b"<svg" in outs[0]


def test_dpi_sets_the_pixel_size_and_the_path_suffix_is_the_default_format(tmp_path):
    sizes = {}
    for dpi in (60, 120):
        with plot_options(dpi=dpi):
            path = save_figure(plot_certified_accuracy([cohen_result()]), tmp_path / f"d{dpi}.png")
        sizes[dpi] = png_size(path.read_bytes())
    assert abs(sizes[120][0] - 2 * sizes[60][0]) <= 4 and abs(sizes[120][1] - 2 * sizes[60][1]) <= 4
    default = png_size(save_figure(plot_certified_accuracy([cohen_result()]), tmp_path / "x").read_bytes())
    assert default[0] > 1000  # 200 dpi by default, not the old 720 x 480
    assert save_figure(plot_certified_accuracy([cohen_result()]), tmp_path / "x.svg").read_bytes()[:5] == b"<?xml"
    with pytest.raises(CertkitError, match="unknown format .gif."), plot_options(format="gif"):
        pass
    with pytest.raises(InputError, match="dpi must be"), plot_options(dpi=0):
        pass


def test_the_commands_that_write_plots_take_format_and_dpi(capsys):
    parser = build_parser()
    for argv in (["report", "r"], ["certify", "r"], ["compare"], ["ensemble", "certify", "r"], ["demo"]):
        args = parser.parse_args([*argv, "--format", "pdf", "--dpi", "300"])
        assert (args.plot_format, args.dpi) == ("pdf", 300), argv
    assert parser.parse_args(["report", "r"]).plot_format is None
    assert main(["report", "/nonexistent-run", "--dpi", "0"]) == 2
    assert "--dpi: dpi must be" in capsys.readouterr().err


def test_a_purified_plot_has_no_empty_panel(tmp_path):
    from certkit.runs.plots import write_purified_plot

    class Run:
        path = tmp_path

        def file(self, rel):
            return tmp_path / rel

    res = cohen_result()
    path = write_purified_plot(Run(), [("purified-ft", res), ("noise-0.25", res)], trigger_norm=2.0)
    assert path.is_file()
    with plot_options(format="svg"):  # only plain purified models: one panel (the figure is read back as SVG)
        path = write_purified_plot(Run(), [("purified-ft", res)], trigger_norm=2.0)
    assert path.suffix == ".svg" and path.read_text().count('id="axes_') == 1
    assert write_purified_plot(Run(), [("noise-0.25", res)]) is None


def _fake_comparison(out, fmt=None) -> None:
    """A comparison directory with made-up finished cells (no training), its table and plots rebuilt."""
    from certkit.runs.compare.grid import CompareSpec, _open_dir, report

    spec = CompareSpec.from_dict(dict(model="digits-cnn", attacks=["badnets", {"name": "blended", "params": {"alpha": 0.2}}],
                                      defenses=["undefended", "ft", "rab"], n=200, alpha=0.001, sigma=0.25,
                                      max_points=40))
    run = _open_dir(out, spec)
    rng = np.random.default_rng(0)
    for c in spec.cells():
        kind = {"undefended": "undefended", "ft": "purifier"}.get(c["defense"], c["defense"])
        run.write_json(f"cells/{c['id']}.json", {
            "cell_id": c["id"], "attack": c["attack"], "attack_params": c["attack_params"],
            "poison_rate": c["poison_rate"], "defense": c["defense"], "spec_sha256": spec.sha256(), "kind": kind,
            "status": "ok", "reason": "", "ca": 0.9, "asr": float(rng.uniform()), "ctr": float(rng.uniform()),
            "trigger_norm": 4.0, "wall_s": 1.0,
            "curve": {"n_points": 40, "correct_radii": sorted(rng.uniform(0, 0.4, 30).round(6).tolist())}})
    with plot_options(format=fmt):
        report(out, replot=True)


def test_compare_plots_have_readable_unique_names_and_are_recorded(tmp_path):
    from certkit.runs.compare.plots import attack_label, plot_key
    from certkit.runs.compare.spec import attack_key
    from certkit.runs.rundir import RunDirectory

    _fake_comparison(tmp_path / "cmp")
    run = RunDirectory.open(tmp_path / "cmp")
    names = sorted(p.name for p in (tmp_path / "cmp" / "plots").iterdir())
    assert names == ["asr_vs_ctr.png", "certified_accuracy_badnets-p0.1.png",
                     "certified_accuracy_blended-alpha0.2-p0.1.png"]
    hashed = attack_key("blended", {"alpha": 0.2}, 0.1)
    assert not any(re.search(r"[0-9a-f]{8}", n) for n in names) and hashed.split("-")[1] not in "".join(names)
    assert {f"plots/{n}" for n in names} <= set(run.manifest["files"]) and not run.verify()
    assert plot_key("badnets", {}, 0.1) == attack_key("badnets", {}, 0.1) == "badnets-p0.1"
    assert plot_key("wanet", {"k": 4, "grid": [1, 2]}, 0.05) == "wanet-grid1x2-k4-p0.05"
    assert attack_label("blended", {"alpha": 0.2}, 0.1) == "blended (alpha=0.2) at poison rate 0.1"
    _fake_comparison(tmp_path / "pdf", fmt="pdf")
    assert sorted(p.suffix for p in (tmp_path / "pdf" / "plots").iterdir()) == [".pdf"] * 3


def test_the_asr_vs_ctr_scatter_labels_its_points_and_draws_only_panels_with_values():
    import pandas as pd

    from certkit.runs.compare.plots import plot_asr_vs_ctr, plot_certified_curves

    table = pd.DataFrame({"attack": ["badnets"] * 3, "poison_rate": [0.1] * 3, "defense": ["undefended", "ft", "nad"],
                          "status": ["ok"] * 3, "asr": [1.0, 0.1, 0.11], "ctr": [0.0, 0.3, 0.31]})
    ax = plot_asr_vs_ctr(table)
    labels = sorted(t.get_text() for t in ax.texts if t.get_gid() == "point-label")
    assert labels == ["ft, nad", "undefended"]  # points on top of each other share a label
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["badnets @ 0.1"]  # the defenses are named on the points, the legend shows the attacks
    rows = [{"defense": "ft", "kind": "purifier", "status": "ok", "curve": {"n_points": 4, "correct_radii": [0.1]}}]
    ax = plot_certified_curves(rows, trigger_norm=3.0)
    assert "ensemble" not in ax.get_xlabel() and "joint" not in ax.get_xlabel()
    assert [t.get_text() for t in ax.texts if t.get_gid() == "far-trigger-norm"] == ["trigger l2 norm (median) 3 \u2192"]
