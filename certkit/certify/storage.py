"""Storage-update (memory-based) certification: a store of certified balls that makes the certificates of
a classifier with data-dependent sigma hold jointly.

Why a store
-----------
With a per-input noise level (DDRS: Alfarra, Bibi, Torr & Ghanem, "Data Dependent Randomized Smoothing",
UAI 2022, PMLR v180 -- the memory-based certification of its section 3.5; ANCER: Eiras et al., "ANCER:
Anisotropic Certification via Sample-wise Volume Maximization", TMLR 2022; Cert-SSB: Qiao et al.,
"Cert-SSB: Toward Certified Sample-Specific Backdoor Defense", arXiv 2504.21730, 2025) the smoothed
classifier uses a new sigma at every input, *including inside a certified ball*, so the per-point
certificates of Cohen et al. do not combine into a statement about one classifier. The fix of DDRS section
3.5 is a *memory-augmented* classifier: certified balls ``(x_j, y_j, r_j, sigma_j)`` are stored, a query
inside a stored ball is answered with the stored label, and every new certificate is adjusted so that no
two stored balls of different labels intersect. The Cert-SSB pipeline figure calls the same procedure
"storage-update-based certification" ("Overlapping? -> No Update | Trim Region + Align Label; Maximize r").

Algorithm (docs/design.md section 2.6; certification-notes.md 1.e)
-------------------------------------------------------------------
Points are processed in a recorded order. For a new point ``x`` with its own certificate ``(y, r)`` and the
distances ``D_j = ||x - x_j||_2`` to the stored centres:

1. **Align.** If ``x`` lies strictly inside a stored ball of another label (``D_j < r_j``), take the one with
   the largest depth ``r_j - D_j``: ``y <- y_j``, ``r <- r_j - D_j`` (the new ball lies inside that ball,
   where the memory classifier already answers ``y_j``). An abstention (``y = -1``) inside a stored ball is
   aligned the same way (every label differs from -1): it reports what the deployed memory classifier
   answers there (see "Decisions").
2. **Trim.** ``r <- min(r, min over stored balls of labels != y of (D_j - r_j))``, never below 0. The bound
   is computed *after* aligning, against every ball whose label differs from the (possibly new) ``y``:
   DDRS's post-processor aligns using the most negative conflicting entry only and does not re-check the
   other balls; in a consistent store this re-check never binds (balls of different labels are disjoint,
   so by the triangle inequality ``D_k - r_k >= r_j - D_j``), but it is what keeps the invariant true by
   construction. ``D_j`` is a computed distance, within a relative ``(d / 8 + 6) u`` of the exact one
   (``d`` the flattened input dimension, ``u = 2^-53``), so each bound ``D_j - r_j`` is taken with a
   rounding margin (:func:`_trim_bound`): ``D_j`` shrunk by :func:`_distance_rtol` (``(d / 4 + 16) u``),
   the difference stepped down by ``4 u``. A trimmed radius is thus a few ulps of ``D_j`` smaller than
   ``D_j - r_j`` and the invariant holds in exact arithmetic on the stored float64 values. (A margin of a
   few ulps of the *radius* would not do: when ``r << D_j`` the error of ``D_j`` is many ulps of ``r``.)
3. **Maximise.** Where ``x`` lies inside stored balls of the same label, ``r <- max(r, max_j (r_j - D_j))``,
   still capped by the trim bound of step 2 (a no-op cap in a consistent store). This can make the radius
   *larger* than the point's own Monte-Carlo radius: the ball lies inside a stored ball, where the memory
   classifier answers ``y``.
4. **Store** ``(x, y, r, sigma)`` when ``y >= 0`` and ``r > 0``.

Invariant: no two stored balls with different labels intersect, ``D_ij >= r_i + r_j`` (open balls may
touch), exactly: ``D_ij`` the Euclidean distance of the stored float64 centres and ``r_i + r_j`` the sum
of the stored float64 radii, both as real numbers (tested with rational arithmetic). It holds pair by
pair: every ball is trimmed against every earlier ball of another label. (It is inherited, not re-checked,
for the balls of an earlier store passed in.)

Decisions (where the papers and the released code are silent)
--------------------------------------------------------------
* **Order dependence.** Certificates depend on the points processed before: a permutation of the test set
  can change labels, radii and certified accuracy (Sukenik, Kuvshinov & Guennemann, "Intriguing
  Properties of Input-Dependent Randomized Smoothing", ICML 2022, discuss the underlying soundness issue
  of input-dependent sigma). The order is therefore part of the result:
  ``order="given"`` (row order) or ``order="shuffle"`` (``numpy.random.default_rng(seed).permutation``), or an
  explicit permutation passed to :meth:`StorageCertifier.certify`; it is returned in
  :attr:`StorageResult.order` and passing it back reproduces the result exactly.
* **Statefulness.** The certified object is the memory classifier, i.e. the smoothed classifier *together
  with* the store. Certificates produced here hold only for a deployment that answers queries inside a
  stored ball with the stored label (:meth:`CertifiedStore.predict`, falling back to the smoothed
  classifier where it returns ``-1``) and that processes new certified inputs with the same update
  (``certify(..., store=previous_store)``). Persist the store (:meth:`CertifiedStore.save`) and deploy it
  with the model; its fingerprint ties it to the certified inputs.
* **Abstentions** (prediction ``-1``) report the deployed answer. Inside a stored ball (as the store is
  when the row is processed) the memory classifier answers the stored label, so the row takes it, with
  the align step's radius ``r_j - D_j`` of the deepest such ball (then trimmed like any row), exactly what
  :meth:`CertifiedStore.predict` answers there; it is counted as aligned, flagged in
  :attr:`StorageResult.adopted` (``n_covered_abstentions``) and stored like an aligned row. Outside every
  stored ball it stays ``-1`` with radius 0 and is not stored, even if a ball stored *later* covers it: a
  query is answered by the store as it was when the query came (docs/design.md section 10, transductive).
* **Radius 0.** A non-abstaining point whose radius ends at 0 (trimmed to the surface of another ball, or
  a zero radius to begin with) keeps its prediction with radius 0 (predicted, not certified) and is not
  stored: an open ball of radius 0 contains nothing.
* **Counts.** A point is *aligned* when step 1 changed its label (an abstention taking a stored label
  too), *trimmed* when step 2 strictly reduced its radius, *maximised* when step 3 strictly increased it.
  Aligned points are never maximised (the align radius already is the largest same-label depth).
* **Tie-break.** Among stored balls of the same largest depth the earliest stored wins
  (``tie_break="first"``) or the latest (``"last"``). By the invariant all stored balls containing a point
  carry one label, so the tie-break changes neither labels nor radii, only which ball is reported in
  :attr:`StorageResult.covered_by`.
* **Other fields.** ``p_lower`` and ``sigma`` of a row stay the point's own (Monte-Carlo bound and noise
  level); for an aligned or maximised row the radius no longer derives from them. ``correct`` is
  recomputed where the prediction changed. The store records the point's own sigma.
* **Inputs** are flattened to ``[N, D]`` float64; the radius is the Euclidean distance in these units.
  Infinite radii and coordinates beyond ``1e100`` in absolute value (squared distances would overflow)
  are refused.

Not determined by the papers: whether stored regions are ever shrunk (here: never; a stored certificate is
final), the tie-break, the treatment of abstentions and of the maximise step's cap. DDRS and ANCER report
never observing overlapping certificates on CIFAR-10/ImageNet; with the large per-sample sigmas of Cert-SSB
relative to inter-sample distances they do occur (see the tests on digits).

Implementation
--------------
The whole sequential loop is one numba kernel (:func:`_storage_update_kernel`) over contiguous float64
arrays; the cost is ``O(N^2 D)`` distance work, i.e. every new point is compared with the store as it is
when the point comes. To make that work fast, points are taken in blocks of 512 consecutive positions of
the order: the squared distances of a block to the store as it was before the block are bounded from below
by matrix products (``|a|^2 + |b|^2 - 2 a.b`` through BLAS, in float32 when ``|x| <= 1e15`` and float64
otherwise, minus a rigorous rounding margin, :func:`_bound_margins`; store chunks in parallel numba
threads, BLAS limited to one thread meanwhile), and only the balls that can matter for a
point (``D_j < (r_j + R) w``, where ``R`` bounds the point's final radius: its own radius or the depth of
a ball containing it, and ``w = 1 + (d / 2 + 48) u``, :func:`_prune_factor`, leaves room for the trim
margin) get their distance computed exactly, in one fixed summation order used throughout this module.
Every decision is taken on these exact distances, so the result is the point-by-point computation
against the current store (the tests compare it with a plain NumPy loop) and depends neither on the block
size nor on the number of threads; the bounds only skip balls that provably change nothing. The kernel
is compiled on first use in each process (a few seconds; numba cannot cache it on disk because ``np.dot``
binds BLAS through ctypes pointers); the distance helpers are cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from certkit._validation import check_seed
from certkit.certify.results import CertificationResult
from certkit.errors import InputError, RecordError
from certkit.io import atomic_write_bytes
from certkit.parallel import keep_torch_threads

__all__ = ["STORE_FORMAT_VERSION", "CertifiedStore", "StorageCertifier", "StorageResult"]

#: Version of the ``.npz`` layout written by :meth:`CertifiedStore.save`.
STORE_FORMAT_VERSION = 1

_EPS = float(np.finfo(np.float64).eps)
_UP = 1.0 + 4.0 * _EPS  # widening factor of the containment pruning of predict / check_invariant
_U = 2.0**-53  # unit roundoff of float64
_DOWN = 1.0 - 4.0 * _U  # exact in float64: a positive trim bound times _DOWN lies below its exact value
_TINY = 2.0**-500  # absolute slack of the trim bound: covers squared-distance terms that underflow

# kernel blocking: points per block, store entries per matrix-product tile (a [512, 1024] float64 tile is
# 4 MiB per thread), candidates listed per point and chunk before a direct scan
_BLOCK, _TILE, _CAND_CAP = 512, 1024, 128
# float32 distance bounds need |x| <= 1e15 (no overflow, margins of _bound_margins); inputs beyond 1e100 are
# refused (squared distances would overflow float64)
_SINGLE_MAX_ABS, _MAX_ABS = 1e15, 1e100

# bits of the per-point flags returned by the kernel
_ALIGNED, _TRIMMED, _MAXIMISED = 1, 2, 4

# ----------------------------------------------------------------------------------------------------------
# numba kernels


@njit(cache=True, nogil=True)
def _sqdist(a: np.ndarray, b: np.ndarray) -> float:
    """Squared l2 distance with a fixed summation order (4 accumulators, then the tail).

    This is the one definition of a distance in this module: the kernel, ``predict`` and
    ``check_invariant`` all use it, so their decisions agree bit for bit.
    """
    d = a.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= d:
        t0 = a[k] - b[k]
        t1 = a[k + 1] - b[k + 1]
        t2 = a[k + 2] - b[k + 2]
        t3 = a[k + 3] - b[k + 3]
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        k += 4
    s = (s0 + s1) + (s2 + s3)
    while k < d:
        t = a[k] - b[k]
        s += t * t
        k += 1
    return s


@njit(cache=True, nogil=True)
def _sqdist_exceeds(a: np.ndarray, b: np.ndarray, limit: float) -> tuple[bool, float]:
    """``(True, partial)`` as soon as the squared distance provably exceeds ``limit``, else ``(False, d2)``.

    Sums exactly as :func:`_sqdist` (so ``d2`` is bit-identical); checks every 16 coordinates whether the
    partial sum, which can only grow, is already above ``limit``.
    """
    d = a.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 4 <= d:
        t0 = a[k] - b[k]
        t1 = a[k + 1] - b[k + 1]
        t2 = a[k + 2] - b[k + 2]
        t3 = a[k + 3] - b[k + 3]
        s0 += t0 * t0
        s1 += t1 * t1
        s2 += t2 * t2
        s3 += t3 * t3
        k += 4
        if (k & 15) == 0:
            p = (s0 + s1) + (s2 + s3)
            if p > limit:
                return True, p
    s = (s0 + s1) + (s2 + s3)
    while k < d:
        t = a[k] - b[k]
        s += t * t
        k += 1
    return s > limit, s


def _distance_rtol(d: int) -> float:
    """Relative margin ``(d / 4 + 16) u`` of a distance ``fl(sqrt(_sqdist(a, b)))`` of ``d``-vectors.

    ``_sqdist`` sums at most ``ceil(d / 4)`` squared differences per accumulator (each within ``3 u`` of the
    exact square), then combines the accumulators and the tail in at most 5 more additions: its relative
    error is below ``(d / 4 + 9) u`` to first order, and the square root halves it and adds ``u``. The
    margin is about twice the resulting ``(d / 8 + 5.5) u``, which also covers the higher-order terms.
    """
    return (d + 64.0) * 2.0**-55


def _prune_factor(d: int) -> float:
    """Widening factor of the kernel's candidate thresholds ``(r_j + R) * factor``: a ball farther than
    that has a trim bound (:func:`_trim_bound`, margin :func:`_distance_rtol`) of at least ``R`` (for
    distances above about ``1e-130``, where ``_TINY`` is lost in rounding), so skipping it changes nothing."""
    return 1.0 + 2.0 * _distance_rtol(d) + 16.0 * _U


@njit(cache=True, nogil=True)
def _trim_bound(dist: float, r_other: float, keep: float) -> float:
    """Largest radius a new ball may take next to a stored ball of another label: below ``D - r_other`` in
    exact arithmetic, ``D`` the exact distance of the float64 centres; 0 when there is no room.

    ``dist`` is ``fl(sqrt(_sqdist))`` and ``keep = 1 - _distance_rtol(d)``: ``dist * keep - _TINY`` is at
    most ``D``; the difference with ``r_other`` is rounded to nearest, so ``* _DOWN`` steps it below its
    exact value (a subnormal difference is exact already). Hence ``r + r_other <= D`` holds exactly.
    """
    b = (dist * keep - _TINY) - r_other
    return b * _DOWN if b > 0.0 else 0.0


def _bound_margins(d: int, single: bool) -> tuple[float, float]:
    """``(c, a)`` such that ``(1 - c)(|x|^2 + |y|^2) - 2 fl(x.y) - a`` is below ``fl(_sqdist(x, y))``.

    float64 (``single=False``): rounding errors of the Gram form (two norms and a dot product, each within
    ``d u`` of their value, ``u = 2^-53``, plus three additions) and of ``_sqdist`` itself (within
    ``(d + 3) u`` of ``|x - y|^2 <= 2(|x|^2 + |y|^2)``) stay below ``(4 d + 16) u (|x|^2 + |y|^2)``; ``c`` doubles
    that. ``a`` covers products that underflow (``2^-1075`` each).

    float32 dot product (``single=True``, inputs rounded to float32 first, ``|x_k| <= 1e15``): the dot
    product is within ``(d + 3) u32 |x||y|`` of the exact one (``u32 = 2^-24``), so ``c`` adds
    ``2 (d + 4) u32``; ``a`` covers coordinates below float32's normal range (absolute error ``2^-150``,
    times ``|y_k| <= 1e15``) and underflowing products.
    """
    c64 = (8.0 * d + 64.0) * 2.0**-53
    if single:
        return c64 + 2.0 * (d + 4.0) * 2.0**-24, d * 1e-29
    return c64, d * 1e-300


@njit(parallel=True)  # no cache: np.dot binds BLAS through ctypes pointers
def _block_bounds(xb: np.ndarray, nb: np.ndarray, rb: np.ndarray, bflat: np.ndarray, nsq: np.ndarray,
                  slack: float, up: float, radii: np.ndarray, kpre: int, tile: int, gbuf: np.ndarray,
                  cand: np.ndarray, ncand: np.ndarray) -> None:
    """List, for each point of a block, the stored balls ``j < kpre`` that may matter for it.

    The store is cut into ``P = gbuf.shape[0]`` contiguous chunks processed in parallel (one thread each,
    single-threaded BLAS); chunk ``p`` multiplies the block by ``tile`` centres at a time
    (``G = Q @ S_tile.T``, float32 or float64 as ``bflat``) and forms ``L_ij = nb_i + nsq_j - 2 G_ij - slack``,
    a lower bound of the exact squared distance (``nb``/``nsq`` are squared norms times ``1 - c``,
    :func:`_bound_margins`). Ball ``j`` is a candidate of row ``i`` when ``L_ij < ((r_j + rb_i) up)^2``
    (``up``: :func:`_prune_factor`). ``cand[p, i]`` lists the first ``cand.shape[2]`` candidates of chunk
    ``p`` in increasing order, ``ncand[p, i]`` counts all of them.
    """
    m, d = xb.shape
    nchunk = gbuf.shape[0]
    cap = cand.shape[2]
    ntiles = (kpre + tile - 1) // tile
    for p in prange(nchunk):
        for i in range(m):
            ncand[p, i] = 0
        for t in range(p * ntiles // nchunk, (p + 1) * ntiles // nchunk):
            j0 = t * tile
            j1 = min(kpre, j0 + tile)
            kt = j1 - j0
            g = gbuf[p, : m * kt].reshape((m, kt))
            np.dot(xb, bflat[j0 * d: j1 * d].reshape((kt, d)).T, g)
            for i in range(m):
                cnt = ncand[p, i]
                a = nb[i] - slack
                r = rb[i]
                for j in range(kt):
                    low = a + nsq[j0 + j] - 2.0 * g[i, j]
                    u = (radii[j0 + j] + r) * up
                    if low < u * u:
                        if cnt < cap:
                            cand[p, i, cnt] = j0 + j
                        cnt += 1
                ncand[p, i] = cnt


@njit(cache=True, nogil=True)
def _rows(flat: np.ndarray, start: int, stop: int, d: int) -> np.ndarray:
    """Rows ``start:stop`` of a C-ordered ``[*, d]`` matrix kept as a flat buffer, as a C-contiguous view
    (a view numba knows to be contiguous, so BLAS needs no copy)."""
    return flat[start * d: stop * d].reshape((stop - start, d))


@njit  # no cache: np.dot binds BLAS through ctypes pointers
def _storage_update_kernel(x: np.ndarray, order: np.ndarray, pred: np.ndarray, rad: np.ndarray,
                           cflat: np.ndarray, labels: np.ndarray, radii: np.ndarray, k0: int,
                           bflat: np.ndarray, xbbflat: np.ndarray, gbuf: np.ndarray, margins: np.ndarray,
                           block: int, tile: int, tie_last: bool, cand_cap: int):
    """The sequential storage-update loop (align, trim, maximise, store) over all points.

    Args:
        x: ``[N, D]`` C-contiguous float64 inputs in row order.
        order: ``[N]`` int64 permutation: ``order[p]`` is the row processed at position ``p``.
        pred, rad: ``[N]`` own predictions (``-1`` abstain) and radii (finite, ``>= 0``).
        cflat, labels, radii: the store buffers of capacity ``C = K0 + N`` (centres as a flat C-ordered
            ``[C * D]`` buffer); the first ``k0`` entries hold an earlier, consistent store; the rest is
            filled here in processing order.
        bflat: the store centres in the precision of the distance bounds (float32, or ``cflat`` itself);
            ``xbbflat``: ``[B * D]`` block buffer of that precision; ``gbuf``: ``[P, B * tile]`` product
            buffers of that precision, one per parallel chunk.
        margins: ``[c, a, keep, up]``: rounding margins of the bound precision (:func:`_bound_margins`),
            ``1 - _distance_rtol(D)`` of the trim bound and the candidate widening :func:`_prune_factor`.
        block: points per block (``B``); tile: store entries per matrix product of the distance bound.
        tie_last: among equally deep containing balls report the latest stored one (else the earliest).
        cand_cap: candidates listed per point by the prefilter before it falls back to a direct scan.

    Returns:
        ``(k, out_pred, out_rad, covered_by, flags, store_pos, store_row)``: store size, adjusted predictions
        and radii (row order), deepest stored ball containing each point when it was processed (store
        position or -1), flag bits (1 aligned, 2 trimmed, 4 maximised), store position of each row (-1 if
        not stored) and the row of each store entry (-1 for the ``k0`` earlier entries).
    """
    n, d = x.shape
    cap_total = labels.shape[0]
    centers = cflat.reshape((cap_total, d))
    c, slack, keep, up = margins[0], margins[1], margins[2], margins[3]
    out_pred = pred.copy()
    out_rad = np.zeros(n)
    covered = np.full(n, -1, dtype=np.int64)
    flags = np.zeros(n, dtype=np.int64)
    store_pos = np.full(n, -1, dtype=np.int64)
    store_row = np.full(cap_total, -1, dtype=np.int64)
    nsq = np.empty(cap_total)  # (1 - c) |centre|^2 of every store entry (bound precision)
    zero = np.zeros(d)
    for j in range(k0):
        nsq[j] = (1.0 - c) * _sqdist(centers[j], zero)
    xbflat = np.empty(block * d)
    nb = np.empty(block)  # (1 - c) |x|^2 of the block's points
    rb = np.empty(block)
    nchunk = gbuf.shape[0]
    cand = np.empty((nchunk, block, cand_cap), dtype=np.int64)
    ncand = np.zeros((nchunk, block), dtype=np.int64)
    local_of = np.empty(block, dtype=np.int64)  # block-local row of each in-block store entry
    cj = np.empty(cap_total, dtype=np.int64)  # balls that may matter for the current point ...
    cd = np.empty(cap_total)  # ... and their exact distances
    k = k0
    for start in range(0, n, block):
        m = min(block, n - start)
        xb = _rows(xbflat, 0, m, d)
        xbb = _rows(xbbflat, 0, m, d)
        for i in range(m):
            row = order[start + i]
            for t in range(d):
                xb[i, t] = x[row, t]
                xbb[i, t] = x[row, t]
            nb[i] = (1.0 - c) * _sqdist(xb[i], zero)
            rb[i] = rad[row] if pred[row] >= 0 else 0.0
        kpre = k
        # ---- candidate balls among the store before the block (bounds from matrix products)
        if kpre > 0:
            _block_bounds(xbb, nb[:m], rb[:m], bflat, nsq, slack, up, radii, kpre, tile, gbuf, cand, ncand)
        # ---- bounds between points of the block
        gin = np.dot(xbb, xbb.T)
        ginb = np.empty((m, m))
        for i in range(m):
            for l2 in range(m):
                ginb[i, l2] = nb[i] + nb[l2] - 2.0 * gin[i, l2] - slack
        for i in range(m):
            row = order[start + i]
            y = pred[row]
            r = rb[i]
            xi = xb[i]
            # ---- exact distances of every ball that can matter (module docstring, "Implementation")
            rup = r
            nc = 0
            for rnd in range(2):
                nc = 0
                listed = True
                for p in range(nchunk):
                    listed = listed and ncand[p, i] <= cand_cap
                if kpre == 0:
                    pass
                elif rnd == 0 and listed:
                    for p in range(nchunk):
                        for q in range(ncand[p, i]):
                            j = cand[p, i, q]
                            cj[nc] = j
                            cd[nc] = math.sqrt(_sqdist(xi, centers[j]))
                            nc += 1
                else:  # too many candidates, or a wider radius bound: direct scan with early exit
                    for j in range(kpre):
                        t = (radii[j] + rup) * up
                        out, s = _sqdist_exceeds(xi, centers[j], t * t)
                        if not out:
                            cj[nc] = j
                            cd[nc] = math.sqrt(s)
                            nc += 1
                for j in range(kpre, k):
                    t = (radii[j] + rup) * up
                    if ginb[i, local_of[j - kpre]] < t * t:
                        cj[nc] = j
                        cd[nc] = math.sqrt(_sqdist(xi, centers[j]))
                        nc += 1
                deepest = -1.0
                for q in range(nc):
                    j = cj[q]
                    if cd[q] < radii[j]:
                        deepest = max(deepest, radii[j] - cd[q])
                if rnd == 0 and deepest > rup:
                    rup = deepest  # inside a ball deeper than the own radius: widen the bound, gather again
                else:
                    break
            # ---- covered_by: the deepest containing ball (any label)
            best = -1
            best_depth = -1.0
            for q in range(nc):
                j = cj[q]
                if cd[q] < radii[j]:
                    depth = radii[j] - cd[q]
                    if best < 0 or depth > best_depth or (tie_last and depth == best_depth):
                        best = j
                        best_depth = depth
            covered[row] = best
            if y < 0 and best < 0:
                continue  # abstention outside every stored ball: stays -1, radius 0, not stored
            # ---- 1. align: deepest containing ball of another label (for an abstention: of any label, i.e.
            #         the ball ``best``, whose label the memory classifier answers there)
            a_best = -1
            a_depth = -1.0
            for q in range(nc):
                j = cj[q]
                if labels[j] != y and cd[q] < radii[j]:
                    depth = radii[j] - cd[q]
                    if a_best < 0 or depth > a_depth or (tie_last and depth == a_depth):
                        a_best = j
                        a_depth = depth
            fl = 0
            if a_best >= 0:
                y = labels[a_best]
                r = a_depth
                fl |= _ALIGNED
            # ---- 2. trim against every ball of another label (recomputed after aligning), with the
            #         rounding margin that makes the invariant exact (_trim_bound)
            bound = np.inf
            for q in range(nc):
                j = cj[q]
                if labels[j] != y:
                    bound = min(bound, _trim_bound(cd[q], radii[j], keep))
            if r > bound:
                r = bound
                fl |= _TRIMMED
            # ---- 3. maximise inside same-label balls, capped by the trim bound
            mx = -1.0
            for q in range(nc):
                j = cj[q]
                if labels[j] == y and cd[q] < radii[j]:
                    mx = max(mx, radii[j] - cd[q])
            mx = min(mx, bound)
            if mx > r:
                r = mx
                fl |= _MAXIMISED
            out_pred[row] = y
            out_rad[row] = r
            flags[row] = fl
            # ---- 4. store
            if r > 0.0:
                for t in range(d):
                    centers[k, t] = xi[t]
                    bflat[k * d + t] = xi[t]
                labels[k] = y
                radii[k] = r
                nsq[k] = nb[i]
                store_row[k] = row
                store_pos[row] = k
                local_of[k - kpre] = i
                k += 1
    return k, out_pred, out_rad, covered, flags, store_pos, store_row


@njit(parallel=True, cache=True)
def _predict_kernel(q: np.ndarray, centers: np.ndarray, labels: np.ndarray, radii: np.ndarray):
    """Per query: deepest containing ball (-1 if none) and the largest depth of a containing ball whose
    label differs from it (``-inf`` if none; positive only when the store violates the invariant)."""
    m = q.shape[0]
    k = centers.shape[0]
    best = np.full(m, -1, dtype=np.int64)
    conflict = np.full(m, -np.inf)
    for i in prange(m):
        bj = -1
        bd = 0.0
        for j in range(k):
            rj = radii[j]
            lim = (rj * rj) * _UP
            out, s = _sqdist_exceeds(q[i], centers[j], lim)
            if out:
                continue
            dist = math.sqrt(s)
            if dist < rj:
                depth = rj - dist
                if bj < 0 or depth > bd:
                    bj = j
                    bd = depth
        best[i] = bj
        if bj >= 0:
            worst = -np.inf
            for j in range(k):
                if labels[j] == labels[bj]:
                    continue
                rj = radii[j]
                out, s = _sqdist_exceeds(q[i], centers[j], (rj * rj) * _UP)
                if out:
                    continue
                dist = math.sqrt(s)
                if dist < rj:
                    worst = max(worst, rj - dist)
            conflict[i] = worst
    return best, conflict


@njit(parallel=True, cache=True)
def _invariant_kernel(centers: np.ndarray, labels: np.ndarray, radii: np.ndarray, rtol: float) -> np.ndarray:
    """Per ball ``i``: the number of later balls ``j`` of another label with ``r_i + r_j > D_ij (1 + rtol)``."""
    k = centers.shape[0]
    bad = np.zeros(k, dtype=np.int64)
    for i in prange(k):
        cnt = 0
        for j in range(i + 1, k):
            if labels[j] == labels[i]:
                continue
            s = radii[i] + radii[j]
            out, d2 = _sqdist_exceeds(centers[i], centers[j], (s * s) * _UP)
            if out:
                continue
            if s > math.sqrt(d2) * (1.0 + rtol):
                cnt += 1
        bad[i] = cnt
    return bad


# ----------------------------------------------------------------------------------------------------------
# helpers


def _as_points(x: Any, name: str = "x") -> np.ndarray:
    """``x`` (array or tensor, ``[N, D]`` or ``[N, *shape]``) as a C-contiguous float64 ndarray (not flattened)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise InputError(f"{name} must be an array of points, got {type(x).__name__}") from exc
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or inf values")
    return arr


