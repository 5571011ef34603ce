"""Specification of certkit.certify.bounds: exact Clopper-Pearson, Hoeffding and the p = 1/2 binomial test.

Reference values are docs/design.md section 9 / certification-notes.md section 7 (scipy 1.17, statsmodels 0.15).
"""

from __future__ import annotations

import ctypes
import math
import types
from dataclasses import FrozenInstanceError

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from numba import njit
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from certkit.certify import bounds
from certkit.certify.bounds import (
    ConfidenceInterval,
    binomtest_half_pvalue,
    clopper_pearson,
    cp_lower,
    cp_upper,
    hoeffding,
    hoeffding_halfwidth,
    norm_ppf,
)
from certkit.errors import InputError, UnknownNameError

NS = [1, 2, 5, 10, 100, 1_000, 10_000, 100_000, 1_000_000]
ALPHAS = [1e-15, 1e-12, 1e-8, 1e-3, 0.05, 0.25, 0.4999]


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (k, n, alpha) of the accuracy grid: k in {0, 1, n//3, n//2, n-1, n}."""
    rows = [
        (k, n, a)
        for n in NS
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
        for a in ALPHAS
    ]
    k, n, a = (np.array(c, dtype=np.float64) for c in zip(*rows))
    return k, n, a


# ---------------------------------------------------------------- agreement with statsmodels and scipy


def test_two_sided_matches_statsmodels_beta_method_on_grid():
    k, n, a = _grid()
    ci = clopper_pearson(k, n, a)
    ref = np.array(
        [proportion_confint(int(ki), int(ni), alpha=ai, method="beta") for ki, ni, ai in zip(k, n, a)]
    )
    np.testing.assert_allclose(ci.low, ref[:, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ci.high, ref[:, 1], rtol=0, atol=1e-12)


def test_one_sided_bounds_match_statsmodels_with_doubled_alpha():
    k, n, a = _grid()
    lower = clopper_pearson(k, n, a, alternative="greater")
    upper = clopper_pearson(k, n, a, alternative="less")
    ref = np.array(
        [proportion_confint(int(ki), int(ni), alpha=2 * ai, method="beta") for ki, ni, ai in zip(k, n, a)]
    )
    np.testing.assert_allclose(lower.low, ref[:, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(upper.high, ref[:, 1], rtol=0, atol=1e-12)
    assert np.all(lower.high == 1.0) and np.all(upper.low == 0.0)


def test_one_sided_bounds_match_scipy_beta_ppf_and_isf():
    k, n, a = _grid()
    with np.errstate(invalid="ignore"):
        ppf = np.where(k == 0, 0.0, stats.beta.ppf(a, k, n - k + 1))
        isf = np.where(k == n, 1.0, stats.beta.isf(a, k + 1, n - k))
    np.testing.assert_allclose(clopper_pearson(k, n, a, "greater").low, ppf, rtol=0, atol=1e-12)
    np.testing.assert_allclose(clopper_pearson(k, n, a, "less").high, isf, rtol=0, atol=1e-12)


def test_random_pairs_match_scipy_up_to_a_million_trials():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 1_000_001, size=2_000)
    k = rng.integers(0, n + 1)
    a = 10.0 ** rng.uniform(-15, math.log10(0.5), size=n.size)
    with np.errstate(invalid="ignore"):
        low = np.where(k == 0, 0.0, stats.beta.ppf(a, k, n - k + 1))
        high = np.where(k == n, 1.0, stats.beta.isf(a, k + 1, n - k))
    np.testing.assert_allclose(clopper_pearson(k, n, a, "greater").low, low, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(clopper_pearson(k, n, a, "less").high, high, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- closed forms and reference facts


@pytest.mark.parametrize("n", NS)
def test_closed_forms_at_the_extremes(n):
    a = np.array(ALPHAS)
    assert clopper_pearson(n, n, a, "greater").low == pytest.approx(np.exp(np.log(a) / n), rel=1e-14)
    assert clopper_pearson(0, n, a, "less").high == pytest.approx(-np.expm1(np.log(a) / n), rel=1e-14)
    assert clopper_pearson(1, n, a, "greater").low == pytest.approx(-np.expm1(np.log1p(-a) / n), rel=1e-14)
    assert clopper_pearson(n - 1, n, a, "less").high == pytest.approx(np.exp(np.log1p(-a) / n), rel=1e-14)
    assert np.all(clopper_pearson(0, n, a, "greater").low == 0.0)
    assert np.all(clopper_pearson(n, n, a, "less").high == 1.0)


def test_cohen_certify_reference_lower_bounds():
    assert clopper_pearson(100_000, 100_000, 0.001, "greater").low == pytest.approx(
        0.9999309248330094, abs=1e-15
    )
    assert clopper_pearson(99_000, 100_000, 0.001, "greater").low == pytest.approx(
        0.9889893403774748, abs=1e-15
    )
    assert clopper_pearson(50_200, 100_000, 0.001, "greater").low == pytest.approx(0.497109, abs=5e-7)
    assert clopper_pearson(50_500, 100_000, 0.001, "greater").low == pytest.approx(0.500109, abs=5e-7)


def test_clopper_pearson_reference_facts_at_alpha_1e3():
    assert clopper_pearson(100, 100, 0.001, "greater").low == pytest.approx(0.933254300796991, abs=1e-15)
    assert clopper_pearson(1000, 1000, 0.001, "greater").low == pytest.approx(0.9931160484209338, abs=1e-15)
    assert clopper_pearson(1, 100, 0.001, "greater").low == pytest.approx(1.0004953285956376e-05, rel=1e-14)
    assert clopper_pearson(0, 100, 0.001, "less").high == pytest.approx(0.06674569920300895, abs=1e-15)
    assert clopper_pearson(10, 10, 0.001, "greater").low == pytest.approx(0.50119, abs=5e-6)


def test_tiny_alpha_upper_bound_regressions_statsmodels_9141_and_9549():
    ci = clopper_pearson(0, 1000, alpha=1e-7)
    assert ci.low == 0.0
    assert ci.high == pytest.approx(0.01667072243152071, abs=1e-16)
    assert ci.high == pytest.approx(0.01667072243152068, rel=1e-14)  # exact 1 - (5e-8)**(1/1000)
    assert clopper_pearson(0, 500, alpha=0.001 / 501).high == pytest.approx(0.02725666331835489, abs=1e-16)


def test_upper_bound_uses_the_complement_not_ppf_of_one_minus_alpha():
    isf = clopper_pearson(0, 1000, 5e-8, "less").high
    assert isf == pytest.approx(stats.beta.isf(5e-8, 1, 1000), abs=1e-17)
    assert abs(isf - stats.beta.ppf(1 - 5e-8, 1, 1000)) > 1e-13  # the cancellation it avoids


# ---------------------------------------------------------------- shapes, types, broadcasting


def test_scalar_inputs_give_numpy_scalars_and_arrays_broadcast():
    ci = clopper_pearson(5, 10)
    assert isinstance(ci, ConfidenceInterval)
    assert isinstance(ci.low, np.float64) and isinstance(ci.high, float)
    low, high = ci  # tuple-style unpacking
    assert (low, high) == (ci.low, ci.high)
    grid = clopper_pearson(
        np.arange(6)[:, None], np.array([5, 10, 20]), alpha=np.array([[0.01], [0.05]])[:, None]
    )
    assert grid.low.shape == grid.high.shape == (2, 6, 3)
    assert grid.low.dtype == np.float64
    with pytest.raises(FrozenInstanceError):
        ci.low = 0.0  # type: ignore[misc]


def test_torch_lists_and_numpy_inputs_agree():
    k = [0, 3, 7, 10]
    expected = clopper_pearson(np.array(k), 10, 0.01)
    for kk in (k, torch.tensor(k), torch.tensor(k, dtype=torch.float32), np.array(k, dtype=np.int32)):
        ci = clopper_pearson(kk, torch.tensor(10), torch.tensor(0.01, dtype=torch.float64))
        np.testing.assert_array_equal(ci.low, expected.low)
        np.testing.assert_array_equal(ci.high, expected.high)
    assert clopper_pearson(3.0, 10.0).low == clopper_pearson(3, 10).low  # integer-valued floats are counts


def test_empty_input_gives_empty_interval():
    ci = clopper_pearson(np.array([], dtype=np.int64), 10)
    assert ci.low.shape == (0,) and ci.high.shape == (0,)


# ---------------------------------------------------------------- numba kernels


def test_kernels_are_callable_from_user_njit_code():
    @njit
    def certified_fraction(counts, n, alpha):
        hits = 0
        for c in counts:
            if cp_lower(c, n, alpha) >= 0.5 and cp_upper(c, n, alpha) <= 1.0:
                hits += 1
        return hits / counts.size, norm_ppf(cp_lower(n, n, alpha))

    frac, z = certified_fraction(np.array([50_200, 50_500, 100_000]), 100_000, 0.001)
    assert frac == pytest.approx(2 / 3)
    assert z == pytest.approx(3.8114565633899145, abs=1e-12)


def test_scalar_kernels_return_nan_outside_their_domain():
    assert math.isnan(cp_lower(11, 10, 0.01)) and math.isnan(cp_upper(-1, 10, 0.01))
    assert math.isnan(cp_lower(1, 0, 0.01)) and math.isnan(cp_lower(1, 10, 1.0))
    assert math.isnan(cp_upper(1, 10, float("nan")))
    assert norm_ppf(0.5) == 0.0 and norm_ppf(1.0) == math.inf
    assert norm_ppf(0.975) == pytest.approx(stats.norm.ppf(0.975), abs=1e-15)


# ---------------------------------------------------------------- properties

counts = st.integers(min_value=1, max_value=10**6).flatmap(
    lambda n: st.tuples(st.integers(min_value=0, max_value=n), st.just(n))
)
alphas = st.floats(min_value=1e-12, max_value=0.49)


@settings(max_examples=60, deadline=None)
@given(counts, alphas)
def test_interval_contains_the_point_estimate(kn, alpha):
    k, n = kn
    for alt in ("two-sided", "greater", "less"):
        ci = clopper_pearson(k, n, alpha, alt)
        assert 0.0 <= ci.low <= k / n <= ci.high <= 1.0


@settings(max_examples=60, deadline=None)
@given(counts, alphas)
@example((18014, 18015), 1e-12)  # found by hypothesis: the upper bound of k = n - 1 rounds to 1.0
def test_lower_bound_increases_with_k_and_upper_bound_too(kn, alpha):
    k, n = kn
    if k == n:
        k -= 1
    a = clopper_pearson(k, n, alpha, "greater").low
    b = clopper_pearson(k + 1, n, alpha, "greater").low
    assert a < b
    hi_k = clopper_pearson(k, n, alpha, "less").high
    hi_k1 = clopper_pearson(k + 1, n, alpha, "less").high
    if k + 1 == n and -np.log1p(-alpha) / n < 2.0**-52:
        # the exact upper bound (1 - alpha)^(1/n) of k = n - 1 is within about an ulp of 1: float64 cannot
        # separate it from the bound 1 of k = n
        assert 1.0 - 2.0**-52 <= hi_k <= hi_k1 == 1.0
    else:
        assert hi_k < hi_k1


@settings(max_examples=60, deadline=None)
@given(counts, alphas, st.integers(min_value=1, max_value=1000))
def test_more_trials_with_the_same_successes_lower_both_bounds(kn, alpha, extra):
    k, n = kn
    lo_n, lo_more = clopper_pearson(k, [n, n + extra], alpha, "greater").low
    up_n, up_more = clopper_pearson(k, [n, n + extra], alpha, "less").high
    assert lo_more <= lo_n
    if k == n and up_n == 1.0 and -np.log1p(-alpha) / (n + extra) < 2.0**-52:
        # k = n: the bound of n is exactly 1; the exact bound of n + extra, (1 - alpha)^(1/(n + extra)) for
        # extra = 1, is within an ulp of 1 and rounds to it in float64
        assert up_more <= up_n
    else:
        assert up_more < up_n


@settings(max_examples=60, deadline=None)
@given(counts, alphas, alphas)
def test_larger_alpha_gives_a_narrower_interval(kn, a1, a2):
    k, n = kn
    small, large = sorted((a1, a2))
    tol = 4 * np.finfo(float).eps
    lo_s, lo_l = clopper_pearson(k, n, [small, large], "greater").low
    up_s, up_l = clopper_pearson(k, n, [small, large], "less").high
    assert lo_s <= lo_l * (1 + tol)
    assert up_l <= up_s * (1 + tol)


# ---------------------------------------------------------------- Monte-Carlo coverage


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_coverage_of_one_sided_bounds_is_at_least_one_minus_alpha(n):
    rng = np.random.default_rng(1234 + n)
    alpha, trials = 0.05, 20_000
    slack = 3 * math.sqrt(alpha * (1 - alpha) / trials)
    for p in (0.01, 0.3, 0.5, 0.9, 0.999):
        k = rng.binomial(n, p, size=trials)
        assert np.mean(clopper_pearson(k, n, alpha, "greater").low > p) <= alpha + slack
        assert np.mean(clopper_pearson(k, n, alpha, "less").high < p) <= alpha + slack
        two = clopper_pearson(k, n, alpha)
        assert np.mean((two.low > p) | (two.high < p)) <= alpha + slack


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), [0.01, 0.0], np.array([0.5, np.nan])])
def test_alpha_outside_open_unit_interval_is_rejected(alpha):
    with pytest.raises(InputError, match="alpha"):
        clopper_pearson(1, 10, alpha)
    with pytest.raises(InputError, match="alpha"):
        hoeffding(0.5, 10, alpha)


@pytest.mark.parametrize(
    ("k", "n", "match"),
    [
        (11, 10, "k must not exceed n"),
        ([1, 12], 10, "k must not exceed n"),
        (1, 0, "n must be >= 1"),
        (-1, 10, "k must be >= 0"),
        (2.5, 10, "k must be integer-valued"),
        (2, 10.5, "n must be integer-valued"),
        (float("nan"), 10, "k contains NaN"),
        (1, float("inf"), "n contains infinite"),
        (torch.tensor([1.0, float("nan")]), 10, "k contains NaN"),
        ("3", 10, "k must be numeric"),
        (True, 10, "k must be numeric"),
    ],
)
def test_bad_counts_are_rejected_naming_the_argument(k, n, match):
    with pytest.raises(InputError, match=match):
        clopper_pearson(k, n, 0.01)


def test_shapes_that_do_not_broadcast_are_rejected():
    with pytest.raises(InputError, match=r"shapes do not broadcast: k \(3,\), n \(2,\)"):
        clopper_pearson(np.array([1, 2, 3]), np.array([10, 10]))


def test_unknown_alternative_lists_the_allowed_values():
    with pytest.raises(UnknownNameError, match="alternative.*'two-sided', 'greater', 'less'"):
        clopper_pearson(1, 10, 0.01, alternative="larger")
    with pytest.raises(UnknownNameError, match="alternative"):
        hoeffding(0.5, 10, 0.01, alternative="upper")


# ---------------------------------------------------------------- Hoeffding


def test_hoeffding_halfwidth_reference_values():
    assert hoeffding_halfwidth(1000, 0.001) == pytest.approx(0.0587697, abs=5e-8)
    assert hoeffding_halfwidth(200, 0.001) == pytest.approx(0.1314130, abs=5e-8)
    np.testing.assert_allclose(
        hoeffding_halfwidth([1000, 200], 0.001),
        np.sqrt(np.log(1000) / (2 * np.array([1000, 200]))),
        rtol=1e-15,
    )


def test_hoeffding_interval_sides_and_clipping():
    h = hoeffding_halfwidth(1000, 0.001)
    h2 = hoeffding_halfwidth(1000, 0.0005)
    ci = hoeffding([0.5, 0.99, 0.0], 1000, 0.001)
    np.testing.assert_allclose(ci.low, [0.5 - h2, 0.99 - h2, 0.0], rtol=1e-15)
    np.testing.assert_allclose(ci.high, [0.5 + h2, 1.0, h2], rtol=1e-15)
    assert tuple(hoeffding(0.95, 1000, 0.001, "greater")) == pytest.approx((0.95 - h, 1.0), rel=1e-15)
    assert tuple(hoeffding(0.05, 1000, 0.001, "less")) == pytest.approx((0.0, 0.05 + h), rel=1e-15)


@pytest.mark.parametrize(
    ("mean", "match"),
    [(1.1, "mean must lie in"), (-0.1, "mean must lie in"), (float("nan"), "mean contains NaN")],
)
def test_hoeffding_rejects_means_outside_unit_interval(mean, match):
    with pytest.raises(InputError, match=match):
        hoeffding(mean, 100, 0.01)
    with pytest.raises(InputError, match="n must be >= 1"):
        hoeffding_halfwidth(0, 0.01)


def test_hoeffding_coverage_for_bernoulli_means():
    rng = np.random.default_rng(7)
    n, alpha, trials = 200, 0.05, 20_000
    for p in (0.1, 0.5, 0.95):
        mean = rng.binomial(n, p, size=trials) / n
        assert np.mean(hoeffding(mean, n, alpha, "greater").low > p) <= alpha


# ---------------------------------------------------------------- binomial test


def test_binomtest_reference_facts():
    assert binomtest_half_pvalue(10, 10) == 0.001953125
    assert binomtest_half_pvalue(11, 11) == 0.0009765625
    assert binomtest_half_pvalue(510, 1000) == pytest.approx(0.54797, abs=5e-6)
    assert binomtest_half_pvalue(600, 1000) == pytest.approx(2.73e-10, rel=2e-3)
    assert binomtest_half_pvalue(5, 10) == 1.0


def test_binomtest_matches_scipy_for_every_k_of_small_n_and_random_large_n():
    pairs = [(k, n) for n in range(1, 61) for k in range(n + 1)]
    rng = np.random.default_rng(3)
    big_n = rng.integers(61, 1_000_001, size=150)
    pairs += [(int(rng.integers(0, n + 1)), int(n)) for n in big_n]
    pairs += [(int(n) // 2 + d, int(n)) for n in big_n[:40] for d in (-2, -1, 1, 2)]  # near the mode
    k, n = np.array(pairs).T
    ref = np.array([stats.binomtest(int(ki), int(ni), 0.5).pvalue for ki, ni in pairs])
    np.testing.assert_allclose(binomtest_half_pvalue(k, n), ref, rtol=1e-14, atol=0)


def test_binomtest_validates_counts():
    with pytest.raises(InputError, match="k must not exceed n"):
        binomtest_half_pvalue(5, 4)
    with pytest.raises(InputError, match="n must be >= 1"):
        binomtest_half_pvalue(0, 0)


# ---------------------------------------------------------------- resolving SciPy's C API


def _capsule(signature: bytes, keep: list) -> object:
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    buf = ctypes.create_string_buffer(signature)
    keep.append(buf)  # the capsule borrows its name
    return new(1, buf, None)


def test_scipy_names_resolve_to_double_precision_fused_exports():
    assert bounds._find_cython_double("betaincinv", 3) == ("__pyx_fuse_0betaincinv", True)
    assert bounds._find_cython_double("betainccinv", 3) == ("__pyx_fuse_0betainccinv", True)
    assert bounds._find_cython_double("ndtri", 1)[0] == "ndtri"


def test_scipy_name_resolution_falls_back_to_unfused_names(monkeypatch):
    keep: list = []
    capi = {
        "__pyx_fuse_1betaincinv": _capsule(b"float (float, float, float, int __pyx_skip_dispatch)", keep),
        "betaincinv": _capsule(b"double (double, double, double)", keep),
        "betainccinv": _capsule(b"double (double, double, double, int __pyx_skip_dispatch)", keep),
    }
    monkeypatch.setattr(bounds, "_cython_special", types.SimpleNamespace(__pyx_capi__=capi))
    assert bounds._find_cython_double("betaincinv", 3) == ("betaincinv", False)
    assert bounds._find_cython_double("betainccinv", 3) == ("betainccinv", True)
    with pytest.raises(ImportError, match="ndtri"):
        bounds._find_cython_double("ndtri", 1)


def test_large_inputs_are_deduplicated_without_changing_a_bit():
    # certification logs repeat counts; clopper_pearson computes each distinct (k, n) once
    from certkit.certify.bounds import cp_interval_array

    rng = np.random.default_rng(3)
    n = rng.choice([1000, 100_000], size=20_000).astype(float)
    k = np.minimum(n, rng.binomial(n.astype(int), 0.97)).astype(float)
    for alt, mode in (("two-sided", 0), ("greater", 1), ("less", 2)):
        ci = clopper_pearson(k, n, 1e-3, alternative=alt)
        low, high = cp_interval_array(k, n, np.full(k.size, 1e-3), mode)
        assert np.array_equal(ci.low, low) and np.array_equal(ci.high, high)
    # per-element alphas bypass de-duplication and still agree with the scalar-alpha call
    ci2 = clopper_pearson(k, n, np.full(k.size, 1e-3))
    assert np.array_equal(ci2.low, clopper_pearson(k, n, 1e-3).low)
