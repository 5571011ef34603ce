"""CertificationResult: curves, ACR, abstain rate, serialisation; checked against Cohen et al.'s logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from certkit.certify.results import CertificationResult
from certkit.errors import InputError

DATA = Path(__file__).parent / "data" / "cohen2019-cifar10-certify"

# The paper's CIFAR-10 table (shared/reference-data/README.md): certified accuracy at r for each sigma.
PUBLISHED = {
    "0.12": [0.81, 0.59, 0.00, 0, 0, 0, 0],
    "0.25": [0.75, 0.60, 0.43, 0.27, 0.00, 0, 0],
    "0.50": [0.65, 0.55, 0.41, 0.32, 0.23, 0.09, 0.00],
    "1.00": [0.47, 0.39, 0.34, 0.28, 0.22, 0.14, 0.10],
}
RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]


def load_cohen(sigma: str) -> CertificationResult:
    frame = pd.read_csv(DATA / f"sigma_{sigma}.tsv", sep="\t")
    frame = frame.rename(columns={"idx": "index", "predict": "prediction"})
    frame["sigma"] = float(sigma)
    return CertificationResult.from_frame(frame, meta={"name": f"Cohen et al. sigma={sigma}"})


@pytest.mark.parametrize("sigma", sorted(PUBLISHED))
def test_cohen_logs_reproduce_published_cifar10_table(sigma):
    res = load_cohen(sigma)
    assert len(res) == 500
    got = np.round(res.certified_accuracy(RADII), 2)
    np.testing.assert_allclose(got, PUBLISHED[sigma], atol=1e-12)


def test_cohen_sigma025_abstention_and_accuracy_facts():
    # certification-notes fact 8: abstention 43/500 = 0.086; certified accuracy 0.75 at r = 0
    res = load_cohen("0.25")
    assert res.abstain_rate() == pytest.approx(43 / 500)
    assert res.certified_accuracy(0.0) == pytest.approx(0.75, abs=0.005)


def test_correct_column_agrees_with_prediction_equals_label():
    frame = pd.read_csv(DATA / "sigma_0.50.tsv", sep="\t")
    res = load_cohen("0.50")
    np.testing.assert_array_equal(res.correct, frame["correct"].to_numpy().astype(bool))
    recomputed = (frame["predict"] == frame["label"]).to_numpy()
    np.testing.assert_array_equal(res.correct, recomputed)


def test_acr_is_mean_of_radius_times_correct():
    res = load_cohen("1.00")
    frame = pd.read_csv(DATA / "sigma_1.00.tsv", sep="\t")
    assert res.acr() == pytest.approx(float((frame["radius"] * frame["correct"]).mean()), rel=1e-12)


def test_certified_accuracy_is_nonincreasing_in_radius():
    res = load_cohen("0.50")
    acc = res.certified_accuracy(np.linspace(0, 3, 301))
    assert np.all(np.diff(acc) <= 0)


def small_result() -> CertificationResult:
    return CertificationResult(
        label=[0, 1, 2, 1], prediction=[0, -1, 2, 0], radius=[0.5, 0.0, 1.0, 0.2],
        p_lower=[0.9, 0.4, 0.99, 0.7], sigma=[0.25, 0.25, 0.5, 0.5], triggered=[False, False, True, True],
        trigger_norm=[0.3, np.nan, 0.1, 2.0], meta={"alpha": 0.001},
    )


def test_default_correct_excludes_abstentions_and_wrong_predictions():
    res = small_result()
    np.testing.assert_array_equal(res.correct, [True, False, True, False])
    assert res.abstain_rate() == 0.25
    assert res.certified_accuracy([0.0, 0.5, 0.75, 1.0, 1.01]).tolist() == [0.5, 0.5, 0.25, 0.25, 0.0]
    assert res.acr() == pytest.approx((0.5 + 1.0) / 4)


def test_csv_and_json_round_trips(tmp_path):
    res = small_result()
    back = CertificationResult.from_csv(res.to_csv(tmp_path / "points.csv"))
    back_json = CertificationResult.from_json(res.to_json(tmp_path / "points.json"))
    for other in (back, back_json):
        for col in ("label", "prediction", "radius", "p_lower", "sigma", "correct", "triggered", "index"):
            np.testing.assert_array_equal(getattr(other, col), getattr(res, col))
        np.testing.assert_array_equal(np.isnan(other.trigger_norm), np.isnan(res.trigger_norm))
    assert back_json.meta == {"alpha": 0.001}


def test_subset_and_concat():
    res = small_result()
    both = CertificationResult.concat([res.subset([0, 1]), res.subset(np.array([False, False, True, True]))])
    np.testing.assert_array_equal(both.radius, res.radius)
    assert len(both) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"radius": [0.1, -1.0]}, "non-negative"),
        ({"radius": [0.1, np.nan]}, "finite"),
        ({"label": [0, 1, 2]}, "label has 3 entries"),
        ({"correct": [True, True], "prediction": [0, -1]}, "abstaining"),
    ],
)
def test_invalid_rows_are_rejected(kwargs, message):
    base = {"label": [0, 1], "prediction": [0, 1], "radius": [0.1, 0.2], "p_lower": [0.9, 0.9], "sigma": [0.5, 0.5]}
    base.update(kwargs)
    with pytest.raises(InputError, match=message):
        CertificationResult(**base)


def test_plot_draws_one_line_per_result(tmp_path):
    from certkit.certify.plots import plot_certified_accuracy, save_figure

    results = [load_cohen(s) for s in ("0.25", "0.50")]
    ax = plot_certified_accuracy(results, labels=["0.25", "0.50"], markers=[0.5])
    lines = [ln for ln in ax.get_lines() if ln.get_label() in ("0.25", "0.50")]
    assert len(lines) == 2
    # the drawn curve is the certified accuracy at every plotted radius, jumps included
    x, y = lines[1].get_data()
    np.testing.assert_array_equal(y, results[1].certified_accuracy(x))
    assert set(results[1].radius[results[1].correct]) <= set(x)
    out = save_figure(ax, tmp_path / "plots" / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax2 = results[0].plot(label="one")
    assert ax2.get_legend().get_texts()[0].get_text() == "one"
