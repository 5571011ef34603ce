"""Benchmark: certkit.clopper_pearson against statsmodels and SciPy on 1e6 (k, n) pairs.

Two workloads (``--workload``):

- ``uniform``: n uniform in [1, max_n], k uniform in [0, n]: nearly every pair distinct (the worst case);
- ``certification``: the counts a certification run produces: n in {1e3, 1e4, 1e5} (the sample sizes of
  Cohen et al. / RAB), k ~ Binomial(n, p) with the top-class probability p ~ Beta(30, 1) (mostly
  confident points), so pairs repeat and certkit's de-duplication applies.

Measures, in one run and on the same pairs (two-sided):

- ``certkit.certify.bounds.clopper_pearson`` (numba, parallel over pairs, SciPy's compiled Boost inverses), also
  restricted to one thread to separate the per-pair cost from the parallel speed-up;
- ``statsmodels.stats.proportion.proportion_confint(k, n, alpha, method="beta")`` called per point in a
  Python loop, the way certification scripts call it (timed on ``--loop-pairs`` pairs and extrapolated);
- ``proportion_confint`` called once on the arrays (vectorised statsmodels);
- vectorised SciPy: ``scipy.stats.beta.ppf`` / ``beta.isf`` on the arrays (the formulas statsmodels uses).

Numba compile time is measured separately (first call) and excluded from the timings; numba uses its default
thread count (``os.cpu_count()`` unless ``NUMBA_NUM_THREADS`` is set).

    .venv/bin/python benchmarks/bench_bounds.py              # 1e6 pairs, 20k-pair statsmodels loop
    .venv/bin/python benchmarks/bench_bounds.py --pairs 100000 --loop-pairs 2000
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numba
import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from certkit.certify.bounds import clopper_pearson


def best_of(fn: Callable[[], tuple[np.ndarray, np.ndarray]], repeat: int) -> tuple[float, tuple]:
    """Smallest wall time of ``repeat`` calls and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def scipy_vectorised(k: np.ndarray, n: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper-Pearson with SciPy's array quantiles (statsmodels' formulas and edge rules)."""
    with np.errstate(invalid="ignore"):
        low = stats.beta.ppf(alpha / 2, k, n - k + 1)
        high = stats.beta.isf(alpha / 2, k + 1, n - k)
    return np.where(k == 0, 0.0, low), np.where(k == n, 1.0, high)


def make_pairs(workload: str, pairs: int, max_n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(k, n) integer arrays of the named workload."""
    if workload == "uniform":
        n = rng.integers(1, max_n + 1, size=pairs)
        return rng.integers(0, n + 1), n
    n = rng.choice(np.array([1_000, 10_000, 100_000]), size=pairs)
    return rng.binomial(n, rng.beta(30.0, 1.0, size=pairs)), n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=1_000_000, help="random (k, n) pairs (default 1e6)")
    parser.add_argument(
        "--loop-pairs",
        type=int,
        default=20_000,
        help="pairs for the per-point statsmodels loop (extrapolated)",
    )
    parser.add_argument("--max-n", type=int, default=1_000_000, help="largest n (default 1e6)")
    parser.add_argument("--alpha", type=float, default=1e-3, help="two-sided error level (default 1e-3)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs for vectorised methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload", choices=["uniform", "certification", "both"], default="both")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    clopper_pearson(np.arange(100), np.full(100, 100), args.alpha)
    compile_s = time.perf_counter() - t0
    print(f"numba compile (first call, excluded below): {compile_s:.2f} s")
    rng = np.random.default_rng(args.seed)
    for workload in (["uniform", "certification"] if args.workload == "both" else [args.workload]):
        k, n = make_pairs(workload, args.pairs, args.max_n, rng)
        run_workload(workload, k, n, args)


def run_workload(workload: str, k: np.ndarray, n: np.ndarray, args: argparse.Namespace) -> None:
    """Time every method on the same pairs and print the table."""
    alpha = args.alpha
    distinct = len(np.unique(n * (int(n.max()) + 1) + k))
    print(
        f"\n[{workload}] {args.pairs:,} pairs ({distinct:,} distinct), n in [{n.min():,}, {n.max():,}], "
        f"alpha={alpha:g} two-sided; {os.cpu_count()} CPUs, numba threads {numba.get_num_threads()} "
        f"({numba.config.THREADING_LAYER})"
    )

    t_ck, (ck_low, ck_high) = best_of(lambda: tuple(clopper_pearson(k, n, alpha)), args.repeat)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    t_ck1, _ = best_of(lambda: tuple(clopper_pearson(k, n, alpha)), args.repeat)
    numba.set_num_threads(threads)
    t_sp, (sp_low, sp_high) = best_of(lambda: scipy_vectorised(k, n, alpha), args.repeat)
    t_smv, (smv_low, smv_high) = best_of(
        lambda: proportion_confint(k, n, alpha=alpha, method="beta"), args.repeat
    )

    m = min(args.loop_pairs, args.pairs)
    t0 = time.perf_counter()
    loop = np.array([proportion_confint(int(k[i]), int(n[i]), alpha=alpha, method="beta") for i in range(m)])
    t_loop_measured = time.perf_counter() - t0
    t_loop = t_loop_measured / m * args.pairs

    diff_sp = max(np.max(np.abs(ck_low - sp_low)), np.max(np.abs(ck_high - sp_high)))
    diff_smv = max(np.max(np.abs(ck_low - smv_low)), np.max(np.abs(ck_high - smv_high)))
    diff_loop = max(np.max(np.abs(ck_low[:m] - loop[:, 0])), np.max(np.abs(ck_high[:m] - loop[:, 1])))

    rows = [
        (f"certkit.clopper_pearson (numba, {threads} threads)", t_ck, 0.0, ""),
        ("certkit.clopper_pearson (numba, 1 thread)", t_ck1, 0.0, "same kernel, parallelism off"),
        ("scipy beta.ppf/isf (vectorised)", t_sp, diff_sp, ""),
        ("statsmodels proportion_confint (vectorised)", t_smv, diff_smv, ""),
        (
            "statsmodels proportion_confint (per-point loop)",
            t_loop,
            diff_loop,
            f"extrapolated from {m:,} pairs",
        ),
    ]
    print(f"{'method':<48} {'time [s]':>10} {'pairs/s':>12} {'certkit x':>10} {'max |diff|':>11}  note")
    for name, t, diff, note in rows:
        print(f"{name:<48} {t:>10.3f} {args.pairs / t:>12,.0f} {t / t_ck:>10.1f} {diff:>11.1e}  {note}")
    print(
        f"per-point statsmodels loop measured {t_loop_measured:.2f} s on {m:,} pairs "
        f"({t_loop_measured / m * 1e6:.1f} us/pair), extrapolated to {args.pairs:,} pairs; "
        "'certkit x' = time / certkit time (>1: certkit is faster)"
    )


if __name__ == "__main__":
    main()
