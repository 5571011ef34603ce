"""Benchmark: poisoning-count certificates (Mode D: DPA, DPA + ROE, FA, FA + ROE, bagging), in one run.

1. **Certification speed and agreement.** :func:`certkit.certify.aggregation.roe_certify`,
   :func:`~certkit.certify.aggregation.fa_certify` and :func:`~certkit.certify.aggregation.fa_roe_certify` on
   synthetic saved logits (10,000 points, 10 classes, ROE: K = 50 members; FA: k = 50, d = 4, i.e. 200
   learners saved in a shuffled file order with the member -> subset map in the layout) against per-point loops
   written HERE from the algorithms of ``reference/poisoning-certificates-fct-gdm.md`` section 3 (certkit's
   implementation is not used by the loops), in two styles: *pure Python* (per point: votes counted in Python
   from ``tolist()`` rows, the radius from explicit loops over classes, members and buckets) and *torch per
   point*, the reference scripts' structure (votes and round-1 counts vectorised once, then small tensor ops,
   sorts and ``.item()`` loops per class or pair). Every radius and prediction of the loops is compared with
   certkit's on every point they ran on. The
   FA and FA + ROE loops are slow, so by default they run on an evenly spaced subsample of the 10,000 points and
   their time is extrapolated per point (``--fa-loop-points``, ``--faroe-loop-points``; 0 = all points).
   A second, smaller workload with integer-valued logits (many logit and vote ties) checks the tie-breaks.
   Target: certkit >= 50x the loop at 10k points, k = 50.
2. **Partition (DPA) training, n_jobs = 2 vs 1.** :func:`certkit.runs.ensemble_train.train_ensemble` on the
   same partition spec (digits, k = 20) in fresh run directories, loky workers warmed by a first call, members
   checked bit-identical through the sha256 in the manifests. Waits (up to ``--max-wait`` s) until the 1-minute
   load average is <= 1.0 and two processes really get >= 1.7 cores, and reports the load it ran under; runs
   before parts 1 and 3. Target: speed-up >= 1.6x.
3. **Certified accuracy on digits** at r = 1, 3, 5, 10 for DPA (k = 10, 25, 50), DPA + ROE (same ensembles),
   FA (k = 10, d = 4) and bagging (100 samples per draw, N = 200 draws), BadNets at poison rate 0.1, members
   trained for about 600 steps of batch 16 (Adam, certkit's trainer), with training and certification wall
   times, next to the reference's section 4.3 table; the CTR (in samples) at the attack's poisoned count, and
   DPA k = 50 at poison rate 0.005 (6 poisoned images), where the certificate can cover the attack.

Run: ``.venv/bin/python benchmarks/bench_aggregation.py [--json PATH]`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from bench_ensemble_training import machine_parallelism  # the benchmarks' one measure of available cores

from certkit.backdoor.prepare import prepare_data
from certkit.certify.aggregation import Layout, bagging_certify, fa_certify, fa_roe_certify, roe_certify
from certkit.runs.aggregation import AggregationCertifyConfig, certify_aggregation, read_member_outputs
from certkit.runs.ensemble_train import EnsembleSpec, ensemble_layout, member_name, train_ensemble

INF = 10**9

# reference/poisoning-certificates-fct-gdm.md section 4.3 (digits 1437/360, 600 SGD steps per member, 2 threads)
REFERENCE = {
    "DPA k=10": {"clean": 0.894, "1": 0.872, "3": 0.731, "5": 0.094, "10": 0.0, "median": 4, "train_s": 23},
    "DPA+ROE k=10": {"clean": 0.894, "1": 0.869, "3": 0.739, "5": 0.094, "10": 0.0, "median": 4},
    "DPA k=25": {"clean": 0.919, "1": 0.892, "3": 0.831, "5": 0.758, "10": 0.478, "median": 9, "train_s": 49},
    "DPA+ROE k=25": {"clean": 0.914, "1": 0.889, "3": 0.831, "5": 0.775, "10": 0.503, "median": 10},
    "DPA k=50": {"clean": 0.911, "1": 0.903, "3": 0.867, "5": 0.825, "10": 0.636, "median": 14, "train_s": 88},
    "DPA+ROE k=50": {"clean": 0.906, "1": 0.892, "3": 0.858, "5": 0.806, "10": 0.639, "median": 13},
    "FA k=10, d=4": {"clean": 0.917, "1": 0.883, "3": 0.767, "5": 0.086, "10": 0.0, "median": 4, "train_s": 82},
    "bagging k=100, N=200": {"clean": 0.819, "0": 0.35, "1": 0.186, "3": 0.0, "5": 0.0, "10": 0.0, "median": -1,
                             "train_s": 180},
}
RADII = (1, 3, 5, 10)


# ======================================================================================================
# 1. Reference-style per-point loops (written from reference section 3; certkit is not used here)
# ======================================================================================================
@cache
def dp(i: int, j: int) -> int:
    """ROE's DP[i, j] (reference section 3.4): fewest poisoned members that knock the prediction out of the
    final when its round-1 gaps to two rivals are ``i`` and ``j``."""
    if i == 0 and j == 0:
        return 0
    if (i <= 1 and j <= 2) or (i <= 2 and j <= 1):
        return 1
    if j <= 1:
        return (i + 1) // 2
    if i <= 1:
        return (j + 1) // 2
    return 1 + min(dp(i - 2, j - 1), dp(i - 1, j - 2))


def _gap(n: list[int], a: int, b: int) -> int:
    """Round-1 gap of ``a`` over ``b`` with the tie-break: ``a`` beats ``b`` iff it is > 0."""
    return n[a] - n[b] + (1 if b > a else 0)


def _ceil_half(x: int) -> int:
    return (max(x, 0) + 1) // 2


def _plurality(votes: list[int], num_classes: int) -> tuple[list[int], list[int]]:
    counts = [0] * num_classes
    for v in votes:
        counts[v] += 1
    order = sorted(range(num_classes), key=lambda c: (-counts[c], c))  # stable: smaller class wins ties
    return counts, order


def loop_roe(logits: np.ndarray, points: np.ndarray) -> tuple[list[int], list[int]]:
    """DPA + ROE, one point at a time (Rezaei et al. 2023 as restated in reference section 3.4)."""
    k, _, c = logits.shape
    preds, radii = [], []
    for i in points:
        rows = logits[:, i, :].tolist()
        votes = [row.index(max(row)) for row in rows]  # argmax, first index on ties
        n, order = _plurality(votes, c)
        m1, m2 = order[0], order[1]
        e = 2 * sum(1 for row in rows if row[m1] > row[m2]) - k   # a logit tie counts for m2
        cp = m1 if e > 0 else (m2 if e < 0 else min(m1, m2))
        cs = m1 + m2 - cp

        cert1 = INF
        for c1 in range(c):
            if c1 == cp:
                continue
            for c2 in range(c):
                if c2 == cp or c2 == c1:
                    continue
                cert1 = min(cert1, dp(max(_gap(n, cp, c1), 0), max(_gap(n, cp, c2), 0)))
        cert2 = INF
        for cc in range(c):
            if cc == cp:
                continue
            r2 = 2 * sum(1 for row in rows if row[cp] > row[cc]) - k
            cert2 = min(cert2, max(_ceil_half(_gap(n, cs, cc)), _ceil_half(r2 + (1 if cc > cp else 0))))
        preds.append(cp)
        radii.append(min(cert1, cert2) - 1)
    return preds, radii


def _buckets_needed(gap: int, damages: list[int]) -> int:
    """Fewest buckets, largest damage first, that close ``gap`` (the FA/ROE greedy; 0 if ``gap <= 0``)."""
    used = 0
    for dmg in sorted(damages, reverse=True):
        if gap <= 0:
            break
        gap -= dmg
        used += 1
    return used if gap <= 0 else INF


def _fa_bucket_learners(k: int, d: int, shifts: tuple[int, ...], member_subset: tuple[int, ...]) -> list[list[int]]:
    """For each hash bucket, the file positions of its d learners (subset (h + shift) mod kd)."""
    kd = k * d
    member_of = {s: m for m, s in enumerate(member_subset)}
    return [[member_of[(h + sh) % kd] for sh in shifts] for h in range(kd)]


def loop_fa(logits: np.ndarray, layout: Layout, points: np.ndarray) -> tuple[list[int], list[int]]:
    """Finite Aggregation, one point at a time (Wang et al. 2022 as restated in reference section 3.3),
    certifying the plurality prediction."""
    _, _, c = logits.shape
    buckets = _fa_bucket_learners(layout.k, layout.d, layout.shifts, layout.member_subset)
    preds, radii = [], []
    for i in points:
        rows = logits[:, i, :].tolist()
        votes = [row.index(max(row)) for row in rows]
        n, order = _plurality(votes, c)
        y = order[0]
        best = INF
        for rival in range(c):
            if rival == y:
                continue
            gap = n[y] - n[rival] - (1 if rival < y else 0)
            damages = sorted(_round1_damages(votes, buckets, y, rival), reverse=True)
            r, total = 0, 0
            for dmg in damages:
                if total + dmg > gap:
                    break
                total += dmg
                r += 1
            best = min(best, r)
        preds.append(y)
        radii.append(best)
    return preds, radii


def _round1_damages(votes: list[int], buckets: list[list[int]], a: int, b: int) -> list[int]:
    """Per bucket, how much it can close the round-1 gap of ``a`` over ``b``: sum of 1 + [vote = a] - [vote = b]."""
    return [sum(1 + (votes[m] == a) - (votes[m] == b) for m in learners) for learners in buckets]


def _needed_round1(n: list[int], votes: list[int], buckets: list[list[int]], a: int, b: int) -> int:
    """Buckets after which ``b`` beats ``a`` in round 1."""
    return _buckets_needed(_gap(n, a, b), _round1_damages(votes, buckets, a, b))


def loop_fa_roe(logits: np.ndarray, layout: Layout, points: np.ndarray) -> tuple[list[int], list[int]]:
    """FA + ROE, one point at a time (Rezaei et al. 2023: ROE's structure with FA's greedy bucket damages,
    the two-rival case bounded by max(N(c_p -> c1), N(c_p -> c2), N_joint))."""
    kd, _, c = logits.shape
    buckets = _fa_bucket_learners(layout.k, layout.d, layout.shifts, layout.member_subset)
    preds, radii = [], []
    for i in points:
        rows = logits[:, i, :].tolist()
        votes = [row.index(max(row)) for row in rows]
        n, order = _plurality(votes, c)
        m1, m2 = order[0], order[1]
        e = 2 * sum(1 for row in rows if row[m1] > row[m2]) - kd
        cp = m1 if e > 0 else (m2 if e < 0 else min(m1, m2))
        cs = m1 + m2 - cp

        to_p = {b: _needed_round1(n, votes, buckets, cp, b) for b in range(c) if b != cp}
        to_s = {b: _needed_round1(n, votes, buckets, cs, b) for b in range(c) if b != cs}
        to_s[cs] = 0
        cert1 = INF
        for c1 in range(c):
            if c1 == cp:
                continue
            for c2 in range(c1):
                if c2 == cp:
                    continue
                gap = (n[cp] - n[c1] + (1 if c1 > cp else 0)) + (n[cp] - n[c2] + (1 if c2 > cp else 0))
                dmg = [sum(1 + 2 * (votes[m] == cp) - (votes[m] == c1) - (votes[m] == c2) for m in learners)
                       for learners in buckets]
                cert1 = min(cert1, max(to_p[c1], to_p[c2], _buckets_needed(gap, dmg)))
        cert2 = INF
        for cc in range(c):
            if cc == cp:
                continue
            ahead = [row[cp] > row[cc] for row in rows]
            gap = 2 * sum(ahead) - kd + (1 if cc > cp else 0)
            dmg = [2 * sum(ahead[m] for m in learners) for learners in buckets]
            cert2 = min(cert2, max(to_s[cc], _buckets_needed(gap, dmg)))
        preds.append(cp)
        radii.append(min(cert1, cert2) - 1)
    return preds, radii


# The same algorithms in the reference scripts' style: votes and round-1 counts vectorised over all points
# once (torch), then per point small torch tensor ops per class / pair (comparisons, sums, sorts, .item()).
def _torch_votes(logits: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = torch.from_numpy(logits).permute(1, 0, 2)            # [N, K, C], as the reference files store them
    votes = scores.argmax(dim=2)                                  # first maximal index on ties
    counts = torch.zeros(scores.shape[0], scores.shape[2], dtype=torch.long)
    for m in range(scores.shape[1]):
        counts[torch.arange(scores.shape[0]), votes[:, m]] += 1
    return scores, votes, counts


def _top_two_np(cnt: np.ndarray) -> tuple[int, int]:
    order = np.argsort(-cnt, kind="stable")
    return int(order[0]), int(order[1])


def _torch_needed(gap: int, damages: torch.Tensor) -> int:
    damages = damages.sort(descending=True)[0]
    used = 0
    while gap > 0 and used < damages.shape[0]:
        gap -= damages[used].item()
        used += 1
    return used if gap <= 0 else INF


def torch_roe(logits: np.ndarray, points: np.ndarray) -> tuple[list[int], list[int]]:
    scores, _, counts = _torch_votes(logits)
    k, c = scores.shape[1], scores.shape[2]
    preds, radii = [], []
    for i in points:
        s, n = scores[i], counts[i].numpy()
        m1, m2 = _top_two_np(n)
        e = 2 * (s[:, m1] > s[:, m2]).sum().item() - k
        cp = m1 if e > 0 else (m2 if e < 0 else min(m1, m2))
        cs = m1 + m2 - cp
        nl = n.tolist()
        cert1 = INF
        for c1 in range(c):
            for c2 in range(c):
                if c1 != cp and c2 != cp and c1 != c2:
                    cert1 = min(cert1, dp(max(_gap(nl, cp, c1), 0), max(_gap(nl, cp, c2), 0)))
        cert2 = INF
        for cc in range(c):
            if cc != cp:
                r2 = 2 * (s[:, cp] > s[:, cc]).sum().item() - k
                cert2 = min(cert2, max(_ceil_half(_gap(nl, cs, cc)), _ceil_half(r2 + (1 if cc > cp else 0))))
        preds.append(cp)
        radii.append(min(cert1, cert2) - 1)
    return preds, radii


def _torch_fa_setup(logits: np.ndarray, layout: Layout):
    scores, votes, counts = _torch_votes(logits)
    kd = layout.k * layout.d
    member_of = torch.empty(kd, dtype=torch.long)
    member_of[torch.tensor(layout.member_subset)] = torch.arange(kd)      # subset id -> file position
    shifted = torch.tensor([[(h + sh) % kd for sh in layout.shifts] for h in range(kd)])
    learners = member_of[shifted]                                          # [kd buckets, d] file positions
    return scores, votes, counts, learners


def torch_fa(logits: np.ndarray, layout: Layout, points: np.ndarray) -> tuple[list[int], list[int]]:
    _, votes, counts, learners = _torch_fa_setup(logits, layout)
    c = counts.shape[1]
    preds, radii = [], []
    for i in points:
        n = counts[i].numpy()
        y = _top_two_np(n)[0]
        vb = votes[i][learners.view(-1)].view(learners.shape)                 # [kd, d]
        best = INF
        for rival in range(c):
            if rival == y:
                continue
            gap = int(n[y] - n[rival]) - (1 if rival < y else 0)
            deltas = (1 + (vb == y).long() - (vb == rival).long()).sum(dim=1).sort(descending=True)[0]
            r = 0
            while r < deltas.shape[0] and gap - deltas[r].item() >= 0:
                gap -= deltas[r].item()
                r += 1
            best = min(best, r)
        preds.append(y)
        radii.append(best)
    return preds, radii


def torch_fa_roe(logits: np.ndarray, layout: Layout, points: np.ndarray) -> tuple[list[int], list[int]]:
    scores, votes, counts, learners = _torch_fa_setup(logits, layout)
    kd, c = scores.shape[1], scores.shape[2]
    flat = learners.view(-1)
    preds, radii = [], []
    for i in points:
        s, n = scores[i], counts[i].numpy()
        nl = n.tolist()
        m1, m2 = _top_two_np(n)
        e = 2 * (s[:, m1] > s[:, m2]).sum().item() - kd
        cp = m1 if e > 0 else (m2 if e < 0 else min(m1, m2))
        cs = m1 + m2 - cp
        vb = votes[i][flat].view(learners.shape)                              # [kd buckets, d]
        to_p, to_s = [0] * c, [0] * c
        for b in range(c):
            to_p[b] = _torch_needed(_gap(nl, cp, b), (1 + (vb == cp).long() - (vb == b).long()).sum(dim=1))
            to_s[b] = _torch_needed(_gap(nl, cs, b), (1 + (vb == cs).long() - (vb == b).long()).sum(dim=1))
        cert1 = INF
        for c1 in range(c):
            for c2 in range(c1):
                if c1 == cp or c2 == cp:
                    continue
                dmg = (1 + 2 * (vb == cp).long() - (vb == c1).long() - (vb == c2).long()).sum(dim=1)
                joint = _torch_needed(_gap(nl, cp, c1) + _gap(nl, cp, c2), dmg)
                cert1 = min(cert1, max(to_p[c1], to_p[c2], joint))
        cert2 = INF
        sb = s[flat].view(kd, -1, c)                                          # [kd buckets, d, C]
        for cc in range(c):
            if cc == cp:
                continue
            gap = 2 * (s[:, cp] > s[:, cc]).sum().item() - kd + (1 if cc > cp else 0)
            dmg = 2 * (sb[:, :, cp] > sb[:, :, cc]).long().sum(dim=1)
            cert2 = min(cert2, max(to_s[cc], _torch_needed(gap, dmg)))
        preds.append(cp)
        radii.append(min(cert1, cert2) - 1)
    return preds, radii


# ======================================================================================================
# 1. Synthetic saved logits
# ======================================================================================================
def synthetic_logits(members: int, n: int, c: int, seed: int, agree: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Float32 logits ``[members, n, c]``: per point a true label ``y`` and an agreement probability
    ``p ~ Beta`` with mean ``agree``; each member votes ``y`` with probability ``p``, else mostly a per-point
    "confusing" class (else any class); the voted class gets a logit bump, and a dissenting member still
    ranks ``y`` high (so the run-off differs from the plurality)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    p = rng.beta(2.0 * agree / (1 - agree), 2.0, n) if agree < 1 else np.ones(n)
    confuse = (y + rng.integers(1, c, n)) % c
    agreeing = rng.random((members, n)) < p[None, :]
    other = np.where(rng.random((members, n)) < 0.6, confuse[None, :], rng.integers(0, c, (members, n)))
    vote = np.where(agreeing, y[None, :], other)
    logits = rng.normal(0.0, 1.0, (members, n, c)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(members), np.arange(n), indexing="ij")
    logits[rows, cols, vote] += rng.uniform(2.0, 4.0, (members, n)).astype(np.float32)
    logits[rows, cols, y[None, :].repeat(members, 0)] += np.where(agreeing, 0.0, 1.5).astype(np.float32)
    return logits, y


def _best_of(fn, repeats: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _subsample(n: int, m: int) -> np.ndarray:
    return np.arange(n) if m <= 0 or m >= n else np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))


def _compare(cert, loop: tuple[list[int], list[int]], pts: np.ndarray) -> dict[str, Any]:
    lp, lr = np.asarray(loop[0]), np.asarray(loop[1])
    cp, cr = cert.prediction[pts], cert.radius[pts]
    bad = np.flatnonzero((lp != cp) | (lr != cr))
    clamp = np.flatnonzero((lp == cp) & (lr == -1) & (cr == 0))
    out = {"points": int(len(pts)), "prediction_mismatches": int((lp != cp).sum()),
           "radius_mismatches": int((lr != cr).sum()), "mismatches": int(len(bad)),
           "loop_minus1_certkit_0": int(len(clamp))}
    if len(bad):
        out["examples"] = [{"point": int(pts[j]), "loop": [int(lp[j]), int(lr[j])], "certkit": [int(cp[j]), int(cr[j])]}
                           for j in bad[:5]]
    return out


def _time_loop(fn, pts: np.ndarray, n: int) -> tuple[float, tuple[list[int], list[int]]]:
    t0 = time.perf_counter()
    out = fn(pts)
    return (time.perf_counter() - t0) / len(pts) * n, out


def bench_certification(args: argparse.Namespace) -> dict[str, Any]:
    n, c = args.points, 10
    assert (dp(0, 10), dp(6, 10), dp(7, 10), dp(10, 10), dp(20, 20), dp(2, 2), dp(3, 3)) == (5, 6, 6, 7, 14, 2, 2)
    res: dict[str, Any] = {"points": n, "classes": c}
    rows = []
    k, kf, d = args.roe_k, args.fa_k, args.fa_d
    perm = tuple(int(s) for s in np.random.default_rng(2).permutation(kf * d))
    layout = Layout.fa(kf, d, member_subset=perm)   # 200 learners saved in a shuffled file order
    roe_logits, _ = synthetic_logits(k, n, c, seed=1)
    fa_logits, _ = synthetic_logits(kf * d, n, c, seed=3)
    cases = (
        ("DPA+ROE", f"K={k}", lambda x=roe_logits: roe_certify(x), 3,
         [("pure Python", lambda p, x=roe_logits: loop_roe(x, p), args.roe_loop_points),
          ("torch per point", lambda p, x=roe_logits: torch_roe(x, p), args.roe_loop_points)]),
        ("FA", f"k={kf}, d={d} ({kf * d} learners)", lambda x=fa_logits: fa_certify(x, layout), 2,
         [("pure Python", lambda p, x=fa_logits: loop_fa(x, layout, p), args.fa_loop_points),
          ("torch per point", lambda p, x=fa_logits: torch_fa(x, layout, p), args.fa_loop_points)]),
        ("FA+ROE", f"k={kf}, d={d} ({kf * d} learners)", lambda x=fa_logits: fa_roe_certify(x, layout), 2,
         [("pure Python", lambda p, x=fa_logits: loop_fa_roe(x, layout, p), args.faroe_loop_points),
          ("torch per point", lambda p, x=fa_logits: torch_fa_roe(x, layout, p), args.faroe_loop_points)]),
    )
    for label, setup, certkit_fn, repeats, loops in cases:
        t_ck, cert = _best_of(certkit_fn, repeats)
        for style, loop_fn, m in loops:
            pts = _subsample(n, m)
            t_loop, out = _time_loop(loop_fn, pts, n)
            rows.append({"certificate": label, "setup": setup, "loop_style": style, "certkit_s": t_ck,
                         "loop_s": t_loop, "loop_points": len(pts), "speedup": t_loop / t_ck,
                         **_compare(cert, out, pts), "median_radius": float(np.median(cert.radius))})
        print(f"  {label}: certkit {t_ck:.3f} s", flush=True)
    res["rows"] = rows
    # ---- tie-heavy logits: integer-valued (many logit ties and vote ties)
    ties = []
    m = args.tie_points
    for label, members, fn, loop_fns, npts in (
            ("DPA+ROE", k, lambda x: roe_certify(x), (lambda x, p: loop_roe(x, p), lambda x, p: torch_roe(x, p)), m),
            ("FA", kf * d, lambda x: fa_certify(x, layout),
             (lambda x, p: loop_fa(x, layout, p), lambda x, p: torch_fa(x, layout, p)), m),
            ("FA+ROE", kf * d, lambda x: fa_roe_certify(x, layout),
             (lambda x, p: loop_fa_roe(x, layout, p), lambda x, p: torch_fa_roe(x, layout, p)), m // 4)):
        x, _ = synthetic_logits(members, npts, c, seed=4)
        x = np.round(x / 2.0).astype(np.float32)      # coarse integer logits: ties everywhere
        cert = fn(x)
        pts = np.arange(npts)
        for style, loop_fn in zip(("pure Python", "torch per point"), loop_fns):
            ties.append({"certificate": label, "loop_style": style, **_compare(cert, loop_fn(x, pts), pts)})
    res["ties"] = ties
    return res


# ======================================================================================================
# 2. Partition training: n_jobs = 2 vs 1
# ======================================================================================================
def wait_for_quiet(max_wait: float, limit: float = 1.0, cores: float = 1.7) -> dict[str, Any]:
    """Wait (60 s at a time, up to ``max_wait``) until the 1-minute load is <= ``limit`` and two processes
    really get ``cores`` cores between them (:func:`machine_parallelism`)."""
    waited, par = 0.0, float("nan")
    while waited < max_wait:
        load = os.getloadavg()[0]
        if load <= limit:
            par = machine_parallelism(5_000_000)
            if par >= cores:
                break
        print(f"  load average {load:.2f}, parallelism {par:.2f}x: waiting 60 s ({waited:.0f} s so far)", flush=True)
        time.sleep(60)
        waited += 60
    return {"load_1min": os.getloadavg()[0], "waited_s": waited}


def _shas(run, members: int) -> list[str]:
    return [run.manifest["models"][member_name(m)]["sha256"] for m in range(members)]


def _member_sum(run, members: int) -> float:
    """Sum of the members' own training times, as recorded by the workers (excludes dispatch and saving)."""
    return float(sum(run.manifest["timings"][f"train/{member_name(m)}"] for m in range(members)))


