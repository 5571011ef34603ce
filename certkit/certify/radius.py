"""Certified l2 radii of Gaussian randomized smoothing.

If ``P(f(x + sigma z) = A) >= pA_low`` and ``max_{B != A} P(f(x + sigma z) = B) <= pB_up`` for
``z ~ N(0, I)``, the smoothed classifier predicts ``A`` on the whole ball of radius

    ``R = sigma / 2 * (PhiInv(pA_low) - PhiInv(pB_up))``

(Cohen, Rosenfeld & Kolter, ICML 2019, Theorem 1, by the Neyman-Pearson lemma). With the binary bound
``pB_up = 1 - pA_low`` this is ``sigma * PhiInv(pA_low)``, computed in that form (one quantile, no
cancellation). Where ``pA_low <= pB_up`` nothing is certified: radius 0.

Three entry points:

- :func:`gaussian_radius`: the formula itself, for bounds obtained any way.
- :func:`cohen_certify_counts`: Cohen et al.'s CERTIFY from vote counts (one-sided Clopper-Pearson lower
  bound at ``alpha``, abstain when it is ``<= 1/2``), a parallel numba kernel.
- :func:`hoeffding_soft_radius`: mean soft scores (RAB, Weber et al. 2023; Cert-SSB, Qiao et al. 2025)
  bounded with Hoeffding's inequality.

``sigma`` is in input (pixel) units and the radius in the same units. The return convention is that of
:mod:`certkit.certify.bounds`: arrays of the broadcast shape, NumPy scalars when every input is a scalar.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange
from scipy.special import ndtri

from certkit._validation import check_sigma
from certkit.certify.bounds import (
    _broadcast,
    _check_alpha_array,
    _check_count,
    _check_one_sided_alpha,
    _check_probability,
    _shaped,
    cp_lower,
    hoeffding,
    norm_ppf,
)
from certkit.errors import InputError

__all__ = ["cohen_certify_counts", "gaussian_radius", "hoeffding_soft_radius"]


def _sigma_array(sigma: Any) -> np.ndarray:
    """``sigma`` (scalar or per-sample 1-D, finite, > 0) as a float64 ndarray."""
    return check_sigma(sigma).numpy()


def gaussian_radius(p_a_lower: Any, sigma: Any, p_b_upper: Any = None) -> Any:
    """Certified l2 radius ``sigma / 2 * (PhiInv(pA_low) - PhiInv(pB_up))`` (Cohen et al. 2019, Thm. 1).

    Args:
        p_a_lower: lower confidence bound on the top-class probability, in ``[0, 1]``.
        sigma: noise standard deviation (> 0, finite), scalar or per-sample 1-D, in input units.
        p_b_upper: upper bound on the runner-up probability, in ``[0, 1]``. ``None`` uses the binary bound
            ``1 - p_a_lower``, i.e. ``R = sigma * PhiInv(p_a_lower)``.

    Returns:
        Radius (input units) of the broadcast shape; 0 where ``p_a_lower <= p_b_upper`` (abstain),
        ``inf`` where ``p_a_lower == 1`` and ``p_b_upper < 1``. NumPy scalar when all inputs are scalars.
    """
    p_a = _check_probability(p_a_lower, "p_a_lower")
    s = _sigma_array(sigma)
    if p_b_upper is None:
        shape, (pa, sf) = _broadcast({"p_a_lower": p_a, "sigma": s})
        radius = np.zeros_like(pa)
        ok = pa > 0.5
        radius[ok] = sf[ok] * ndtri(pa[ok])
        return _shaped(radius, shape)
    p_b = _check_probability(p_b_upper, "p_b_upper")
    shape, (pa, pb, sf) = _broadcast({"p_a_lower": p_a, "p_b_upper": p_b, "sigma": s})
    radius = np.zeros_like(pa)
    ok = pa > pb
    radius[ok] = 0.5 * sf[ok] * (ndtri(pa[ok]) - ndtri(pb[ok]))
    return _shaped(radius, shape)


@njit(parallel=True)
def _cohen_certify_kernel(
    count_a: np.ndarray, n: np.ndarray, alpha: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CERTIFY over 1-D arrays ``[m]``: one-sided CP lower bound, radius, abstain mask."""
    m = count_a.shape[0]
    p_lower = np.empty(m)
    radius = np.empty(m)
    abstain = np.empty(m, dtype=np.bool_)
    for i in prange(m):
        p = cp_lower(count_a[i], n[i], alpha[i])
        p_lower[i] = p
        abstain[i] = not (p > 0.5)  # abstain at p_lower <= 1/2 (DESIGN.md section 2); NaN abstains too
        radius[i] = sigma[i] * norm_ppf(p) if p > 0.5 else 0.0
    return p_lower, radius, abstain


