"""Benchmark: storage-update (memory-based) certification, certkit's numba kernel against a NumPy loop.

The reference is written in the style of DDRS's memory-based post-processor
(MotasemAlfarra/Data_Dependent_Randomized_Smoothing: post_processing_memory_based.py): a Python loop over
the points in order; for each new point the l2 distances to *all* stored points with NumPy
(``sqrt(((S[:K] - x) ** 2).sum(1))``, the store kept in a preallocated array), then align / trim / maximise
with NumPy masks (with the align-branch re-check that DDRS lacks, so both compute the same thing).
certkit runs :meth:`certkit.certify.storage.StorageCertifier.certify` end to end (input checks, the dataset
fingerprint, building the store and the adjusted result included).

Data: ``N`` points uniform in ``[0, 1]^D``, 1 % of them replaced by near-duplicates of other points (at
distance ``0.1 q``, the source's label half of the time, radius scaled by ``U(0.2, 0.6)``), 10 classes, 5 % abstentions, radii ``r_i = q/2 * U(0.9, 1)`` where ``q`` is the normal
approximation of the pairwise-distance quantile at level ``5 / N`` (``D^2 ~ N(D/6, 7D/180)`` for uniform
coordinates): with this scale a few per cent of the points overlap a ball of another label and get
trimmed, and the near-duplicates get aligned or maximised (the counts are printed).

The reference loop costs ``O(N^2 D)`` memory traffic and cannot run at 100k points. Where ``N^2 D`` exceeds
``--full-ref-max`` it is *extrapolated*: it is timed on ``--ref-points`` consecutive points starting at
10, 30, 50, 70 and 90 % of the order, each time with the store filled exactly as certkit's store was at
that position; a point's cost is linear in the store size, so the mean over these five strata times ``N``
estimates the full loop (midpoint rule). The sampled reference outputs are checked against certkit's.
Checked once against the full loop on the 2-core machine: 4.5 s estimated vs 3.8 s measured (10k points,
D = 64), 7.9 s vs 12.3 s (4k points, D = 784); on a shared machine expect tens of per cent either way.

    .venv/bin/python benchmarks/bench_storage.py                        # 1k, 10k, 100k points; D = 64, 784
    .venv/bin/python benchmarks/bench_storage.py --sizes 1000 10000 --dims 64
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
from scipy.stats import norm

from certkit.certify.results import CertificationResult
from certkit.certify.storage import StorageCertifier


def make_data(n: int, d: int, seed: int, classes: int = 10) -> tuple[np.ndarray, CertificationResult]:
    """Uniform points (1 % of them near-duplicates of others), labels, 5 % abstentions, overlapping radii."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, d))
    d2 = d / 6 + norm.ppf(5.0 / n) * np.sqrt(7 * d / 180)  # pairwise squared-distance quantile at 5 / n
    q = np.sqrt(max(d2, 1e-3 * d))
    dup = np.flatnonzero(rng.random(n) < 0.01)
    if n > 1 and dup.size:
        noise = rng.standard_normal((dup.size, d))
        noise *= (0.1 * q / np.linalg.norm(noise, axis=1))[:, None]
    src = rng.integers(0, n, dup.size)
    x[dup] = x[src] + noise
    pred = rng.integers(0, classes, n)
    same = rng.random(dup.size) < 0.5  # a near-duplicate gets its source's label half of the time
    pred[dup[same]] = pred[src[same]]
    pred[rng.random(n) < 0.05] = -1
    radius = 0.5 * q * rng.uniform(0.9, 1.0, n)
    radius[dup] *= rng.uniform(0.2, 0.6, dup.size)  # ... and a less confident vote
    radius = np.where(pred >= 0, radius, 0.0)
    cert = CertificationResult(label=rng.integers(0, classes, n), prediction=pred, radius=radius,
                               p_lower=np.full(n, 0.99), sigma=np.full(n, 0.5))
    return x, cert