def fingerprint_array(x: np.ndarray) -> str:
    """sha256 of a point set: its shape, then its float64 C-order bytes (the dataset fingerprint)."""
    arr = np.ascontiguousarray(x, dtype=np.float64)
    h = hashlib.sha256()
    h.update(f"float64{tuple(int(s) for s in arr.shape)}".encode())
    if arr.size:
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


_BLAS_CONTROLLER: Any = None


def _single_threaded_blas() -> Any:
    """Context limiting BLAS to one thread: the kernel runs its matrix products in parallel numba threads,
    and a multi-threaded BLAS under them would oversubscribe the cores. (The library scan of threadpoolctl
    is done once per process.)"""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (load the BLAS numba calls, so that it is limited too)
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    if _BLAS_CONTROLLER is False:  # pragma: no cover
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def _check_order(order: Any, n: int) -> np.ndarray:
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InputError(f"order must be a 1-D permutation of range({n}), got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"order must hold integer row indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n and not np.array_equal(np.sort(arr), np.arange(n)):
        raise InputError(f"order must be a permutation of range({n}) (each row exactly once)")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------------------
# the store


_ARRAY_KEYS = ("centers", "labels", "radii", "sigmas", "ids", "shape")
_STRING_KEYS = ("fingerprint", "meta_json")


def _checksum(arrays: dict[str, np.ndarray], strings: dict[str, str], version: int) -> str:
    """sha256 over the format version, each array's name, dtype, shape and bytes, then the strings."""
    h = hashlib.sha256()
    h.update(f"certkit-store:{version}".encode())
    for key in _ARRAY_KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"|{key}|{a.dtype.str}|{a.shape}|".encode())
        if a.size:
            h.update(memoryview(a).cast("B"))
    for key in _STRING_KEYS:
        h.update(f"|{key}|".encode())
        h.update(strings[key].encode("utf-8"))
    return h.hexdigest()


