"""Confidence bounds for randomized-smoothing certificates: exact Clopper-Pearson, Hoeffding, binomial test.

Clopper-Pearson
    Clopper & Pearson (1934), "The use of confidence or fiducial limits illustrated in the case of the
    binomial", Biometrika 26(4):404-413. From ``k`` successes in ``n`` trials the one-sided ``1 - alpha``
    bounds are

    - lower ``p_low = BetaInv(alpha; k, n - k + 1)`` (0 when ``k == 0``), the bound Cohen, Rosenfeld &
      Kolter (ICML 2019, "Certified adversarial robustness via randomized smoothing", ``CERTIFY``) turn into
      a radius;
    - upper ``p_up = BetaInv(1 - alpha; k + 1, n - k)`` (1 when ``k == n``).

    The two-sided interval at level ``1 - alpha`` spends ``alpha / 2`` on each side and equals
    ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=alpha, method="beta")`` (statsmodels,
    ``statsmodels/stats/proportion.py``), which computes ``stats.beta.ppf(alpha/2, k, n-k+1)`` and
    ``stats.beta.isf(alpha/2, k+1, n-k)``. Cohen's code obtains the one-sided lower bound by passing
    ``alpha=2*alpha`` to that call; here one asks for ``alternative="greater"`` instead.

    **Why the upper bound uses the complement.** ``BetaInv(1 - alpha; a, b)`` first rounds ``1 - alpha``
    to a double, which for tiny ``alpha`` throws away most of ``alpha``'s digits (``1 - 5e-8`` keeps about
    9 significant digits of ``5e-8``). ``beta.ppf(1 - 5e-8, 1, 1000)`` is 0.016670722430946576 whereas the
    exact bound is 0.01667072243152068 (relative error 3.4e-11). The upper bound is therefore computed
    ``isf``-style with the inverse of the *complemented* regularised incomplete beta function,
    ``betainccinv(k + 1, n - k, alpha)``, which receives ``alpha`` itself and is accurate to a few ulp.

Numerics
    Both inverses are Boost.Math's ``ibeta_inv``/``ibetac_inv`` as compiled into SciPy and exported through
    ``scipy.special.cython_special``'s C API; numba calls the function pointers directly (no Python, no
    GIL), so the scalar kernels :func:`cp_lower`, :func:`cp_upper` and :func:`norm_ppf` can be called from
    any ``@njit`` code, and the array kernels run in parallel over elements. The results are bit-identical
    to ``scipy.stats.beta.ppf`` / ``beta.isf`` (tested to <= 1e-12 absolute for ``n <= 1e6`` and ``alpha``
    in ``[1e-15, 0.5)``). The kernels use ctypes function pointers, so they cannot be cached
    (``cache=True``); they compile once per process on first use.

Hoeffding
    Hoeffding (1963), "Probability inequalities for sums of bounded random variables", JASA 58:13-30: the
    mean of ``n`` independent variables in ``[0, 1]`` lies within ``sqrt(ln(1/alpha) / (2n))`` of its
    expectation on each side with probability ``>= 1 - alpha``. Used for mean soft scores (RAB, Cert-SSB).

Binomial test
    Cohen et al.'s ``PREDICT`` abstains when the two-sided ``binom_test(n1, n1 + n2, 0.5)`` p-value exceeds
    ``alpha``; :func:`binomtest_half_pvalue` is the vectorised ``scipy.stats.binomtest(k, n, 0.5).pvalue``.

Error levels
    A two-sided interval takes ``alpha`` in ``(0, 1)`` (``alpha / 2 < 1/2`` per side). A one-sided bound
    (``alternative="greater"``/``"less"``, :func:`hoeffding_halfwidth`, and the radii of
    :mod:`certkit.certify.radius`) needs ``alpha < 1/2``: with ``alpha >= 1/2`` the Clopper-Pearson "lower
    bound" lies above ``k / n``. Such an ``alpha`` is refused with an :class:`~certkit.errors.InputError`.

Return convention (all public functions here and in :mod:`certkit.certify.radius`): inputs broadcast with NumPy
rules; outputs are float64 arrays of the broadcast shape, except that when every input is a scalar they are
NumPy scalars (``np.float64``, a subclass of ``float``; ``np.bool_`` for masks), as NumPy ufuncs do.
Inputs may be Python numbers, NumPy arrays or torch tensors (copied to CPU float64).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.special.cython_special as _cython_special
import torch
from numba import njit, prange
from numba.extending import get_cython_function_address
from scipy.stats import binom

from certkit._validation import check_alpha, check_choice
from certkit.errors import InputError
from certkit.parallel import keep_torch_threads

__all__ = [
    "ConfidenceInterval",
    "binomtest_half_pvalue",
    "clopper_pearson",
    "cp_interval_array",
    "cp_lower",
    "cp_upper",
    "hoeffding",
    "hoeffding_halfwidth",
    "norm_ppf",
]

ALTERNATIVES = ("two-sided", "greater", "less")
_MODE = {"two-sided": 0, "greater": 1, "less": 2}

# --------------------------------------------------------------------------------------------------------
# SciPy's compiled special functions, bound for numba
# --------------------------------------------------------------------------------------------------------


def _capsule_signature(capsule: object) -> str:
    """The C signature stored as the name of a Cython ``__pyx_capi__`` capsule."""
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype = ctypes.c_char_p
    get_name.argtypes = [ctypes.py_object]
    return get_name(capsule).decode()


def _find_cython_double(suffix: str, n_double: int) -> tuple[str, bool]:
    """Name of the double-precision ``cython_special`` export ending in ``suffix``.

    SciPy >= 1.11 exports fused names (``__pyx_fuse_0betaincinv`` = double, ``__pyx_fuse_1...`` = float);
    older releases export the plain name. Returns ``(name, takes_skip_dispatch)``: whether the C function
    takes the trailing ``int __pyx_skip_dispatch`` argument.
    """
    prefix = "double (" + ", ".join(["double"] * n_double)
    capi = _cython_special.__pyx_capi__
    preferred = [f"__pyx_fuse_0{suffix}", suffix]
    names = preferred + sorted(key for key in capi if key.endswith(suffix) and key not in preferred)
    for name in names:
        if name not in capi:
            continue
        signature = _capsule_signature(capi[name])
        rest = signature[len(prefix) :].replace(" ", "") if signature.startswith(prefix) else ""
        if rest == ")" or rest.startswith(",int"):  # exactly n_double doubles, maybe + skip_dispatch
            return name, rest != ")"
    raise ImportError(f"scipy.special.cython_special exports no double-precision {suffix!r}")


def _bind(suffix: str, n_double: int) -> Any:
    """A ctypes function pointer to SciPy's compiled ``suffix`` and whether it takes ``skip_dispatch``."""
    name, skip = _find_cython_double(suffix, n_double)
    argtypes = [ctypes.c_double] * n_double + ([ctypes.c_int] if skip else [])
    proto = ctypes.CFUNCTYPE(ctypes.c_double, *argtypes)
    return proto(get_cython_function_address("scipy.special.cython_special", name)), skip