def reference_loop(x: np.ndarray, pred: np.ndarray, rad: np.ndarray, order: np.ndarray, positions: range,
                   store: list) -> tuple[np.ndarray, np.ndarray]:
    """DDRS-style storage update of the points at ``positions`` of ``order``; the store
    ``[S, labels, radii, k]`` (arrays preallocated to N rows) is updated in place. Returns their
    (prediction, radius)."""
    s, lab, rr, k = store
    out_pred = np.empty(len(positions), dtype=np.int64)
    out_rad = np.empty(len(positions))
    for t, p in enumerate(positions):
        row = order[p]
        xi = x[row]
        y, r = int(pred[row]), float(rad[row]) if pred[row] >= 0 else 0.0
        if y >= 0 and k:
            dist = np.sqrt(((s[:k] - xi) ** 2).sum(axis=1))
            rk, lk = rr[:k], lab[:k]
            inside = dist < rk
            other = inside & (lk != y)
            if other.any():  # align with the deepest containing ball of another label
                j = int(np.argmax(np.where(other, rk - dist, -np.inf)))
                y, r = int(lk[j]), float(rk[j] - dist[j])
            oth = lk != y  # trim (re-checked after aligning)
            bound = max(0.0, float((dist[oth] - rk[oth]).min())) if oth.any() else np.inf
            r = min(r, bound)
            same = inside & (lk == y)  # maximise
            if same.any():
                r = max(r, min(float((rk[same] - dist[same]).max()), bound))
        out_pred[t], out_rad[t] = y, (r if y >= 0 else 0.0)
        if y >= 0 and r > 0:
            s[k], lab[k], rr[k] = xi, y, r
            k += 1
    store[3] = k
    return out_pred, out_rad


def time_reference(x, cert, res, full: bool, ref_points: int) -> tuple[float, str, bool]:
    """(seconds for all N points, 'measured'/'extrapolated', outputs agree with certkit)."""
    n, d = x.shape
    order = res.order
    pred, rad = cert.prediction, cert.radius
    s = np.empty((n, d))
    lab = np.empty(n, dtype=np.int64)
    rr = np.empty(n)
    if full:
        store = [s, lab, rr, 0]
        t0 = time.perf_counter()
        p, r = reference_loop(x, pred, rad, order, range(n), store)
        elapsed = time.perf_counter() - t0
        ok = np.array_equal(p, res.result.prediction[order]) and np.allclose(r, res.result.radius[order],
                                                                              rtol=1e-12, atol=1e-14)
        return elapsed, "measured", ok
    stored_pos = res.stored_as[order]  # store position of the point at each order position (-1: none)
    per_point, ok = [], True
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        p0 = int(frac * n)
        k = int((stored_pos[:p0] >= 0).sum())  # certkit's store at position p0 = its first k entries
        s[:k], lab[:k], rr[:k] = res.store.centers[:k], res.store.labels[:k], res.store.radii[:k]
        store = [s, lab, rr, k]
        positions = range(p0, min(n, p0 + ref_points))
        t0 = time.perf_counter()
        p, r = reference_loop(x, pred, rad, order, positions, store)
        per_point.append((time.perf_counter() - t0) / len(positions))
        rows = order[p0: p0 + len(positions)]
        ok &= np.array_equal(p, res.result.prediction[rows]) and np.allclose(r, res.result.radius[rows],
                                                                              rtol=1e-12, atol=1e-14)
    return float(np.mean(per_point)) * n, "extrapolated", ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 784])
    ap.add_argument("--ref-points", type=int, default=20, help="points per stratum when extrapolating")
    ap.add_argument("--full-ref-max", type=float, default=1e10, help="run the full reference when N^2 D <= this")
    ap.add_argument("--repeat", type=int, default=3,
                    help="certkit timings: best of this many runs (one run where N^2 D > 1e11)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(f"numba {numba.__version__}, {numba.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")
    x, cert = make_data(300, 8, 0)
    t0 = time.perf_counter()
    StorageCertifier().certify(x, cert)
    print(f"first call (numba compile): {time.perf_counter() - t0:.1f} s, excluded below\n")

    header = ("| N | D | certkit [s] | NumPy loop [s] | reference | speed-up | aligned | trimmed | maximised "
              "| stored | outputs agree |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for d in args.dims:
        for n in args.sizes:
            x, cert = make_data(n, d, args.seed)
            best = float("inf")
            res = None
            for _ in range(args.repeat if float(n) * n * d <= 1e11 else 1):
                t0 = time.perf_counter()
                res = StorageCertifier().certify(x, cert)
                best = min(best, time.perf_counter() - t0)
            assert res is not None
            full = float(n) * n * d <= args.full_ref_max
            ref_s, how, ok = time_reference(x, cert, res, full, args.ref_points)
            print(f"| {n:,} | {d} | {best:.3g} | {ref_s:.4g} | {how} | {ref_s / best:.0f}x | {res.n_aligned} "
                  f"| {res.n_trimmed} | {res.n_maximised} | {res.n_stored:,} | {'yes' if ok else 'NO'} |",
                  flush=True)
            del x, cert, res


if __name__ == "__main__":
    main()