def bench_parallel(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    quiet = wait_for_quiet(args.max_wait)
    spec = EnsembleSpec(dataset="digits", model="digits-cnn", attack="badnets", poison_rate=0.1, layout="partition",
                        k=args.par_k, epochs=args.par_epochs, batch_size=16, seed=0)
    t0 = time.perf_counter()
    run = train_ensemble(spec, root / "par-cold-j2", n_jobs=2, progress=False)   # starts and warms the loky workers
    cold = time.perf_counter() - t0
    shas = [_shas(run, spec.members)]
    train_ensemble(dataclasses.replace(spec, epochs=1), root / "par-warm-j1", n_jobs=1, progress=False)
    par_before = machine_parallelism(5_000_000)
    reps = []
    for r in range(args.par_repeats):
        load = os.getloadavg()[0]
        times, member_s = {}, {}
        for jobs in (1, 2):
            t0 = time.perf_counter()
            run = train_ensemble(spec, root / f"par-{r}-j{jobs}", n_jobs=jobs, progress=False)
            times[jobs] = time.perf_counter() - t0
            member_s[jobs] = _member_sum(run, spec.members)
            shas.append(_shas(run, spec.members))
        reps.append({"load_1min_before": load, "j1_s": times[1], "j2_s": times[2], "speedup": times[1] / times[2],
                     "j1_member_sum_s": member_s[1], "j2_member_sum_s": member_s[2]})
    identical = all(s == shas[0] for s in shas)
    best1, best2 = min(r["j1_s"] for r in reps), min(r["j2_s"] for r in reps)
    return {"k": args.par_k, "epochs": args.par_epochs, "members": spec.members, "cold_j2_s": cold,
            "repeats": reps, "best_j1_s": best1, "best_j2_s": best2, "speedup": best1 / best2,
            "bit_identical": identical, "machine_parallelism_before": par_before, **quiet}


# ======================================================================================================
# 3. Certified accuracy on digits
# ======================================================================================================
def _epochs_for(spec: EnsembleSpec, steps: int) -> tuple[int, float]:
    """Epochs that give each member about ``steps`` optimiser steps (batch ``spec.batch_size``)."""
    data = prepare_data(spec)
    sizes = np.array([len(i) for i in ensemble_layout(spec, data).indices])
    per_epoch = np.ceil(sizes / spec.batch_size).mean()
    epochs = max(1, int(round(steps / per_epoch)))
    return epochs, float(epochs * per_epoch)


def _largest_half(acc: dict[str, float]) -> int:
    ok = [int(r) for r, a in acc.items() if a >= 0.5]
    return max(ok) if ok else -1


def _train(root: Path, name: str, steps: int, n_jobs: int, **kw: Any) -> tuple[Any, EnsembleSpec, dict]:
    spec = EnsembleSpec(dataset="digits", model="digits-cnn", attack="badnets", target=0, batch_size=16, lr=1e-3,
                        seed=0, epochs=1, **kw)
    epochs, mean_steps = _epochs_for(spec, steps)
    spec = dataclasses.replace(spec, epochs=epochs)
    t0 = time.perf_counter()
    run = train_ensemble(spec, root / name, n_jobs=n_jobs, progress=False)
    wall = time.perf_counter() - t0
    recorded = run.manifest["timings"].get("train_ensemble", wall)
    return run, spec, {"epochs": epochs, "mean_steps": mean_steps, "train_s": wall, "train_recorded_s": recorded,
                       "load_1min_after_training": os.getloadavg()[0]}


def _certify(run, label: str, info: dict, certificate: str, **cfg: Any) -> dict[str, Any]:
    radii = tuple(range(0, 31))
    t0 = time.perf_counter()
    row = certify_aggregation(run, AggregationCertifyConfig(certificate=certificate, radii=radii, **cfg),
                              progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    acc = row["certified_accuracy"]
    arrays, _ = read_member_outputs(run)
    member_acc = float((arrays["clean_logits"].argmax(axis=2) == arrays["clean_labels"][None, :]).mean())
    return {"method": label, "certificate": certificate, **info, "clean": row["clean_accuracy"],
            "member_acc": member_acc,
            "acc": {str(r): acc[str(r)] for r in (0, *RADII)}, "median_radius": row["median_radius"],
            "largest_r_half": _largest_half(acc), "asr": row["asr"], "n_poisoned": row["n_poisoned"],
            "poisoned_in_unit": row["poisoned_in_unit"], "ctr_samples": row["ctr_samples"],
            "certify_s": row["seconds"], "certify_call_s": wall,
            "evaluate_s": run.manifest["timings"].get("aggregation/evaluate")}


def bench_digits(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rows, tiny = [], []
    steps, jobs = args.steps, args.n_jobs
    bagging_certify([[5, 1]], n=100, k=10)   # compile the numba Clopper-Pearson kernel outside the timings
    torch.set_num_threads(1)                 # numba's omp layer may have raised torch's thread count (see main)
    for k in args.dpa_k:
        run, _, info = _train(root, f"dpa-k{k}", steps, jobs, layout="partition", k=k, poison_rate=0.1)
        rows.append(_certify(run, f"DPA k={k}", info, "dpa"))
        rows.append(_certify(run, f"DPA+ROE k={k}", {**info, "shared": True}, "roe"))
        print(f"  {rows[-2]['method']}: trained in {info['train_s']:.0f} s", flush=True)
    run, _, info = _train(root, "fa-k10-d4", steps, jobs, layout="finite-aggregation", k=10, d=4, poison_rate=0.1)
    rows.append(_certify(run, "FA k=10, d=4", info, "fa"))
    rows.append(_certify(run, "FA+ROE k=10, d=4", {**info, "shared": True}, "fa-roe"))
    print(f"  FA: trained in {info['train_s']:.0f} s", flush=True)
    run, spec, info = _train(root, f"bagging-k100-n{args.bagging_draws}", steps, jobs, layout="bootstrap", k=100,
                             members=args.bagging_draws, poison_rate=0.1)
    bag = _certify(run, f"bagging k=100, N={args.bagging_draws}", info, "bagging", alpha=0.001, bonferroni=True)
    # the reference's Bonferroni factor: the clean test points only (certkit's bonferroni=True also counts the
    # triggered inputs certified in the same call)
    arrays, _ = read_member_outputs(run)
    votes = arrays["clean_logits"].argmax(axis=2)
    counts = np.stack([(votes == j).sum(axis=0) for j in range(arrays["clean_logits"].shape[2])], axis=1)
    n_clean = len(arrays["clean_labels"])
    data = prepare_data(spec)
    cert = bagging_certify(counts, n=len(data.splits.train), k=100, alpha=0.001, n_test=n_clean,
                           labels=arrays["clean_labels"])
    bag["acc_bonferroni_clean_only"] = {str(r): float(cert.certified_accuracy(r)) for r in (0, *RADII)}
    rows.append(bag)
    print(f"  bagging: trained in {info['train_s']:.0f} s", flush=True)
    # a poisoning the certificate can cover: 6 poisoned images
    run, _, info = _train(root, "dpa-k50-tiny", steps, jobs, layout="partition", k=50, poison_rate=args.tiny_rate)
    tiny.append(_certify(run, "DPA k=50", info, "dpa"))
    tiny.append(_certify(run, "DPA+ROE k=50", {**info, "shared": True}, "roe"))
    return {"rows": rows, "tiny": tiny, "n_train": len(data.splits.train), "n_test": len(data.splits.test),
            "n_jobs": jobs, "steps_target": steps}


# ======================================================================================================
# report
# ======================================================================================================
def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _train_cell(row: dict[str, Any]) -> str:
    return "same members" if row.get("shared") else f"{row['train_s']:.0f}"


def report(res: dict[str, Any]) -> None:
    if "certification" in res:
        r = res["certification"]
        print(f"\n## 1. Certification from saved logits: {r['points']:,} points, {r['classes']} classes "
              "(synthetic, members agree with the label w.p. ~0.8)")
        print("| certificate | members | certkit [s] | loop style | loop [s] | loop timed on | speed-up | "
              "mismatches (pred / radius) | median radius |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            ext = "all points" if row["loop_points"] == r["points"] else f"{row['loop_points']:,} (extrapolated)"
            print(f"| {row['certificate']} | {row['setup']} | {row['certkit_s']:.3f} | {row['loop_style']} | "
                  f"{row['loop_s']:.1f} | {ext} | **{row['speedup']:.0f}x** | {row['prediction_mismatches']} / "
                  f"{row['radius_mismatches']} of {row['points']:,} | {row['median_radius']:g} |")
        print("\nTie-heavy logits (integer-valued: logit ties and vote ties everywhere):")
        print("| certificate | loop style | points | mismatches (pred / radius) | of which loop -1, certkit 0 (clamp) |")
        print("|---|---|---|---|---|")
        for row in r["ties"]:
            print(f"| {row['certificate']} | {row['loop_style']} | {row['points']} | {row['prediction_mismatches']} / "
                  f"{row['radius_mismatches']} | {row['loop_minus1_certkit_0']} |")
            for ex in row.get("examples", []):
                print(f"|   example | | point {ex['point']} | loop (pred, r) = {ex['loop']} | certkit = {ex['certkit']} |")
    if "parallel" in res:
        p = res["parallel"]
        print(f"\n## 2. DPA training, n_jobs=2 vs 1: digits, k={p['k']} partitions, {p['epochs']} epochs, batch 16 "
              f"(load average {p['load_1min']:.2f} at the start, waited {p['waited_s']:.0f} s; machine "
              f"parallelism {p['machine_parallelism_before']:.2f}x)")
        print("| repeat | load before | n_jobs=1 [s] | n_jobs=2 [s] | speed-up | sum of member times, n_jobs=1 / 2 [s] |")
        print("|---|---|---|---|---|---|")
        for i, rep in enumerate(p["repeats"]):
            print(f"| {i + 1} | {rep['load_1min_before']:.2f} | {rep['j1_s']:.2f} | {rep['j2_s']:.2f} | "
                  f"{rep['speedup']:.2f}x | {rep['j1_member_sum_s']:.2f} / {rep['j2_member_sum_s']:.2f} |")
        print(f"| best | | {p['best_j1_s']:.2f} | {p['best_j2_s']:.2f} | **{p['speedup']:.2f}x** | |")
        print(f"| first n_jobs=2 call (starts the workers) | | | {p['cold_j2_s']:.2f} | | |")
        print(f"members bit-identical (sha256 in the manifests, all {1 + 2 * len(p['repeats'])} runs, the cold one "
              f"included): {p['bit_identical']}")
    if "digits" in res:
        g = res["digits"]
        print(f"\n## 3. Certified accuracy on digits ({g['n_train']} train / {g['n_test']} test), BadNets 10%, "
              f"~{g['steps_target']} Adam steps of batch 16 per member, n_jobs={g['n_jobs']}")
        print("| method | epochs (steps) | member acc | clean | r=1 | r=3 | r=5 | r=10 | largest r with >= 0.5 | median | "
              "ASR | CTR at attack (need) | train [s] | evaluate [s] | certify [s] |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in g["rows"]:
            a = row["acc"]
            print(f"| {row['method']} | {row['epochs']} ({row['mean_steps']:.0f}) | {row['member_acc']:.3f} | "
                  f"{row['clean']:.3f} | "
                  + " | ".join(f"{a[str(x)]:.3f}" for x in RADII)
                  + f" | {row['largest_r_half']} | {row['median_radius']:g} | {row['asr']:.3f} | "
                  f"{_f(row['ctr_samples'])} ({row['poisoned_in_unit']}) | {_train_cell(row)} | "
                  f"{_f(row['evaluate_s'], 1)} | {row['certify_s']:.4f} |")
        print("\nReference section 4.3 (1437/360 split, reference CNN, SGD) and difference (certkit - reference):")
        print("| method | ref clean | ref r=1 | ref r=3 | ref r=5 | ref r=10 | ref median | ref train [s] | "
              "max abs diff (clean, r=1..10) | within 0.03 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in g["rows"]:
            name = "bagging k=100, N=200" if row["certificate"] == "bagging" else row["method"]
            ref = REFERENCE.get(name)
            if ref is None:
                continue
            mine = [row["clean"]] + [row["acc"][str(x)] for x in RADII]
            theirs = [ref["clean"]] + [ref[str(x)] for x in RADII]
            diff = max(abs(a - b) for a, b in zip(mine, theirs))
            print(f"| {name} | {ref['clean']:.3f} | " + " | ".join(f"{ref[str(x)]:.3f}" for x in RADII)
                  + f" | {ref['median']} | {ref.get('train_s', '')} | {diff:.3f} | {'yes' if diff <= 0.03 else 'no'} |")
        bag = next(r for r in g["rows"] if r["certificate"] == "bagging")
        print(f"bagging certified accuracy at r=0: {bag['acc']['0']:.3f} (Bonferroni over all "
              f"certified points); with the reference's Bonferroni over the clean test points only: "
              + ", ".join(f"r={r}: {v:.3f}" for r, v in bag["acc_bonferroni_clean_only"].items())
              + " (reference: r=0 0.35, r=1 0.186)")
        print("\nA poisoning the certificate can cover: DPA k=50 at poison rate "
              f"{res['args']['tiny_rate']}:")
        print("| method | poisoned | need (unit) | member acc | clean | r=10 | ASR | CTR (samples) | train [s] |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in g["tiny"]:
            print(f"| {row['method']} | {row['n_poisoned']} | {row['poisoned_in_unit']} | {row['member_acc']:.3f} | "
                  f"{row['clean']:.3f} | "
                  f"{row['acc']['10']:.3f} | {row['asr']:.3f} | {_f(row['ctr_samples'])} | {_train_cell(row)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], help="which parts to run (default 1 2 3)")
    p.add_argument("--json", help="also write the results as JSON to this path")
    p.add_argument("--out", help="keep the run directories of parts 2 and 3 here (default: a temporary directory)")
    p.add_argument("--points", type=int, default=10_000, help="synthetic test points of part 1")
    p.add_argument("--roe-k", type=int, default=50)
    p.add_argument("--fa-k", type=int, default=50)
    p.add_argument("--fa-d", type=int, default=4)
    p.add_argument("--roe-loop-points", type=int, default=0, help="points the ROE loop runs on (0 = all)")
    p.add_argument("--fa-loop-points", type=int, default=2000, help="points the FA loop runs on (0 = all)")
    p.add_argument("--faroe-loop-points", type=int, default=500, help="points the FA+ROE loop runs on (0 = all)")
    p.add_argument("--tie-points", type=int, default=1000, help="points of the tie-heavy check (FA+ROE: a quarter)")
    p.add_argument("--par-k", type=int, default=20)
    p.add_argument("--par-epochs", type=int, default=40)
    p.add_argument("--par-repeats", type=int, default=2)
    p.add_argument("--max-wait", type=float, default=600, help="seconds to wait for a 1-minute load <= 1.0")
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per member in part 3")
    p.add_argument("--dpa-k", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--bagging-draws", type=int, default=200)
    p.add_argument("--tiny-rate", type=float, default=0.005)
    p.add_argument("--n-jobs", type=int, default=2, help="training workers in part 3")
    args = p.parse_args()
    # one thread for torch and numba in this process: certkit's kernels are compared with single-threaded
    # loops, and the machine is shared (training parallelism comes from the loky workers).
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    print(f"# certkit aggregation benchmark: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"numpy {np.__version__}, load average {os.getloadavg()[0]:.2f}", flush=True)
    res: dict[str, Any] = {"args": vars(args), "machine": platform.machine(), "cpus": os.cpu_count(),
                           "torch": torch.__version__, "numpy": np.__version__}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="certkit-bench-agg-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if 2 in args.parts:   # first: it needs a quiet machine, before this process loads it
            print("part 2: partition training n_jobs=2 vs 1 ...", flush=True)
            res["parallel"] = bench_parallel(args, root)
        if 1 in args.parts:
            print("part 1: certification from saved logits ...", flush=True)
            res["certification"] = bench_certification(args)
        if 3 in args.parts:
            print("part 3: certified accuracy on digits ...", flush=True)
            res["digits"] = bench_digits(args, root)
            res["digits"]["bagging_draws"] = args.bagging_draws
    res["total_s"] = time.perf_counter() - t_start
    res["cpu_s"] = time.process_time()
    children = os.times()
    res["cpu_children_s"] = children.children_user + children.children_system
    report(res)
    print(f"\ntotal wall {res['total_s']:.0f} s; CPU of this process {res['cpu_s']:.0f} s (+ {res['cpu_children_s']:.0f} s "
          f"in reaped child processes; loky workers are not counted); load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
