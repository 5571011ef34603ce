"""Certified metrics of a smoothed or certified classifier (docs/design.md section 6).

From a :class:`~certkit.certify.results.CertificationResult`: certified accuracy at radii, average certified
radius, abstain rate, and *certified trigger robustness* (CTR): the fraction of non-target clean test inputs
that are certified correct with a radius strictly larger than the l2 norm the trigger adds at that input.
Each point's certificate holds with probability ``1 - alpha`` on its own; a statement about the whole test
set needs a simultaneous correction (:func:`simultaneous_asr_bound`). Empirical metrics (CA, ASR, RA, DER)
live in :mod:`certkit.backdoor.metrics`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
from scipy.stats import binom

from certkit._validation import check_alpha, check_float, check_positive_int
from certkit.certify.results import CertificationResult
from certkit.errors import InputError

__all__ = [
    "SimultaneousBound",
    "abstain_rate",
    "average_certified_radius",
    "certified_accuracy",
    "certified_trigger_robustness",
    "simultaneous_asr_bound",
]


# ---------------------------------------------------------------------- certified metrics
def certified_accuracy(result: CertificationResult, radii: float | Sequence[float]) -> np.ndarray | float:
    """Fraction of points correct with ``radius >= r`` for each ``r`` (Cohen et al.'s convention)."""
    return result.certified_accuracy(radii)


def average_certified_radius(result: CertificationResult) -> float:
    """Mean of ``radius * correct`` over all points (abstentions count as 0)."""
    return result.acr()


def abstain_rate(result: CertificationResult) -> float:
    """Fraction of points where the smoothed classifier abstains."""
    return result.abstain_rate()


def certified_trigger_robustness(result: CertificationResult, trigger_norms: Any = None, *,
                                 target: int | None = None, scale: float = 1.0) -> float:
    """Fraction of non-target clean points certified correct with ``radius > scale * trigger norm``.

    Args:
        result: certificates of the *clean* test inputs (``label`` must be known).
        trigger_norms: per-point l2 norm of the trigger at that input, aligned with ``result`` rows
            (default: ``result.trigger_norm``); a scalar applies to every point.
        target: the attack's target class; points whose true label is the target are excluded.
        scale: multiplies the norm (e.g. ``sqrt(r + 1)`` for a training-time joint certificate).

    Each point's certificate holds with probability ``>= 1 - alpha`` on its own, so ``1 -`` this value
    bounds the smoothed classifier's ASR only where every certificate holds; it is *not* a bound on the
    ASR at level ``1 - alpha``. For a statement about the whole test set, with the level it holds at, use
    :func:`simultaneous_asr_bound` (docs/design.md sections 6 and 10).
    """
    if (result.label < 0).any():
        raise InputError("certified trigger robustness needs the true labels of the certified points")
    norms = result.trigger_norm if trigger_norms is None else np.asarray(trigger_norms, dtype=np.float64)
    norms = np.broadcast_to(norms, result.radius.shape)
    if np.isnan(norms).any():
        raise InputError("trigger norms are missing (NaN) for some points; pass trigger_norms=")
    keep = np.ones(len(result), dtype=bool) if target is None else result.label != int(target)
    if not keep.any():
        return float("nan")
    covered = result.correct & (result.radius > scale * norms)
    return float(covered[keep].mean())


# ---------------------------------------------------------------------- whole-test-set statement
@dataclass(frozen=True)
class SimultaneousBound:
    """An upper bound on the smoothed ASR over a whole test set (:func:`simultaneous_asr_bound`).

    Attributes:
        bound: the ASR bound ``min(1, 1 - ctr + q / n)``, a fraction of the ``n`` non-target points.
        q: failure count with ``P(F >= q) <= delta``, ``F`` the number of failed certificates.
        delta: the bound holds with probability ``>= 1 - delta`` (over the noise of all certificates).
        alpha: per-point error level of the certificates.
        n: number of non-target points.
        method: ``"binomial"`` (independent certificates) or ``"markov"`` (any dependence).
        statement: the claim in one sentence (the bound rounded up to 3 significant digits).
    """

    bound: float
    q: int
    delta: float
    alpha: float
    n: int
    method: str
    statement: str

    def __str__(self) -> str:
        return self.statement

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _ceil_digits(x: float, digits: int = 3) -> str:
    """``x > 0`` rounded *up* to ``digits`` significant digits (a bound is never printed below its value,
    up to a relative ``1e-12`` that absorbs float noise such as ``0.1 + 0.004 = 0.10400000000000001``)."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return f"{math.ceil(x * scale * (1 - 1e-12)) / scale:.{digits}g}"


def _failure_quantile(n: int, alpha: float, delta: float, independent: bool) -> int:
    """Smallest ``q >= 1`` with ``P(F >= q) <= delta`` for the number ``F`` of failed certificates."""
    if not independent:  # Markov: P(F >= q) <= E[F] / q <= n alpha / q
        q = max(1, math.ceil(n * alpha / delta))
        while q > 1 and n * alpha / (q - 1) <= delta:  # ceil of a rounded quotient: step back if one too many
            q -= 1
        while n * alpha / q > delta:
            q += 1
        return q
    # F is dominated by Binomial(n, alpha): P(F >= q) <= binom.sf(q - 1); isf gives min{k: sf(k) <= delta}
    k = binom.isf(delta, n, alpha)
    q = int(k) + 1 if np.isfinite(k) else n + 1
    while q <= n and binom.sf(q - 1, n, alpha) > delta:  # guard against rounding in isf
        q += 1
    while q > 1 and binom.sf(q - 2, n, alpha) <= delta:
        q -= 1
    return q


def simultaneous_asr_bound(ctr: float, n_nontarget: int, alpha: float, delta: float = 0.05,
                           independent: bool = True) -> SimultaneousBound:
    """Upper bound on the smoothed classifier's ASR over the whole test set, at level ``1 - delta``.

    A non-target point counted in the CTR is certified correct beyond the trigger's size, so its triggered
    input is *not* sent to the target unless its certificate failed. With ``F`` the number of failed
    certificates among the ``n`` non-target points, ``ASR <= 1 - ctr + F / n``. Each certificate fails
    with probability ``<= alpha`` on its own (docs/design.md sections 6 and 10), so a whole-test-set statement
    needs a quantile ``q`` with ``P(F >= q) <= delta``; then, with probability ``>= 1 - delta``, fewer than
    ``q`` certificates fail and ``ASR <= min(1, 1 - ctr + q / n)`` (conservative by ``1 / n``).

    * ``independent=True`` (``method="binomial"``): the certificates use independent noise draws, as in
      Cohen's CERTIFY with per-point seeds (Mode A); given the model the failure indicators are independent
      with ``P(fail) <= alpha`` each, so ``F`` is stochastically dominated by ``Binomial(n, alpha)`` and
      ``q`` is the smallest integer with ``P(Binomial(n, alpha) >= q) <= delta``.
    * ``independent=False`` (``method="markov"``): no assumption on the dependence (e.g. Mode B, where
      every point is certified by the same ensemble members). Since ``E[F] <= n alpha``, Markov's
      inequality gives ``P(F >= q) <= n alpha / q``: ``q = ceil(n alpha / delta)``.

    Both forms need each certificate to fail with probability ``<= alpha``: a storage-adjusted result
    (:mod:`certkit.certify.storage`), whose rows borrow the balls of earlier rows, is outside this
    argument. With independent per-point certificates, the Bonferroni alternative of docs/design.md section 6
    (every point at ``alpha / n``) needs new certificates; this function reuses the ones at hand.

    Args:
        ctr: certified trigger robustness in ``[0, 1]`` (:func:`certified_trigger_robustness`).
        n_nontarget: number of non-target points the CTR was computed over (``>= 1``).
        alpha: per-point error level of the certificates, in ``(0, 1)``.
        delta: error level of the whole-test-set statement, in ``(0, 1)``.
        independent: whether the certificates' failures are independent (see above).

    Returns:
        :class:`SimultaneousBound`.

    >>> b = simultaneous_asr_bound(0.9, 1000, alpha=0.001, delta=0.05)
    >>> b.q, round(b.bound, 3), b.method
    (4, 0.104, 'binomial')
    >>> print(b)
    smoothed ASR <= 0.104 with probability >= 0.95 (at most 4 of 1000 certificates fail)
    >>> simultaneous_asr_bound(0.9, 1000, alpha=0.001, delta=0.05, independent=False).q
    20
    """
    c = check_float(ctr, "ctr", maximum=1.0)
    n = check_positive_int(n_nontarget, "n_nontarget")
    a = check_alpha(alpha)
    d = check_alpha(delta, "delta")
    if not isinstance(independent, (bool, np.bool_)):
        raise InputError(f"independent must be True or False, got {independent!r}")
    q = _failure_quantile(n, a, d, bool(independent))
    bound = min(1.0, 1.0 - c + q / n)
    method = "binomial" if independent else "markov"
    statement = (f"smoothed ASR <= {_ceil_digits(bound)} with probability >= {Decimal(1) - Decimal(repr(d))} "
                 f"(at most {q} of {n} certificates fail)")
    return SimultaneousBound(bound=bound, q=q, delta=d, alpha=a, n=n, method=method, statement=statement)


def certified_triggered_accuracy(triggered: CertificationResult, target: int | None = None) -> float:
    """Fraction of non-target *triggered* queries certified to get their true label: the deployed classifier's
    answer at ``x + t`` is the true label and comes with a certificate (``radius >= 0``, not abstaining).

    The trigger-robustness figure for classifiers whose certificates do not transfer from the clean twin to
    ``x + t`` (a memory classifier whose store depends on the order of the queries): evaluate the triggered
    queries themselves, in the order they would arrive in deployment. Each answer holds at ``1 - alpha`` on
    its own (stored labels are exact given the store).

    >>> import numpy as np
    >>> r = CertificationResult(label=np.array([1, 2, 0]), prediction=np.array([1, -1, 0]),
    ...                         radius=np.array([0.0, 0.0, 0.3]), p_lower=np.array([0.9, 0.4, 0.9]),
    ...                         sigma=np.full(3, 0.25), triggered=np.ones(3, dtype=bool))
    >>> certified_triggered_accuracy(r, target=0)
    0.5
    """
    if (triggered.label < 0).any():
        raise InputError("certified triggered accuracy needs the true labels of the triggered queries")
    keep = np.ones(len(triggered), dtype=bool) if target is None else triggered.label != int(target)
    if not keep.any():
        return float("nan")
    return float(triggered.subset(np.flatnonzero(keep)).certified_accuracy(0.0))
