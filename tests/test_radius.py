"""Specification of certkit.certify.radius: Gaussian certified radii (Cohen et al. 2019; RAB; Cert-SSB).

Reference values are docs/design.md section 9 / certification-notes.md section 7 (scipy 1.17, statsmodels 0.15).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from certkit.certify.bounds import clopper_pearson
from certkit.certify.radius import cohen_certify_counts, gaussian_radius, hoeffding_soft_radius
from certkit.errors import InputError

# ---------------------------------------------------------------- Cohen CERTIFY reference facts


def test_cohen_certify_all_votes_correct_gives_the_largest_radius():
    p_lower, radius, abstain = cohen_certify_counts(100_000, 100_000, 0.001, 1.0)
    assert p_lower == pytest.approx(0.9999309248330094, abs=1e-15)
    assert radius == pytest.approx(3.8114565633899145, abs=1e-12)
    assert not abstain


def test_cohen_certify_99_percent_votes():
    p_lower, radius, abstain = cohen_certify_counts(99_000, 100_000, 0.001, 1.0)
    assert p_lower == pytest.approx(0.9889893403774748, abs=1e-15)
    assert radius == pytest.approx(2.28999995521, abs=1e-10)
    assert not abstain


def test_cohen_certify_abstains_below_one_half():
    p_lower, radius, abstain = cohen_certify_counts([50_200, 50_500], 100_000, 0.001, 1.0)
    np.testing.assert_allclose(p_lower, [0.497109, 0.500109], atol=5e-7)
    np.testing.assert_array_equal(abstain, [True, False])
    assert radius[0] == 0.0 and radius[1] > 0.0


def test_cohen_maximum_radius_per_sigma_matches_the_published_zero_columns():
    sigmas = np.array([0.12, 0.25, 0.5, 1.0])
    _, radius, _ = cohen_certify_counts(100_000, 100_000, 0.001, sigmas)
    np.testing.assert_allclose(radius, [0.45737, 0.95286, 1.90573, 3.81146], atol=5e-6)


def test_cohen_ten_draws_certify_a_tiny_radius():
    p_lower, radius, abstain = cohen_certify_counts(10, 10, 0.001, 1.0)
    assert p_lower == pytest.approx(0.50119, abs=5e-6)
    assert radius == pytest.approx(0.00298, abs=5e-6)
    assert not abstain


def test_cohen_certify_equals_one_sided_clopper_pearson_and_gaussian_radius():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200_000, size=500)
    k = rng.integers(0, n + 1)
    sigma = rng.uniform(0.05, 2.0, size=500)
    p_lower, radius, abstain = cohen_certify_counts(k, n, 0.001, sigma)
    np.testing.assert_array_equal(p_lower, clopper_pearson(k, n, 0.001, "greater").low)
    np.testing.assert_allclose(radius, gaussian_radius(p_lower, sigma), rtol=1e-15, atol=0)
    np.testing.assert_array_equal(abstain, p_lower <= 0.5)  # abstain at p_lower <= 1/2 (was: < 1/2)
    assert np.all(radius[abstain] == 0.0)


def test_radius_is_continuous_at_the_abstention_threshold():
    # just above p_lower = 1/2 the point is certified with a radius close to 0, the abstention value
    _, radius, abstain = cohen_certify_counts(50_500, 100_000, 0.001, 1.0)
    assert not abstain and 0.0 < radius < 1e-3
    assert gaussian_radius(0.5, 1.0) == 0.0


def test_cohen_certify_shapes_and_types():
    p, r, a = cohen_certify_counts(90, 100, 0.01, 0.5)
    assert isinstance(p, np.float64) and isinstance(r, np.float64) and isinstance(a, np.bool_)
    counts = torch.tensor([[90, 40], [100, 80]])
    p, r, a = cohen_certify_counts(counts, 100, 0.01, torch.tensor([0.25, 0.5]))
    assert p.shape == r.shape == a.shape == (2, 2)
    assert a.dtype == np.bool_
    np.testing.assert_array_equal(a, [[False, True], [False, False]])


# ---------------------------------------------------------------- gaussian_radius


def test_binary_radius_equals_the_two_sided_formula_with_complement():
    p = np.linspace(0.5, 0.999999, 101)
    np.testing.assert_allclose(gaussian_radius(p, 0.7), gaussian_radius(p, 0.7, 1 - p), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(gaussian_radius(p, 0.7), 0.7 * stats.norm.ppf(p), rtol=1e-15, atol=0)


def test_rab_radius_reference_values():
    assert gaussian_radius(0.9, 1.0, 0.1) == pytest.approx(1.28155, abs=5e-6)
    assert gaussian_radius(0.99, 1.0, 0.01) == pytest.approx(2.32635, abs=5e-6)
    # no confidence bound (expected radius): 0.95 -> 1.64485, 0.99 -> 2.32635, 0.70 -> 0.52440
    np.testing.assert_allclose(
        gaussian_radius([0.95, 0.99, 0.70], 1.0), [1.64485, 2.32635, 0.52440], atol=5e-6
    )


def test_radius_is_zero_where_runner_up_bound_reaches_top_bound():
    assert gaussian_radius(0.5, 1.0) == 0.0
    assert gaussian_radius(0.3, 1.0) == 0.0
    np.testing.assert_array_equal(gaussian_radius([0.4, 0.6, 0.6], 2.0, [0.4, 0.7, 0.6]), [0.0, 0.0, 0.0])
    assert gaussian_radius(1.0, 1.0, 1.0) == 0.0


def test_radius_is_infinite_only_for_a_certain_top_class():
    assert gaussian_radius(1.0, 1.0) == math.inf
    assert gaussian_radius(1.0, 1.0, 0.2) == math.inf
    assert math.isfinite(gaussian_radius(0.9999999, 1.0))


def test_radius_scales_linearly_with_per_sample_sigma():
    sigma = np.array([0.12, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(gaussian_radius(0.9, sigma), sigma * gaussian_radius(0.9, 1.0), rtol=1e-15)
    np.testing.assert_allclose(
        gaussian_radius(0.9, torch.tensor(sigma), 0.05), sigma * gaussian_radius(0.9, 1.0, 0.05), rtol=1e-15
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p_a_lower": 1.1, "sigma": 1.0}, "p_a_lower must lie in"),
        ({"p_a_lower": -0.1, "sigma": 1.0}, "p_a_lower must lie in"),
        ({"p_a_lower": float("nan"), "sigma": 1.0}, "p_a_lower contains NaN"),
        ({"p_a_lower": 0.9, "sigma": 1.0, "p_b_upper": 2.0}, "p_b_upper must lie in"),
        ({"p_a_lower": 0.9, "sigma": 0.0}, "sigma must be strictly positive"),
        ({"p_a_lower": 0.9, "sigma": -1.0}, "sigma must be strictly positive"),
        ({"p_a_lower": 0.9, "sigma": float("nan")}, "sigma contains NaN"),
        ({"p_a_lower": 0.9, "sigma": float("inf")}, "sigma contains NaN or inf"),
        ({"p_a_lower": [0.9, 0.8], "sigma": [1.0, 2.0, 3.0]}, "shapes do not broadcast"),
    ],
)
def test_gaussian_radius_rejects_bad_input(kwargs, match):
    with pytest.raises(InputError, match=match):
        gaussian_radius(**kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((101, 100, 0.001, 1.0), "count_a must not exceed n"),
        ((-1, 100, 0.001, 1.0), "count_a must be >= 0"),
        ((5.5, 100, 0.001, 1.0), "count_a must be integer-valued"),
        ((5, 0, 0.001, 1.0), "n must be >= 1"),
        ((5, 100, 0.0, 1.0), "alpha"),
        ((5, 100, 1.0, 1.0), "alpha"),
        ((5, 100, float("nan"), 1.0), "alpha"),
        ((5, 100, 0.001, 0.0), "sigma"),
    ],
)
def test_cohen_certify_rejects_bad_input(args, match):
    with pytest.raises(InputError, match=match):
        cohen_certify_counts(*args)


# ---------------------------------------------------------------- Hoeffding soft-score radius


def test_soft_radius_reference_values_binary_bound_like_released_code():
    fixed = {"selected_from_scores": False}  # the released evaluator's convention: one bound at alpha
    radius = hoeffding_soft_radius([0.95, 0.99, 0.70, 1.0], 1000, 1e-3, 1.0, **fixed)
    np.testing.assert_allclose(radius, [1.23310, 1.48502, 0.36175, 1.5651856], atol=5e-6)
    assert radius[3] == pytest.approx(1.5651856, abs=5e-8)
    assert hoeffding_soft_radius(1.0, 200, 1e-3, 1.0, **fixed) == pytest.approx(1.1197364, abs=5e-8)
    # Cert-SSB MNIST one-pixel: the largest optimised sigma 0.2946 caps the radius at 0.4611
    assert hoeffding_soft_radius(1.0, 1000, 1e-3, 0.2946, **fixed) == pytest.approx(0.4611, abs=5e-5)
    # the class selected from the same scores: the bound is taken at alpha / 2 (default)
    assert hoeffding_soft_radius(0.95, 1000, 1e-3, 1.0) == pytest.approx(
        hoeffding_soft_radius(0.95, 1000, 5e-4, 1.0, **fixed), rel=1e-15)


def test_soft_radius_with_runner_up_splits_alpha_between_the_two_bounds():
    p_a = np.array([0.95, 0.99, 0.70])
    fixed = {"selected_from_scores": False}
    bonferroni = hoeffding_soft_radius(p_a, 1000, 1e-3, 1.0, p_b_mean=1 - p_a, **fixed)
    # released code (each bound at alpha) is reproduced by passing 2 * alpha
    released = hoeffding_soft_radius(p_a, 1000, 2e-3, 1.0, p_b_mean=1 - p_a, **fixed)
    np.testing.assert_allclose(released, [1.23310, 1.48502, 0.36175], atol=5e-6)
    assert np.all(bonferroni < released)
    h = math.sqrt(math.log(2 / 1e-3) / 2000)
    expected = 0.5 * (stats.norm.ppf(p_a - h) - stats.norm.ppf(1 - p_a + h))
    np.testing.assert_allclose(bonferroni, expected, rtol=1e-12)


def test_soft_radius_with_a_small_runner_up_beats_the_binary_bound():
    # three classes: (0.8, 0.05, 0.15 spread) -> bounding p_B separately certifies more
    assert hoeffding_soft_radius(0.8, 1000, 1e-3, 1.0, p_b_mean=0.05, selected_from_scores=False) > \
        hoeffding_soft_radius(0.8, 1000, 1e-3, 1.0, selected_from_scores=False)


def test_soft_radius_abstains_when_bounds_overlap():
    assert hoeffding_soft_radius(0.52, 1000, 1e-3, 1.0) == 0.0
    assert hoeffding_soft_radius(0.5, 1000, 1e-3, 1.0, p_b_mean=0.45) == 0.0


def test_soft_radius_rejects_bad_input_naming_it():
    with pytest.raises(InputError, match="p_a_mean must lie in"):
        hoeffding_soft_radius(1.2, 1000, 1e-3, 1.0)
    with pytest.raises(InputError, match="p_b_mean must lie in"):
        hoeffding_soft_radius(0.9, 1000, 1e-3, 1.0, p_b_mean=-0.2)
    with pytest.raises(InputError, match="alpha"):
        hoeffding_soft_radius(0.9, 1000, 0.0, 1.0)
    with pytest.raises(InputError, match="n must be >= 1"):
        hoeffding_soft_radius(0.9, 0, 1e-3, 1.0)
    with pytest.raises(InputError, match="sigma"):
        hoeffding_soft_radius(0.9, 1000, 1e-3, -1.0)


# ---------------------------------------------------------------- soundness on a linear classifier


def _linear_problem(seed: int, points: int, dim: int = 5):
    """Points near a hyperplane ``w.x + b = 0``: true distances and the exact smoothed top-class mass."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    b = rng.normal()
    x = rng.normal(size=(points, dim)) * 0.4
    distance = np.abs(x @ w + b) / np.linalg.norm(w)
    return w, b, x, distance