@dataclass
class CertifiedStore:
    """The store of certified balls: part of the certified (memory-augmented) classifier.

    Attributes:
        centers: ``[K, D]`` float64 flattened inputs of the stored points, in processing order.
        labels: ``[K]`` int64 stored (possibly aligned) labels.
        radii: ``[K]`` float64 stored radii (all ``> 0``).
        sigmas: ``[K]`` float64 noise level of each stored point (its own; NaN if unknown).
        ids: ``[K]`` int64 the ``index`` of each stored point in its :class:`CertificationResult`
            (``-1`` where unknown).
        shape: shape of one input (``D == prod(shape)``).
        fingerprint: sha256 of the certified inputs (see :func:`fingerprint_array`), or a caller's id.
        meta: JSON-ready settings (order policy, seed, tie-break, counts).

    Deploy it with the model: :meth:`predict` answers inside a stored ball with the stored label and
    returns ``-1`` elsewhere, where the caller falls back to the smoothed classifier.
    """

    centers: np.ndarray
    labels: np.ndarray
    radii: np.ndarray
    sigmas: np.ndarray
    shape: tuple[int, ...]
    fingerprint: str = ""
    ids: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        d = int(np.prod(self.shape)) if self.shape else 1
        self.centers = np.ascontiguousarray(self.centers, dtype=np.float64)
        if self.centers.ndim != 2 or self.centers.shape[1] != d:
            raise InputError(f"centers must have shape [K, {d}] for inputs of shape {self.shape}, "
                             f"got {self.centers.shape}")
        k = self.centers.shape[0]
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64).reshape(-1)
        self.radii = np.ascontiguousarray(self.radii, dtype=np.float64).reshape(-1)
        self.sigmas = np.ascontiguousarray(self.sigmas, dtype=np.float64).reshape(-1)
        ids = np.full(k, -1) if self.ids is None else self.ids
        self.ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        for name in ("labels", "radii", "sigmas", "ids"):
            if getattr(self, name).shape[0] != k:
                raise InputError(f"{name} has {getattr(self, name).shape[0]} entries, expected {k}")
        if k and (self.labels < 0).any():
            raise InputError("stored labels must be >= 0 (abstentions are never stored)")
        if k and (not np.isfinite(self.radii).all() or (self.radii <= 0).any()):
            raise InputError("stored radii must be finite and > 0")
        if not np.isfinite(self.centers).all():
            raise InputError("centers contain NaN or inf values")
        self.fingerprint = str(self.fingerprint)
        self.meta = dict(self.meta)

    def __len__(self) -> int:
        return int(self.centers.shape[0])

    def __repr__(self) -> str:
        return (f"CertifiedStore(k={len(self)}, shape={self.shape}, "
                f"classes={np.unique(self.labels).tolist() if len(self) <= 10**6 else '...'}, "
                f"fingerprint={self.fingerprint[:12]!r})")

    @property
    def dim(self) -> int:
        return int(self.centers.shape[1])

    @classmethod
    def empty(cls, shape: tuple[int, ...], fingerprint: str = "") -> CertifiedStore:
        d = int(np.prod(shape)) if shape else 1
        return cls(np.zeros((0, d)), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), shape, fingerprint)

    # ------------------------------------------------------------------ queries
    def _queries(self, x: Any) -> tuple[np.ndarray, bool]:
        arr = _as_points(x)
        d = self.dim
        if arr.shape == self.shape or (arr.ndim == 1 and arr.shape[0] == d):
            return arr.reshape(1, d), True
        if arr.ndim >= 2 and (arr.shape[1:] == self.shape or (arr.ndim == 2 and arr.shape[1] == d)):
            return np.ascontiguousarray(arr.reshape(arr.shape[0], d)), False
        raise InputError(f"x must be one input of shape {self.shape} or a batch [M, *{self.shape}] / [M, {d}], "
                         f"got shape {arr.shape}")

    def lookup(self, x: Any) -> np.ndarray:
        """Store position of the deepest stored ball strictly containing each query (``-1``: none).

        Raises :class:`~certkit.errors.RecordError` if a query lies inside balls of different labels by more
        than rounding (a store violating the invariant).
        """
        q, single = self._queries(x)
        if len(self) == 0:
            best = np.full(q.shape[0], -1, dtype=np.int64)
        else:
            with keep_torch_threads():
                best, conflict = _predict_kernel(q, self.centers, self.labels, self.radii)
            scale = np.where(best >= 0, self.radii[np.maximum(best, 0)], 0.0)
            bad = conflict > 1e-9 * np.maximum(scale, 1e-300)
            if bad.any():
                i = int(np.argmax(bad))
                raise RecordError(f"query {i} lies inside stored balls of different labels (depth "
                                  f"{conflict[i]:.3g}): the store violates its invariant")
        return best[0] if single else best

    def predict(self, x: Any) -> tuple[Any, Any]:
        """Label of the stored ball containing ``x`` (``-1`` where none does) and whether one does.

        ``x`` is one input (shape ``self.shape`` or ``[D]``) -> ``(int, bool)``, or a batch
        ``[M, *shape]`` / ``[M, D]`` -> ``(labels [M] int64, covered [M] bool)``. Where the answer is
        ``-1`` the caller falls back to the smoothed classifier (and, to keep the certificates valid, adds
        the new certificate with ``StorageCertifier.certify(..., store=this_store)``).
        """
        best = self.lookup(x)
        if np.ndim(best) == 0:
            b = int(best)
            return (int(self.labels[b]), True) if b >= 0 else (-1, False)
        covered = best >= 0
        labels = np.where(covered, self.labels[np.maximum(best, 0)] if len(self) else -1, -1).astype(np.int64)
        return labels, covered

    def check_invariant(self, rtol: float = 1e-9) -> bool:
        """True when no two stored balls of different labels intersect: ``r_i + r_j <= D_ij (1 + rtol)``.

        ``O(K^2 D)`` in the worst case (pairs far apart stop early).
        """
        if len(self) < 2:
            return True
        with keep_torch_threads():
            return not bool(_invariant_kernel(self.centers, self.labels, self.radii, float(rtol)).any())

    # ------------------------------------------------------------------ persistence
    def _payload(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        arrays = {
            "centers": self.centers, "labels": self.labels, "radii": self.radii, "sigmas": self.sigmas,
            "ids": self.ids, "shape": np.asarray(self.shape, dtype=np.int64),
        }
        strings = {"fingerprint": self.fingerprint, "meta_json": json.dumps(self.meta, sort_keys=True)}
        return arrays, strings

    def save(self, path: str | Path) -> Path:
        """Write the store to ``path`` (``.npz``, no pickles) atomically.

        The file holds the arrays, the input shape, the fingerprint, the meta (JSON), ``format_version`` and a
        sha256 ``checksum`` over all of them. The whole file is serialised in memory first and moved into
        place with :func:`~certkit.runs.rundir.atomic_write_bytes`, so an existing store is either replaced
        completely or left untouched.
        """
        arrays, strings = self._payload()
        checksum = _checksum(arrays, strings, STORE_FORMAT_VERSION)
        buf = io.BytesIO()
        np.savez(buf, **arrays, **{k: np.asarray(v) for k, v in strings.items()},
                 format_version=np.asarray(STORE_FORMAT_VERSION, dtype=np.int64), checksum=np.asarray(checksum))
        return atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, *, expected_shape: tuple[int, ...] | None = None,
             check_invariant: bool = False) -> CertifiedStore:
        """Read a store written by :meth:`save`, verifying format version and checksum.

        Raises:
            InputError: no file at ``path``, or the store was built for inputs of another shape than
                ``expected_shape``.
            RecordError: the file is not a readable ``.npz`` store, has another format version, fails its
                checksum, is internally inconsistent, or (``check_invariant=True``) violates the invariant.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no store file at {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                contents = {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise RecordError(f"{path} is not a readable store file ({type(exc).__name__}: {exc})") from exc
        missing = [k for k in (*_ARRAY_KEYS, *_STRING_KEYS, "format_version", "checksum") if k not in contents]
        if missing:
            raise RecordError(f"{path} is not a certkit store: missing {', '.join(missing)}")
        try:
            version = int(contents["format_version"])
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{path}: unreadable format_version") from exc
        if version != STORE_FORMAT_VERSION:
            raise RecordError(f"{path} has store format version {version}; this certkit reads version "
                              f"{STORE_FORMAT_VERSION}")
        try:
            strings = {k: str(contents[k].item()) for k in _STRING_KEYS}
            stored_sum = str(contents["checksum"].item())
        except (ValueError, AttributeError) as exc:
            raise RecordError(f"{path}: malformed string fields") from exc
        arrays = {k: contents[k] for k in _ARRAY_KEYS}
        try:
            actual_sum = _checksum(arrays, strings, version)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{path}: arrays of unexpected types ({exc})") from exc
        if actual_sum != stored_sum:
            raise RecordError(f"{path} fails its checksum: the store was modified or is corrupt")
        shape = tuple(int(s) for s in arrays["shape"].reshape(-1))
        if expected_shape is not None and shape != tuple(int(s) for s in expected_shape):
            raise InputError(f"{path} holds a store for inputs of shape {shape}, expected {tuple(expected_shape)}")
        try:
            meta = json.loads(strings["meta_json"])
            store = cls(arrays["centers"], arrays["labels"], arrays["radii"], arrays["sigmas"], shape,
                        strings["fingerprint"], ids=arrays["ids"], meta=meta)
        except (InputError, ValueError) as exc:
            raise RecordError(f"{path} holds an inconsistent store: {exc}") from exc
        if check_invariant and not store.check_invariant():
            raise RecordError(f"{path}: stored balls of different labels intersect")
        return store


# ----------------------------------------------------------------------------------------------------------
# the certifier


@dataclass
class StorageResult:
    """Outcome of :meth:`StorageCertifier.certify`.

    Attributes:
        result: the adjusted :class:`CertificationResult`, same rows in the same order as the input;
            ``prediction``/``radius``/``correct`` after the storage update, ``meta["storage"]`` with the
            settings and counts.
        order: ``[N]`` int64, ``order[p]`` = row processed at position ``p`` (pass it back to reproduce).
        n_aligned, n_trimmed, n_maximised: number of points whose label was aligned, whose radius was
            strictly reduced by the trim, strictly increased by the maximise step.
        store: the :class:`CertifiedStore` after all points (including an earlier store passed in).
        aligned, trimmed, maximised: ``[N]`` bool per row.
        covered_by: ``[N]`` int64, store position of the deepest stored ball strictly containing the point
            when it was processed (``-1``: none).
        stored_as: ``[N]`` int64, store position of the row's own ball (``-1``: not stored).
        adopted: ``[N]`` bool, rows that abstained but lay inside a stored ball when processed: they report
            the stored label (:meth:`CertifiedStore.predict`) and are counted as aligned.
    """

    result: CertificationResult
    order: np.ndarray
    n_aligned: int
    n_trimmed: int
    n_maximised: int
    store: CertifiedStore
    aligned: np.ndarray
    trimmed: np.ndarray
    maximised: np.ndarray
    covered_by: np.ndarray
    stored_as: np.ndarray
    adopted: np.ndarray

    @property
    def n_stored(self) -> int:
        return int((self.stored_as >= 0).sum())

    def counts(self) -> dict[str, int]:
        return {"n_aligned": self.n_aligned, "n_trimmed": self.n_trimmed, "n_maximised": self.n_maximised,
                "n_stored": self.n_stored, "n_covered_abstentions": int(self.adopted.sum())}


class StorageCertifier:
    """Storage-update (memory-based) certification (DDRS section 3.5; Cert-SSB), see the module docstring.

    Args:
        order: ``"given"`` (row order) or ``"shuffle"`` (a permutation drawn from
            ``numpy.random.default_rng(seed)``). An explicit permutation passed to :meth:`certify` overrides it.
        seed: seed of the ``"shuffle"`` permutation.
        tie_break: ``"first"`` (default) or ``"last"``: among stored balls of equal largest depth containing
            a point, report the earliest (latest) stored one. It affects only
            :attr:`StorageResult.covered_by`: all balls containing a point carry one label (invariant).
        block_size: points per block of the kernel (``None``: automatic); results never depend on it.

    After :meth:`certify`, ``store_`` holds the store; :meth:`predict`, :meth:`save` and :meth:`load` act on
    it.
    """

    def __init__(self, order: str = "given", seed: int = 0, tie_break: str = "first",
                 block_size: int | None = None) -> None:
        self.order = order
        self.seed = seed
        self.tie_break = tie_break
        self.block_size = block_size
        self.store_: CertifiedStore | None = None

    def __repr__(self) -> str:
        return (f"StorageCertifier(order={self.order!r}, seed={self.seed!r}, tie_break={self.tie_break!r}, "
                f"block_size={self.block_size!r})")

    def get_params(self) -> dict[str, Any]:
        return {"order": self.order, "seed": self.seed, "tie_break": self.tie_break, "block_size": self.block_size}

    # ------------------------------------------------------------------ validation
    def _validated_params(self) -> tuple[str, int, bool, int | None]:
        if self.order not in ("given", "shuffle"):
            raise InputError(f"order must be 'given' or 'shuffle' (or pass an explicit permutation to certify), "
                             f"got {self.order!r}")
        check_seed(self.seed, limit=2**63)
        if self.tie_break not in ("first", "last"):
            raise InputError(f"tie_break must be 'first' or 'last', got {self.tie_break!r}")
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1):
            raise InputError(f"block_size must be a positive integer or None, got {bs!r}")
        return self.order, int(self.seed), self.tie_break == "last", None if bs is None else int(bs)

    # ------------------------------------------------------------------ certification
    def certify(self, x: Any, certificates: CertificationResult, *, order: Any = None,
                store: CertifiedStore | None = None, fingerprint: str | None = None) -> StorageResult:
        """Adjust ``certificates`` by the storage update, in the recorded order, and build the store.

        Args:
            x: ``[N, D]`` or ``[N, *shape]`` inputs (array or tensor), row ``i`` certified by row ``i`` of
                ``certificates``; flattened to float64.
            certificates: per-point ``prediction`` (``-1`` abstains), ``radius`` (finite), ``sigma``.
            order: ``None`` (the certifier's policy), or an explicit permutation of ``range(N)``.
            store: an earlier :class:`CertifiedStore` to continue from (same input shape); its balls are
                kept unchanged and the new points are processed after them.
            fingerprint: dataset id to record; default: sha256 of ``x`` as float64 (combined with the
                earlier store's fingerprint when continuing).

        Returns:
            :class:`StorageResult`; also sets ``self.store_``.
        """
        policy, seed, tie_last, bs = self._validated_params()
        if not isinstance(certificates, CertificationResult):
            raise InputError(f"certificates must be a CertificationResult, got {type(certificates).__name__}")
        pts = _as_points(x)
        n = len(certificates)
        if pts.ndim < 2 or pts.shape[0] != n:
            raise InputError(f"x must have shape [N, ...] with N = {n} (one row per certificate), got {pts.shape}")
        shape = tuple(int(s) for s in pts.shape[1:])
        d = int(np.prod(shape))
        flat = pts.reshape(n, d)
        if store is not None:
            if not isinstance(store, CertifiedStore):
                raise InputError(f"store must be a CertifiedStore, got {type(store).__name__}")
            if store.shape != shape:
                raise InputError(f"store was built for inputs of shape {store.shape}, x has shape {shape}")
        max_abs = max(float(flat.max()), -float(flat.min())) if flat.size else 0.0
        if store is not None and len(store):
            max_abs = max(max_abs, float(store.centers.max()), -float(store.centers.min()))
        if max_abs > _MAX_ABS:
            raise InputError(f"x has values up to {max_abs:.3g}; storage-update certification needs |x| <= {_MAX_ABS:g} "
                             "(squared distances must stay finite)")
        pred = np.ascontiguousarray(certificates.prediction, dtype=np.int64)
        rad = np.ascontiguousarray(certificates.radius, dtype=np.float64)
        if not np.isfinite(rad).all():
            raise InputError("certificates contain infinite radii; storage-update certification needs finite ones")
        rad = np.where(pred >= 0, rad, 0.0)
        if order is None:
            ordr = (np.arange(n, dtype=np.int64) if policy == "given"
                    else np.random.default_rng(seed).permutation(n).astype(np.int64))
            order_label = policy
        else:
            ordr = _check_order(order, n)
            order_label = "explicit"
        k0 = 0 if store is None else len(store)
        cap = k0 + n
        cflat = np.empty(cap * d)
        centers = cflat.reshape(cap, d)
        labels = np.empty(cap, dtype=np.int64)
        radii = np.empty(cap)
        if k0:
            centers[:k0] = store.centers
            labels[:k0] = store.labels
            radii[:k0] = store.radii
        block = bs if bs is not None else _BLOCK
        # distance bounds in float32 (twice the BLAS speed) when the values allow it, else float64
        single = max_abs <= _SINGLE_MAX_ABS
        bdtype = np.float32 if single else np.float64
        if single:
            bflat = np.empty(cap * d, dtype=np.float32)
            bflat[: k0 * d] = cflat[: k0 * d]  # the rest is written by the kernel as balls are stored
        else:
            bflat = cflat
        c, a = _bound_margins(d, single)
        keep, up = 1.0 - _distance_rtol(d), _prune_factor(d)
        xbb = np.empty(block * d, dtype=bdtype)
        with keep_torch_threads():  # numba.get_num_threads() starts numba's OpenMP layer
            gbuf = np.empty((max(1, numba.get_num_threads()), block * _TILE), dtype=bdtype)
        with keep_torch_threads(), _single_threaded_blas():
            k, out_pred, out_rad, covered, flags, stored_as, store_row = _storage_update_kernel(
                flat, ordr, pred, rad, cflat, labels, radii, k0, bflat, xbb, gbuf,
                np.array([c, a, keep, up]), block, _TILE, tie_last, _CAND_CAP)
        del bflat, gbuf
        new_rows = store_row[k0:k]
        sig_new = certificates.sigma[new_rows]
        ids_new = certificates.index[new_rows]
        if k0:
            sigmas = np.concatenate([store.sigmas, sig_new])
            ids = np.concatenate([store.ids, ids_new])
        else:
            sigmas, ids = sig_new, ids_new
        centers_k = centers[:k] if k >= 0.9 * cap else centers[:k].copy()
        del centers, cflat
        aligned = (flags & _ALIGNED) != 0
        trimmed = (flags & _TRIMMED) != 0
        maximised = (flags & _MAXIMISED) != 0
        adopted = (pred < 0) & (out_pred >= 0)
        fp = fingerprint
        if fp is None:
            fp = fingerprint_array(pts)
            if store is not None and store.fingerprint:
                fp = hashlib.sha256(f"{store.fingerprint}+{fp}".encode()).hexdigest()
        counts = {"n_aligned": int(aligned.sum()), "n_trimmed": int(trimmed.sum()),
                  "n_maximised": int(maximised.sum()), "n_stored": int((stored_as >= 0).sum()),
                  "n_covered_abstentions": int(adopted.sum())}
        settings = {"order": order_label, "seed": seed if order_label == "shuffle" else None,
                    "tie_break": self.tie_break, "continued_from": (store.fingerprint if store is not None
                                                                   else None),
                    "n_earlier_balls": k0, "fingerprint": str(fp)}
        meta_store = dict(store.meta) if store is not None else {}
        meta_store.update({"method": "storage-update", **settings, **counts, "n_balls": int(k)})
        new_store = CertifiedStore(centers_k, labels[:k].copy(), radii[:k].copy(), sigmas, shape, str(fp),
                                   ids=ids, meta=meta_store)
        changed = out_pred != certificates.prediction
        correct = certificates.correct.copy()
        correct[changed] = (out_pred[changed] == certificates.label[changed]) & (certificates.label[changed] >= 0)
        meta = dict(certificates.meta)
        meta["storage"] = {**settings, **counts}
        adjusted = CertificationResult(
            label=certificates.label, prediction=out_pred, radius=out_rad, p_lower=certificates.p_lower,
            sigma=certificates.sigma, correct=correct, triggered=certificates.triggered,
            index=certificates.index, trigger_norm=certificates.trigger_norm, meta=meta,
        )
        self.store_ = new_store
        return StorageResult(
            result=adjusted, order=ordr, n_aligned=counts["n_aligned"], n_trimmed=counts["n_trimmed"],
            n_maximised=counts["n_maximised"], store=new_store, aligned=aligned, trimmed=trimmed,
            maximised=maximised, covered_by=covered, stored_as=stored_as, adopted=adopted,
        )

    # ------------------------------------------------------------------ the fitted store
    def _fitted(self) -> CertifiedStore:
        if self.store_ is None:
            raise InputError("this StorageCertifier has no store yet: call certify(...) or load(...) first")
        return self.store_

    def predict(self, x: Any) -> tuple[Any, Any]:
        """:meth:`CertifiedStore.predict` on the fitted store."""
        return self._fitted().predict(x)

    def save(self, path: str | Path) -> Path:
        """:meth:`CertifiedStore.save` of the fitted store."""
        return self._fitted().save(path)

    @classmethod
    def load(cls, path: str | Path, *, expected_shape: tuple[int, ...] | None = None) -> StorageCertifier:
        """A certifier whose ``store_`` is the store at ``path`` (settings restored from its meta)."""
        store = CertifiedStore.load(path, expected_shape=expected_shape)
        meta = store.meta
        policy = meta.get("order") if meta.get("order") in ("given", "shuffle") else "given"
        seed = meta.get("seed")
        tie = meta.get("tie_break") if meta.get("tie_break") in ("first", "last") else "first"
        out = cls(order=policy, seed=int(seed) if isinstance(seed, int) and seed >= 0 else 0, tie_break=tie)
        out.store_ = store
        return out