def _wrap3(fn: Any, skip: bool) -> Callable[[float, float, float], float]:
    if skip:

        @njit(nogil=True)
        def call(a: float, b: float, y: float) -> float:
            return fn(a, b, y, 0)

    else:

        @njit(nogil=True)
        def call(a: float, b: float, y: float) -> float:
            return fn(a, b, y)

    return call


def _wrap1(fn: Any, skip: bool) -> Callable[[float], float]:
    if skip:

        @njit(nogil=True)
        def call(x: float) -> float:
            return fn(x, 0)

    else:

        @njit(nogil=True)
        def call(x: float) -> float:
            return fn(x)

    return call


_betaincinv = _wrap3(*_bind("betaincinv", 3))  # x with I_x(a, b) = y   (Boost ibeta_inv)
_betainccinv = _wrap3(*_bind("betainccinv", 3))  # x with 1 - I_x(a, b) = y   (Boost ibetac_inv)
_ndtri = _wrap1(*_bind("ndtri", 1))  # standard normal quantile


# --------------------------------------------------------------------------------------------------------
# Scalar kernels (callable from other numba code)
# --------------------------------------------------------------------------------------------------------


@njit(nogil=True)
def cp_lower(k: float, n: float, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound ``BetaInv(alpha; k, n - k + 1)``; 0 if ``k == 0``.

    Scalar numba kernel, no validation beyond returning NaN when ``n < 1``, ``k`` is outside ``[0, n]``
    or ``alpha`` is outside ``(0, 1)``; ``k`` and ``n`` are counts (integer-valued).
    """
    if not (n >= 1.0 and 0.0 <= k <= n and 0.0 < alpha < 1.0):
        return np.nan
    if k == 0:
        return 0.0
    return _betaincinv(float(k), float(n - k + 1), float(alpha))


@njit(nogil=True)
def cp_upper(k: float, n: float, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson upper bound; 1 if ``k == n``.

    Computed as ``betainccinv(k + 1, n - k, alpha)`` (the ``isf`` form), never as
    ``BetaInv(1 - alpha; ...)``, which loses the digits of a small ``alpha``. Same NaN rules as
    :func:`cp_lower`.
    """
    if not (n >= 1.0 and 0.0 <= k <= n and 0.0 < alpha < 1.0):
        return np.nan
    if k == n:
        return 1.0
    return _betainccinv(float(k + 1), float(n - k), float(alpha))


@njit(nogil=True)
def norm_ppf(p: float) -> float:
    """Standard normal quantile ``PhiInv(p)`` (SciPy's ``ndtri``); ``-inf``/``inf`` at 0/1, NaN outside."""
    return _ndtri(float(p))


# --------------------------------------------------------------------------------------------------------
# Array kernels (1-D float64 arrays of equal length; the public functions broadcast and validate)
# --------------------------------------------------------------------------------------------------------


@njit(parallel=True)
def cp_interval_array(
    k: np.ndarray, n: np.ndarray, alpha: np.ndarray, mode: int
) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson interval over 1-D arrays ``[m]``, in parallel; returns ``(low, high)``.

    ``mode`` 0: two-sided (``alpha / 2`` per side); 1: lower bound at ``alpha``, high 1; 2: low 0, upper
    bound at ``alpha``.
    """
    m = k.shape[0]
    low = np.empty(m)
    high = np.empty(m)
    for i in prange(m):
        if mode == 0:
            a = 0.5 * alpha[i]
            low[i] = cp_lower(k[i], n[i], a)
            high[i] = cp_upper(k[i], n[i], a)
        elif mode == 1:
            low[i] = cp_lower(k[i], n[i], alpha[i])
            high[i] = 1.0
        else:
            low[i] = 0.0
            high[i] = cp_upper(k[i], n[i], alpha[i])
    return low, high


# --------------------------------------------------------------------------------------------------------
# Input handling shared with certkit.radius
# --------------------------------------------------------------------------------------------------------


def _as_float_array(x: Any, name: str) -> np.ndarray:
    """``x`` (number, sequence, ndarray or tensor) as a float64 ndarray without NaN or inf."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
        if arr.dtype.kind not in "iuf":
            raise TypeError(arr.dtype)
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numeric (int or float), got {x!r}") from exc
    if np.isnan(arr).any():
        raise InputError(f"{name} contains NaN values")
    if np.isinf(arr).any():
        raise InputError(f"{name} contains infinite values")
    return arr


def _first_bad(arr: np.ndarray, bad: np.ndarray) -> float:
    return float(arr[bad].flat[0]) if arr.ndim else float(arr)


def _check_count(x: Any, name: str, minimum: int) -> np.ndarray:
    """Integer-valued counts ``>= minimum`` as float64 (exact for counts below 2**53)."""
    arr = _as_float_array(x, name)
    bad = arr != np.floor(arr)
    if bad.any():
        raise InputError(f"{name} must be integer-valued, got {_first_bad(arr, bad)!r}")
    bad = arr < minimum
    if bad.any():
        raise InputError(f"{name} must be >= {minimum}, got {_first_bad(arr, bad):g}")
    return arr


def _check_alpha_array(alpha: Any, name: str = "alpha") -> np.ndarray:
    """``alpha`` (scalar or array) with every element in the open interval ``(0, 1)``."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().cpu().numpy()
    if np.ndim(alpha) == 0:
        return np.asarray(check_alpha(alpha, name), dtype=np.float64)
    try:
        arr = np.asarray(alpha, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number in (0, 1), got {alpha!r}") from exc
    bad = ~((arr > 0.0) & (arr < 1.0))  # also catches NaN
    if bad.any():
        raise InputError(f"{name} must lie in the open interval (0, 1), got {_first_bad(arr, bad)!r}")
    return arr


def _check_one_sided_alpha(alpha: np.ndarray, alternative: str, name: str = "alpha") -> None:
    """Refuse ``alpha >= 1/2`` for a one-sided bound: its "lower bound" would lie above the estimate.

    A one-sided ``1 - alpha`` bound with ``alpha >= 1/2`` is a bound held with probability ``<= 1/2``
    (``cp_lower(k, n, 0.6)`` exceeds ``k / n``); no certificate wants one. Two-sided intervals keep
    ``(0, 1)``: each side then gets ``alpha / 2 < 1/2``.
    """
    if alternative == "two-sided":
        return
    bad = alpha >= 0.5
    if bad.any():
        raise InputError(f"{name} must be < 0.5 for the one-sided alternative={alternative!r} (a one-sided "
                         f"1 - {name} bound with {name} >= 1/2 lies on the wrong side of the estimate), "
                         f"got {_first_bad(alpha, bad)!r}")


def _check_probability(x: Any, name: str) -> np.ndarray:
    """Probabilities in ``[0, 1]`` (finite, no NaN) as float64."""
    arr = _as_float_array(x, name)
    bad = (arr < 0.0) | (arr > 1.0)
    if bad.any():
        raise InputError(f"{name} must lie in [0, 1], got {_first_bad(arr, bad)!r}")
    return arr


def _broadcast(arrays: dict[str, np.ndarray]) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """Broadcast shape and the inputs as contiguous 1-D float64 arrays of that size."""
    try:
        shape = np.broadcast_shapes(*(a.shape for a in arrays.values()))
    except ValueError as exc:
        shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in arrays.items())
        raise InputError(f"shapes do not broadcast: {shapes}") from exc
    # fresh writable C-contiguous copies: one numba specialisation (a read-only view would compile another)
    flat = [np.broadcast_to(a, shape).astype(np.float64, order="C").reshape(-1) for a in arrays.values()]
    return shape, flat


def _shaped(values: np.ndarray, shape: tuple[int, ...]) -> Any:
    """``values`` reshaped to ``shape``; a NumPy scalar when ``shape == ()``."""
    out = values.reshape(shape)
    return out[()] if out.ndim == 0 else out


# --------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfidenceInterval:
    """A confidence interval ``[low, high]`` for a probability or mean.

    ``low`` and ``high`` are float64 arrays of the broadcast input shape (NumPy scalars when every input is
    a scalar). Iterating yields ``low`` then ``high``, so ``low, high = clopper_pearson(...)`` works.
    """

    low: Any
    high: Any

    def __iter__(self) -> Iterator[Any]:
        yield self.low
        yield self.high


def clopper_pearson(k: Any, n: Any, alpha: Any = 0.001, alternative: str = "two-sided") -> ConfidenceInterval:
    """Exact (Clopper & Pearson 1934) confidence interval for a binomial proportion, vectorised.

    Args:
        k: successes, integer-valued, ``0 <= k <= n``; any shape broadcastable with ``n`` and ``alpha``.
        n: trials, integer-valued, ``n >= 1``.
        alpha: error level (scalar or array); the interval holds with probability ``>= 1 - alpha``.
            Two-sided: in ``(0, 1)``; one-sided (``"greater"``/``"less"``): in ``(0, 0.5)``.
        alternative: ``"two-sided"`` -> ``[cp_lower(alpha/2), cp_upper(alpha/2)]``, identical to
            statsmodels ``proportion_confint(k, n, alpha, method="beta")``; ``"greater"`` -> one-sided
            lower bound ``[cp_lower(alpha), 1]`` (Cohen et al. 2019 CERTIFY); ``"less"`` -> one-sided upper
            bound ``[0, cp_upper(alpha)]``.

    Returns:
        :class:`ConfidenceInterval` with float64 ``low``/``high`` of the broadcast shape (NumPy scalars when
        all inputs are scalars).

    Raises:
        InputError: NaN/inf, non-integer or out-of-range ``k``/``n``, ``alpha`` outside ``(0, 1)`` (outside
            ``(0, 0.5)`` for a one-sided alternative), shapes that do not broadcast. UnknownNameError:
            unknown ``alternative``.
    """
    check_choice(alternative, ALTERNATIVES, "alternative")
    a = _check_alpha_array(alpha)
    _check_one_sided_alpha(a, alternative)
    kk = _check_count(k, "k", 0)
    nn = _check_count(n, "n", 1)
    shape, (kf, nf, af) = _broadcast({"k": kk, "n": nn, "alpha": a})
    bad = kf > nf
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"k must not exceed n, got k={kf[i]:g} > n={nf[i]:g}")
    with keep_torch_threads():
        low, high = _cp_dedup(kf, nf, af, _MODE[alternative])
    return ConfidenceInterval(_shaped(low, shape), _shaped(high, shape))


#: Arrays at least this long are de-duplicated before the kernel runs.
_DEDUP_MIN = 4096


def _cp_dedup(k: np.ndarray, n: np.ndarray, alpha: np.ndarray, mode: int) -> tuple[np.ndarray, np.ndarray]:
    """Run :func:`cp_interval_array` once per distinct ``(k, n)`` when ``alpha`` is shared.

    Certification produces many repeated counts (e.g. ``k == n`` for every confidently classified point),
    so large inputs are reduced to their distinct pairs first (one sort, about 2% of the kernel's time when
    every pair is distinct). The values are bit-identical to the direct computation.
    """
    m = k.shape[0]
    if m < _DEDUP_MIN or alpha[0] != alpha.min() or alpha[0] != alpha.max():
        return cp_interval_array(k, n, alpha, mode)
    base = float(n.max()) + 1.0
    if base * base >= 2.0**53:  # keys would not be exact
        return cp_interval_array(k, n, alpha, mode)
    keys, first, inverse = np.unique(n * base + k, return_index=True, return_inverse=True)
    if keys.shape[0] > 0.9 * m:  # nearly all distinct: not worth the gather
        return cp_interval_array(k, n, alpha, mode)
    low, high = cp_interval_array(k[first], n[first], alpha[first], mode)
    return low[inverse], high[inverse]


def hoeffding_halfwidth(n: Any, alpha: Any) -> Any:
    """Hoeffding (1963) one-sided half-width ``sqrt(ln(1/alpha) / (2 n))`` for means of ``[0, 1]`` variables.

    Args:
        n: number of independent draws (integer-valued, ``>= 1``); broadcast with ``alpha``.
        alpha: one-sided error level in ``(0, 0.5)``.

    Returns:
        float64 array of the broadcast shape (NumPy scalar for scalar inputs).
    """
    a = _check_alpha_array(alpha)
    _check_one_sided_alpha(a, "greater")
    nn = _check_count(n, "n", 1)
    shape, (nf, af) = _broadcast({"n": nn, "alpha": a})
    return _shaped(np.sqrt(-np.log(af) / (2.0 * nf)), shape)


def hoeffding(mean: Any, n: Any, alpha: Any = 0.001, alternative: str = "two-sided") -> ConfidenceInterval:
    """Hoeffding confidence interval for the expectation of a ``[0, 1]``-bounded variable from its mean.

    Args:
        mean: empirical mean of ``n`` independent draws, in ``[0, 1]`` (e.g. a mean soft score).
        n: number of draws (integer-valued, ``>= 1``), taken from the data.
        alpha: error level: in ``(0, 1)`` two-sided, in ``(0, 0.5)`` one-sided.
        alternative: ``"two-sided"`` splits ``alpha`` in two (half-width at ``alpha / 2`` on each side);
            ``"greater"``: ``[mean - h(alpha), 1]``; ``"less"``: ``[0, mean + h(alpha)]``.

    Returns:
        :class:`ConfidenceInterval`, clipped to ``[0, 1]``, of the broadcast shape.
    """
    check_choice(alternative, ALTERNATIVES, "alternative")
    a = _check_alpha_array(alpha)
    _check_one_sided_alpha(a, alternative)
    m = _check_probability(mean, "mean")
    nn = _check_count(n, "n", 1)
    shape, (mf, nf, af) = _broadcast({"mean": m, "n": nn, "alpha": a})
    if alternative == "two-sided":
        af = 0.5 * af
    h = np.sqrt(-np.log(af) / (2.0 * nf))
    low = np.zeros_like(mf) if alternative == "less" else np.clip(mf - h, 0.0, 1.0)
    high = np.ones_like(mf) if alternative == "greater" else np.clip(mf + h, 0.0, 1.0)
    return ConfidenceInterval(_shaped(low, shape), _shaped(high, shape))


def binomtest_half_pvalue(k: Any, n: Any) -> Any:
    """Two-sided p-value of the binomial test of ``p = 1/2``: ``scipy.stats.binomtest(k, n, 0.5).pvalue``.

    Cohen et al. (2019) PREDICT abstains when this p-value, for the top two counts ``n1 >= n2`` with
    ``k = n1``, ``n = n1 + n2``, exceeds ``alpha``. SciPy's algorithm is reproduced step for step,
    vectorised: the p-value sums the probabilities of the outcomes whose pmf is ``<= pmf(k) * (1 + 1e-7)``,
    the other tail located by the same binary search over the pmf and summed with ``binom.cdf``/``sf``.

    Args:
        k: successes, integer-valued, ``0 <= k <= n``.
        n: trials, integer-valued, ``>= 1``; broadcast with ``k``.

    Returns:
        float64 p-values in ``[0, 1]`` of the broadcast shape (NumPy scalar for scalar inputs).
    """
    kk = _check_count(k, "k", 0)
    nn = _check_count(n, "n", 1)
    shape, (kf, nf) = _broadcast({"k": kk, "n": nn})
    bad = kf > nf
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"k must not exceed n, got k={kf[i]:g} > n={nf[i]:g}")
    threshold = binom.pmf(kf, nf, 0.5) * (1.0 + 1e-7)
    pval = np.ones_like(kf)  # k == n/2

    lo = 2 * kf < nf  # other tail in [ceil(n/2), n], where the pmf decreases
    if lo.any():
        k_, n_, t_ = kf[lo], nf[lo], threshold[lo]
        ix = _binom_half_search(-1.0, -t_, np.ceil(n_ / 2), n_.copy(), n_)
        y = n_ - ix + (t_ == binom.pmf(ix, n_, 0.5))
        pval[lo] = binom.cdf(k_, n_, 0.5) + binom.sf(n_ - y, n_, 0.5)

    hi = 2 * kf > nf  # other tail in [0, floor(n/2)], where the pmf increases
    if hi.any():
        k_, n_, t_ = kf[hi], nf[hi], threshold[hi]
        y = _binom_half_search(1.0, t_, np.zeros_like(n_), np.floor(n_ / 2), n_) + 1
        pval[hi] = binom.cdf(y - 1, n_, 0.5) + binom.sf(k_ - 1, n_, 0.5)
    return _shaped(np.minimum(pval, 1.0), shape)


def _binom_half_search(
    sign: float, d: np.ndarray, lo: np.ndarray, hi: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """Vectorised ``scipy.stats._binomtest._binary_search_for_binom_tst`` on ``a(x) = sign * pmf(x; n, 1/2)``.

    Returns, per element, ``i`` in ``[lo - 1, hi]`` with ``a(i) <= d < a(i + 1)`` (``a`` ascending on
    ``[lo, hi]``), with SciPy's exact branch and tie behaviour. ``lo`` and ``hi`` are modified in place.
    """
    out = np.empty_like(lo)
    open_ = np.ones(lo.shape, dtype=bool)
    while True:
        act = open_ & (lo < hi)
        if not act.any():
            break
        idx = np.flatnonzero(act)
        mid = lo[idx] + np.floor((hi[idx] - lo[idx]) / 2)
        midval = sign * binom.pmf(mid, n[idx], 0.5)
        below, above = midval < d[idx], midval > d[idx]
        lo[idx[below]] = mid[below] + 1
        hi[idx[above]] = mid[above] - 1
        hit = ~below & ~above
        out[idx[hit]] = mid[hit]
        open_[idx[hit]] = False
    idx = np.flatnonzero(open_)
    at_lo = sign * binom.pmf(lo[idx], n[idx], 0.5) <= d[idx]
    out[idx] = np.where(at_lo, lo[idx], lo[idx] - 1)
    return out