@pytest.mark.parametrize("sigma", [0.25, 1.0])
def test_radius_never_exceeds_distance_to_hyperplane(sigma):
    alpha, trials, n = 0.01, 4_000, 10_000
    _, _, _, distance = _linear_problem(11, 20)
    p_a = stats.norm.cdf(distance / sigma)  # exact top-class probability of the smoothed classifier
    rng = np.random.default_rng(12)
    counts = rng.binomial(n, p_a[:, None], size=(p_a.size, trials))
    _, radius, _ = cohen_certify_counts(counts, n, alpha, sigma)
    violation = (radius > distance[:, None]).mean(axis=1)
    assert np.all(violation <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials))


def test_radius_approaches_distance_to_hyperplane_as_n_grows():
    sigma, alpha = 0.5, 0.001
    _, _, _, distance = _linear_problem(21, 50)
    distance = distance[(distance > 0.05) & (distance < 1.5)]
    p_a = stats.norm.cdf(distance / sigma)
    rng = np.random.default_rng(22)
    gaps = []
    for n in (100, 10_000, 1_000_000):
        counts = rng.binomial(n, p_a[:, None], size=(p_a.size, 200))
        _, radius, _ = cohen_certify_counts(counts, n, alpha, sigma)
        assert (radius > distance[:, None]).mean() <= 2 * alpha
        gaps.append(np.median(distance[:, None] - radius))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.02 * sigma


def test_radius_from_real_gaussian_votes_of_a_linear_classifier_is_sound():
    sigma, n, alpha = 0.5, 20_000, 0.001
    w, b, x, distance = _linear_problem(31, 8)
    gen = torch.Generator().manual_seed(32)
    wt, xt = torch.as_tensor(w), torch.as_tensor(x)
    counts = []
    for i in range(x.shape[0]):
        noisy = xt[i] + sigma * torch.randn(n, w.size, generator=gen, dtype=torch.float64)
        side = torch.sign(noisy @ wt + b) == torch.sign(xt[i] @ wt + b)
        counts.append(int(side.sum()))
    counts = np.array(counts)
    # votes follow Binomial(n, Phi(distance / sigma))
    expected = n * stats.norm.cdf(distance / sigma)
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - expected / n)) + 1)
    _, radius, abstain = cohen_certify_counts(counts, n, alpha, sigma)
    assert np.all(radius <= distance)
    assert np.all(radius[~abstain] > 0)
