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

from certkit._validation import check_positive_int, check_sigma
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
from certkit.parallel import keep_torch_threads

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
        abstain[i] = not (p > 0.5)  # abstain at p_lower <= 1/2 (docs/design.md section 2.3); NaN abstains too
        radius[i] = sigma[i] * norm_ppf(p) if p > 0.5 else 0.0
    return p_lower, radius, abstain


def cohen_certify_counts(count_a: Any, n: Any, alpha: Any, sigma: Any) -> tuple[Any, Any, Any]:
    """Cohen et al. (ICML 2019) CERTIFY from the vote count of the selected class.

    ``p_lower = BetaInv(alpha; count_a, n - count_a + 1)`` is the one-sided ``1 - alpha`` Clopper-Pearson
    lower bound (``clopper_pearson(count_a, n, alpha, "greater").low``). The point abstains when
    ``p_lower <= 1/2`` (docs/design.md section 2.3: Cohen's theorem needs ``pA_low > pB_up = 1 - pA_low``);
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
    with keep_torch_threads():
        p_lower, radius, abstain = _cohen_certify_kernel(kf, nf, af, sf)
    return _shaped(p_lower, shape), _shaped(radius, shape), _shaped(abstain, shape)


def hoeffding_soft_radius(p_a_mean: Any, n: Any, alpha: Any, sigma: Any, p_b_mean: Any = None, *,
                          num_classes: int = 2, selected_from_scores: bool = True) -> Any:
    """Certified radius from mean soft scores bounded with Hoeffding's inequality (RAB / Cert-SSB).

    ``h(a) = sqrt(ln(1/a) / (2 n))`` is the one-sided Hoeffding half-width of a mean of ``n`` independent
    ``[0, 1]`` scores (``n`` from the data; the released Cert-SSB evaluator hard-codes 1000).

    - ``p_b_mean=None`` (binary bound, two classes): ``pA_low = pA - h(a)`` and ``pB_up = 1 - pA_low``,
      ``R = sigma * PhiInv(pA_low)``.
    - ``p_b_mean`` given (runner-up mean): ``pA_low = pA - h(a)``, ``pB_up = pB + h(a)``,
      ``R = sigma / 2 * (PhiInv(pA_low) - PhiInv(pB_up))``.

    The level ``a`` of each one-sided bound makes the certificate hold with probability ``>= 1 - alpha``:

    - ``selected_from_scores=True`` (default): the class ``A`` (and the runner-up) are the argmax of the very
      scores that are bounded, so the statement must hold whichever class is selected: a union over the
      classes. Binary form: ``a = alpha / 2`` (both classes may be selected near a tie; with two classes the
      lower bound of one is the upper bound of the other). Runner-up form: the lower bound of ``A`` and the
      upper bounds of all other classes must hold, so ``a = alpha / (2 * num_classes)``.
    - ``selected_from_scores=False``: the classes were fixed before these scores were drawn (e.g. on
      separate selection draws, as Cohen's CERTIFY does): ``a = alpha`` (binary) or ``alpha / 2`` (both
      bounds, Bonferroni). The released RAB/Cert-SSB evaluator uses ``alpha`` for each bound with selection;
      docs/design.md section 9's reference values (``N = 1000``, ``alpha = 1e-3``: ``pA = 0.95 -> 1.23310
      sigma``) are the binary form with ``selected_from_scores=False``.

    Args:
        p_a_mean: mean soft score of the predicted class over ``n`` draws, in ``[0, 1]``.
        n: number of independent draws (models / noise samples), integer-valued, ``>= 1``.
        alpha: error level of the certificate, in ``(0, 1)`` (each one-sided bound then needs ``a < 0.5``).
        sigma: noise standard deviation (> 0), scalar or per-sample 1-D, in input units.
        p_b_mean: mean soft score of the runner-up class, in ``[0, 1]``, or ``None`` (binary bound).
        num_classes: number of classes ``C`` the selection ranges over (runner-up form; the binary form needs 2).
        selected_from_scores: whether the classes were chosen from the same scores (see above).

    Returns:
        Radius (input units), 0 where not certified, of the broadcast shape.

    >>> round(float(hoeffding_soft_radius(0.95, 1000, 1e-3, 1.0, selected_from_scores=False)), 5)
    1.2331
    >>> float(hoeffding_soft_radius(0.95, 1000, 1e-3, 1.0)) < 1.2331   # alpha / 2 for the selected class
    True
    """
    if not isinstance(selected_from_scores, (bool, np.bool_)):
        raise InputError(f"selected_from_scores must be True or False, got {selected_from_scores!r}")
    classes = check_positive_int(num_classes, "num_classes", minimum=2)
    if p_b_mean is None and classes != 2:
        raise InputError(f"the binary bound (p_b_mean=None) is for two classes; with num_classes={classes} pass "
                         "the runner-up's mean as p_b_mean")
    a = _check_alpha_array(alpha)
    share = (2 if p_b_mean is None else 2 * classes) if selected_from_scores else (1 if p_b_mean is None else 2)
    a = a / share
    p_a = _check_probability(p_a_mean, "p_a_mean")
    if p_b_mean is None:
        return gaussian_radius(hoeffding(p_a, n, a, "greater").low, sigma)
    p_b = _check_probability(p_b_mean, "p_b_mean")
    p_a_low = hoeffding(p_a, n, a, "greater").low
    p_b_up = hoeffding(p_b, n, a, "less").high
    return gaussian_radius(p_a_low, sigma, p_b_up)