def cohen_certify_counts(count_a: Any, n: Any, alpha: Any, sigma: Any) -> tuple[Any, Any, Any]:
    """Cohen et al. (ICML 2019) CERTIFY from the vote count of the selected class.

    ``p_lower = BetaInv(alpha; count_a, n - count_a + 1)`` is the one-sided ``1 - alpha`` Clopper-Pearson
    lower bound (``clopper_pearson(count_a, n, alpha, "greater").low``). The point abstains when
    ``p_lower <= 1/2`` (DESIGN.md section 2: Cohen's theorem needs ``pA_low > pB_up = 1 - pA_low``);
    otherwise its radius is ``sigma * PhiInv(p_lower) > 0``. Cohen's released ``certify`` abstains only
    when ``pABar < 0.5`` and "certifies" radius 0 at exactly 1/2 (e.g. ``count_a = n = 10`` at
    ``alpha = 2**-10``); certkit abstains there. ``count_a`` must come from the ``n`` fresh draws, not the
    ``n0`` selection draws.

    Args:
        count_a: votes for the selected class, integer-valued, ``0 <= count_a <= n``.
        n: number of noise draws, integer-valued, ``>= 1``.
        alpha: one-sided error level in ``(0, 0.5)``.
        sigma: noise standard deviation (> 0), scalar or per-sample 1-D, in input units.

    Returns:
        ``(p_lower, radius, abstain)``: float64, float64 (input units, 0 where abstaining) and bool arrays of
        the broadcast shape (NumPy scalars when all inputs are scalars).
    """
    a = _check_alpha_array(alpha)
    _check_one_sided_alpha(a, "greater")
    k = _check_count(count_a, "count_a", 0)
    nn = _check_count(n, "n", 1)
    s = _sigma_array(sigma)
    shape, (kf, nf, af, sf) = _broadcast({"count_a": k, "n": nn, "alpha": a, "sigma": s})
    bad = kf > nf
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"count_a must not exceed n, got count_a={kf[i]:g} > n={nf[i]:g}")
    p_lower, radius, abstain = _cohen_certify_kernel(kf, nf, af, sf)
    return _shaped(p_lower, shape), _shaped(radius, shape), _shaped(abstain, shape)


def hoeffding_soft_radius(p_a_mean: Any, n: Any, alpha: Any, sigma: Any, p_b_mean: Any = None) -> Any:
    """Certified radius from mean soft scores bounded with Hoeffding's inequality (RAB / Cert-SSB).

    ``h(a) = sqrt(ln(1/a) / (2 n))`` is the one-sided Hoeffding half-width of a mean of ``n`` independent
    ``[0, 1]`` scores (``n`` from the data; the released Cert-SSB evaluator hard-codes 1000).

    - ``p_b_mean=None`` (binary bound, the two-class case): one bound at level ``alpha``,
      ``pA_low = pA - h(alpha)`` and ``pB_up = 1 - pA_low``, so ``R = sigma * PhiInv(pA_low)``. With two
      classes ``pB = 1 - pA`` and this equals the released RAB/Cert-SSB evaluator, whose two bounds
      ``pA - h``, ``pB + h`` at ``alpha`` each are then the same event (e.g. ``N = 1000``,
      ``alpha = 1e-3``: ``pA = 0.95 -> 1.23310 sigma``, ``pA = 1 -> 1.5651856 sigma``).
    - ``p_b_mean`` given (runner-up mean): both ``pA`` and ``pB`` are bounded from the same scores, so
      ``alpha`` is split, ``alpha / 2`` each (Bonferroni; DESIGN.md section 2), and the two bounds hold
      together with probability ``>= 1 - alpha``:
      ``R = sigma / 2 * (PhiInv(pA - h(alpha/2)) - PhiInv(pB + h(alpha/2)))``. The released code uses
      ``alpha`` for each bound (joint failure up to ``2 alpha``); pass ``2 * alpha`` to reproduce it.

    Selection. Both forms hold at the stated level for classes fixed before the scores are drawn (e.g.
    chosen on separate selection draws, as Cohen's CERTIFY does). When ``A`` is the argmax of the very
    scores that are bounded, the binary bound with two classes fails only on the two-sided event
    ``|mean_0 - p_0| > h(alpha)``, so it holds at ``1 - 2 alpha`` in the worst case (a near tie, where both
    classes can be selected); pass ``alpha / 2`` for a ``1 - alpha`` statement.
    :func:`certkit.certify.ensemble.certify_votes` makes that correction itself (``alpha / C`` per class).

    Args:
        p_a_mean: mean soft score of the predicted class over ``n`` draws, in ``[0, 1]``.
        n: number of independent draws (models / noise samples), integer-valued, ``>= 1``.
        alpha: error level of the certificate: in ``(0, 0.5)`` for the binary bound (one one-sided
            bound), in ``(0, 1)`` with ``p_b_mean`` (two bounds at ``alpha / 2``).
        sigma: noise standard deviation (> 0), scalar or per-sample 1-D, in input units.
        p_b_mean: mean soft score of the runner-up class, in ``[0, 1]``, or ``None`` (binary bound).

    Returns:
        Radius (input units), 0 where not certified, of the broadcast shape.
    """
    a = _check_alpha_array(alpha)
    p_a = _check_probability(p_a_mean, "p_a_mean")
    if p_b_mean is None:
        return gaussian_radius(hoeffding(p_a, n, a, "greater").low, sigma)
    p_b = _check_probability(p_b_mean, "p_b_mean")
    p_a_low = hoeffding(p_a, n, a / 2, "greater").low
    p_b_up = hoeffding(p_b, n, a / 2, "less").high
    return gaussian_radius(p_a_low, sigma, p_b_up)
