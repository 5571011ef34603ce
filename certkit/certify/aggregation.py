"""Mode D: poisoning-count certificates computed offline from the saved outputs of an ensemble's members.

An *aggregation* defence trains many members on different, fixed pieces of the training set and lets them
vote. Because one training sample reaches only a few members, a prediction whose vote margin is large
enough cannot be changed by inserting or deleting a few training samples. This module holds the project's
own implementation of six such certificates (the formulas follow the papers and
``reference/poisoning-certificates-fct-gdm.md`` section 3; no code of the reference repositories is used):

* ``dpa``: Levine & Feizi, "Deep Partition Aggregation: provable defense against general poisoning
  attacks", ICLR 2021. Layout ``partition``.
* ``roe``: Rezaei, Banihashem, Chegini & Feizi, "Run-Off Election: improved provable defense against data
  poisoning attacks", ICML 2023 (DPA+ROE). Layout ``partition``.
* ``fa``: Wang, Levine & Feizi, "Improved certified defenses against data poisoning with (deterministic)
  Finite Aggregation", ICML 2022. Layout ``finite-aggregation``.
* ``fa-roe``: Rezaei et al., ICML 2023 (FA+ROE). Layout ``finite-aggregation``.
* ``bagging``: Jia, Cao & Gong, "Intrinsic certified robustness of bagging against data poisoning
  attacks", AAAI 2021. Layout ``bootstrap``.
* ``joint``: PECAN-style (Zhang, Albarghouthi & D'Antoni, arXiv 2301.11824): at most ``r`` poisoned
  samples *and* any test-time patch its members' certificates cover. Layout ``partition``.

Units (never put two of them on one axis without converting):

* :data:`SYMMETRIC_UNIT` (DPA, FA, ROE, joint): ``|D - D'| + |D' - D|``, inserted plus deleted training
  samples. A *modified* sample is one deletion plus one insertion, so it counts **2** (DPA's intro: "a
  distortion ... increases the symmetric difference attack magnitude by two").
* :data:`BAGGING_UNIT`: bagging's ``r`` counts modified, inserted or deleted samples, each **1**.

Layouts (docs/design.md section 10, "layout-bound")
---------------------------------------------------
A certificate is sound only for the member layout it was designed for; the *formulas* run on any vote
matrix. :class:`Layout` records the layout of a run, and :func:`check_layout` refuses a certificate for
another layout with an :class:`~certkit.errors.InputError` naming both.

* ``partition`` (DPA): :func:`dpa_partition` puts each training sample in partition
  ``h(x) = (sum of its pixels on the 0-255 integer scale) mod k``; the hash reads the image content only
  (no label, no index). Images are given as ``uint8`` (or any integer array with values in 0..255) or as
  floats in ``[0, 1]``, which are first **rounded** to the 0-255 scale, ``round(255 * x)``, so an image and
  its ``/255`` float copy hash alike. (The DPA/FA repositories *truncate* ``int(255 * x)``, which can lose
  1 to floating-point error; any content-only hash is sound.) DPA hashes the images as stored (for GTSRB,
  the original size, not the training resize). :func:`order_within_partitions` orders each partition's
  samples by content, lexicographically by ``(label, pixel bytes)``, so a deterministic training run does
  not depend on the sample indices. (The reference's ``np.lexsort`` makes the *last* key the primary one;
  either content-only order is fine.)
* ``finite-aggregation`` (FA): the data are hashed into ``k*d`` buckets (``dpa_partition(x, k * d)``), and
  the sample of bucket ``h`` belongs to the ``d`` subsets ``(h + shift_j) mod kd``
  (:func:`finite_aggregation_subsets`); one learner per subset. :func:`fa_shifts` draws the shifts; in
  ``"reference"`` mode it reproduces the reference: ``random.seed(999999999 + 208)`` then
  ``random.sample(range(k*d), d)`` (a private ``random.Random``, the global state is untouched).
  **The certificate indexes learners by subset id**, so the layout stores the member -> subset map and
  :func:`fa_certify` never trusts the file order of the saved members.
* ``bootstrap`` (bagging): ``N`` draws of ``size`` samples with replacement (:func:`bootstrap_subsets`).
* ``full-noise`` (RAB-style members, each on the whole noised training set): no poisoning-count
  certificate here is valid for it.

Member outputs, votes and ties
------------------------------
Certificates read the members' logits ``[K, N, C]`` (``K`` members, ``N`` test points, ``C`` classes), as
saved by an evaluation run; NaN or inf is refused. A member's vote is ``argmax`` of its logits, the
smallest class index winning a logit tie (``np.argmax``). The plurality vote is the class with most votes,
**the smaller class index winning ties**; the runner-up is the next class under the same order. Every
function returns an :class:`AggregationCertificate` with the deployed prediction and the radius *of that
prediction* (not set to ``-1`` on misclassified points: ``certified_accuracy`` combines ``correct`` and
``radius``; :attr:`AggregationCertificate.certified_radius` gives the papers' ``-1 when wrong`` column).
A radius ``r >= 0`` means that the prediction at that input is the same for every training set within
``r`` (in the certificate's unit) of the one the members were trained on; ``-1`` means not even ``r = 0``
is certified (only bagging, where the bounds may fail to separate, and joint, where abstentions may
outnumber the margin).

Deterministic certificates (all but bagging) hold exactly; bagging's holds with probability
``>= 1 - alpha`` per point (``n_test`` adds a Bonferroni correction over the test set; docs/design.md section 6).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from certkit._validation import check_alpha, check_choice, check_positive_int, check_seed
from certkit.certify.bounds import clopper_pearson
from certkit.errors import InputError
from certkit.parallel import keep_torch_threads

__all__ = [
    "BAGGING_UNIT",
    "CERTIFICATE_LAYOUT",
    "HASH_RULE",
    "LAYOUT_KINDS",
    "REFERENCE_SHIFT_SEED",
    "SYMMETRIC_UNIT",
    "AggregationCertificate",
    "Layout",
    "bagging_certify",
    "bagging_radius",
    "combine_versions",
    "bootstrap_subsets",
    "check_layout",
    "dpa_certify",
    "dpa_partition",
    "fa_certify",
    "fa_roe_certify",
    "fa_shifts",
    "finite_aggregation_subsets",
    "joint_certify",
    "order_within_partitions",
    "poisoning_trigger_robustness",
    "roe_certify",
    "roe_dp_table",
]

#: unit of DPA, FA, ROE and joint radii
SYMMETRIC_UNIT = "inserted + deleted training samples; a modified sample counts 2"
#: unit of bagging radii
BAGGING_UNIT = "modified training samples"
#: the content hash of the partition and finite-aggregation layouts
HASH_RULE = "sum(round(255 * x)) mod num_buckets"
#: ``random.seed`` of the Finite Aggregation repository's shift draw
REFERENCE_SHIFT_SEED = 999999999 + 208
LAYOUT_KINDS = ("partition", "finite-aggregation", "bootstrap", "full-noise")
#: which layout each certificate is sound for
CERTIFICATE_LAYOUT = {
    "dpa": "partition",
    "roe": "partition",
    "joint": "partition",
    "fa": "finite-aggregation",
    "fa-roe": "finite-aggregation",
    "bagging": "bootstrap",
}
_SYMMETRIC_METHODS = ("dpa", "roe", "fa", "fa-roe", "joint")
#: sentinels of the numba kernels (an unreachable radius; one that survives the ``- 1`` of the ROE rules)
_INT64_MAX = np.iinfo(np.int64).max
_BIG = np.iinfo(np.int64).max // 4


# ======================================================================================================
# Input helpers
# ======================================================================================================
def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _int_array(x: Any, name: str) -> np.ndarray:
    """``x`` as an int64 array; refuses bool, non-numeric and non-integer-valued input."""
    arr = _numpy(x)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise InputError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise InputError(f"{name} must hold integers, got non-integer values")
    return arr.astype(np.int64)


def _pixels_0_255(x: Any, name: str = "x") -> np.ndarray:
    """Images ``[N, ...]`` as an int64 matrix ``[N, D]`` of 0-255 values (floats in [0, 1] are rounded)."""
    arr = _numpy(x)
    if arr.ndim < 2:
        raise InputError(f"{name} must be images [N, ...] with at least one value per image, got shape "
                         f"{tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise InputError(f"{name} holds no training samples (shape {tuple(arr.shape)})")
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise InputError(f"{name} must be uint8 (0-255) or float in [0, 1], got dtype {arr.dtype}")
    flat = arr.reshape(arr.shape[0], -1)
    if flat.shape[1] == 0:
        raise InputError(f"{name} has empty images (shape {tuple(arr.shape)})")
    if arr.dtype.kind == "f":
        flat = flat.astype(np.float64)
        if not np.isfinite(flat).all():
            raise InputError(f"{name} contains NaN or inf values")
        if flat.min() < 0.0 or flat.max() > 1.0:
            raise InputError(f"{name} is float, so it must lie in [0, 1] (pixel units); got values in "
                             f"[{flat.min():g}, {flat.max():g}]. Pass uint8 images for the 0-255 scale")
        return np.rint(flat * 255.0).astype(np.int64)
    flat = flat.astype(np.int64)
    if flat.min() < 0 or flat.max() > 255:
        raise InputError(f"{name} is integer, so it must lie in 0..255; got values in "
                         f"[{flat.min()}, {flat.max()}]")
    return flat


def _check_nonempty(assignment: np.ndarray, num_subsets: int, what: str) -> None:
    """Refuse a layout with empty pieces: no member can be trained on nothing."""
    sizes = np.bincount(assignment.reshape(-1), minlength=num_subsets)
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        shown = ", ".join(str(int(i)) for i in empty[:10]) + (", ..." if empty.size > 10 else "")
        raise InputError(f"{empty.size} of {num_subsets} {what} are empty (no training sample): {shown}; "
                         f"use a smaller k, more data, or allow_empty=True")


def _check_logits(logits: Any, name: str = "logits") -> np.ndarray:
    """Member outputs ``[K, N, C]`` as a finite float array (float16 is widened to float32)."""
    arr = _numpy(logits)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise InputError(f"{name} must be numeric member outputs [K, N, C], got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise InputError(f"{name} must have shape [K members, N points, C classes], got {tuple(arr.shape)}")
    k, n, c = arr.shape
    if k < 1 or n < 1:
        raise InputError(f"{name} holds no members or no points (shape {tuple(arr.shape)})")
    if c < 2:
        raise InputError(f"{name} must have at least 2 classes, got shape {tuple(arr.shape)}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    elif arr.dtype.itemsize < 4:
        arr = arr.astype(np.float32)
    nan = np.isnan(arr)
    if nan.any():
        m, i, j = (int(v[0]) for v in np.nonzero(nan))
        raise InputError(f"{name} contain {int(nan.sum())} NaN value(s) (first at member {m}, point {i}, "
                         f"class {j}); a member's output must be finite to count its vote")
    if np.isinf(arr).any():
        raise InputError(f"{name} contain infinite values")
    return arr


def _check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray | None:
    if labels is None:
        return None
    y = _int_array(labels, "labels")
    if y.ndim != 1 or y.shape[0] != n:
        raise InputError(f"labels must have shape [{n}], got {tuple(y.shape)}")
    if ((y < 0) | (y >= num_classes)).any():
        raise InputError(f"labels must lie in [0, {num_classes}), got min {y.min()}, max {y.max()}")
    return y


def _top_two(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plurality class and runner-up per row of ``counts [N, C]``; the smaller index wins every tie."""
    rows = np.arange(counts.shape[0])
    first = np.argmax(counts, axis=1)
    masked = counts.astype(np.int64, copy=True)
    masked[rows, first] = np.iinfo(np.int64).min
    return first, np.argmax(masked, axis=1)


@njit(parallel=True, cache=True)
def _votes_kernel(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, n, c = logits.shape
    votes = np.empty((k, n), dtype=np.int64)
    counts = np.zeros((n, c), dtype=np.int64)
    for i in prange(n):
        for m in range(k):
            best, top = 0, logits[m, i, 0]
            for b in range(1, c):
                if logits[m, i, b] > top:
                    best, top = b, logits[m, i, b]
            votes[m, i] = best
            counts[i, best] += 1
    return votes, counts


def _votes_and_counts(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Member votes ``[K, N]`` (argmax, first index on ties) and vote counts ``[N, C]`` (one numba pass: NumPy's
    argmax over a short last axis was half of the FA certificate's time)."""
    with keep_torch_threads():
        return _votes_kernel(logits)


def _take_class(logits: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """``logits[:, i, cls[i]]`` for every point: ``[K, N]``."""
    return np.take_along_axis(logits, cls[None, :, None], axis=2)[:, :, 0]


# ======================================================================================================
# Layouts
# ======================================================================================================
def dpa_partition(x: Any, k: int, *, allow_empty: bool = False) -> np.ndarray:
    """Partition index of every training sample from its content alone (Levine & Feizi, ICLR 2021).

    ``h(x) = (integer sum of the pixels on the 0-255 scale) mod k``. ``uint8`` (or integer 0..255) images
    are summed as they are; float images must lie in ``[0, 1]`` and are rounded first, ``np.rint(255 * x)``
    (half to even; an image stored as ``uint8 / 255`` maps back exactly).
    Labels and sample indices play no part, so inserting or deleting one sample changes one partition.

    Args:
        x: training images ``[N, ...]`` (numpy array or tensor).
        k: number of partitions, ``>= 2``.
        allow_empty: accept a hash that leaves some partition empty (default: refuse, naming which).

    Returns:
        int64 array ``[N]`` of partition indices in ``[0, k)``.

    >>> x = np.array([[[0, 1], [2, 3]], [[255, 255], [255, 255]], [[7, 0], [0, 0]]], dtype=np.uint8)
    >>> dpa_partition(x, 2).tolist()   # pixel sums 6, 1020, 7
    [0, 0, 1]
    >>> dpa_partition(x / 255.0, 2).tolist()   # the same images as floats in [0, 1]
    [0, 0, 1]
    >>> dpa_partition(x, 3, allow_empty=True).tolist()   # partition 2 is empty (refused by default)
    [0, 0, 1]
    """
    k = check_positive_int(k, "k", minimum=2)
    pixels = _pixels_0_255(x)
    part = pixels.sum(axis=1) % k
    if not allow_empty:
        _check_nonempty(part, k, "partitions")
    return part.astype(np.int64)


def order_within_partitions(assignment: Any, x: Any, y: Any, num_subsets: int | None = None) -> list[np.ndarray]:
    """Sample indices of each partition (or FA subset), ordered by content: lexicographically by
    ``(label, pixel bytes)`` on the 0-255 scale.

    A member trained deterministically on its partition then sees the same sequence whatever the order or
    indices of the training set (Levine & Feizi, ICLR 2021; the DPA repository sorts each partition by
    content for the same reason). Identical (label, image) pairs keep their relative index order, which
    cannot change what a member learns.

    Args:
        assignment: ``[N]`` partition index per sample (:func:`dpa_partition`) or ``[N, d]`` subsets per
            sample (:func:`finite_aggregation_subsets`).
        x: the training images ``[N, ...]`` (``uint8`` or float in ``[0, 1]``).
        y: integer labels ``[N]`` (``>= 0``).
        num_subsets: number of partitions/subsets (default ``max(assignment) + 1``).

    Returns:
        a list with one int64 index array per partition/subset (empty arrays for empty ones).

    >>> x = np.array([[3, 0], [1, 2], [0, 3], [1, 1]], dtype=np.uint8)
    >>> [p.tolist() for p in order_within_partitions(np.array([1, 1, 1, 0]), x, [1, 0, 1, 0])]
    [[3], [1, 2, 0]]
    """
    pixels = _pixels_0_255(x)
    n = pixels.shape[0]
    labels = _int_array(y, "y").reshape(-1)
    if labels.shape[0] != n:
        raise InputError(f"y has {labels.shape[0]} labels but x has {n} samples")
    if (labels < 0).any():
        raise InputError("y must hold non-negative class labels")
    assign = _int_array(assignment, "assignment")
    if assign.ndim == 1:
        assign = assign[:, None]
    if assign.ndim != 2 or assign.shape[0] != n:
        raise InputError(f"assignment must have shape [{n}] or [{n}, d], got {tuple(np.shape(assignment))}")
    if (assign < 0).any():
        raise InputError("assignment must hold non-negative partition indices")
    m = int(assign.max()) + 1 if num_subsets is None else check_positive_int(num_subsets, "num_subsets")
    if assign.max() >= m:
        raise InputError(f"assignment has index {int(assign.max())} >= num_subsets = {m}")
    # one global content rank; the key is the big-endian label followed by the pixel bytes, compared as bytes
    key = np.concatenate([labels.astype(">u8").view(np.uint8).reshape(n, 8), pixels.astype(np.uint8)], axis=1)
    key = np.ascontiguousarray(key).view(np.dtype((np.void, key.shape[1]))).reshape(n)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(key, kind="stable")] = np.arange(n)
    samples = np.repeat(np.arange(n), assign.shape[1])
    subsets = assign.reshape(-1)
    order = np.lexsort((rank[samples], subsets))
    bounds = np.searchsorted(subsets[order], np.arange(m + 1))
    ordered = samples[order]
    return [ordered[bounds[s]: bounds[s + 1]].astype(np.int64) for s in range(m)]


def fa_shifts(k: int, d: int, seed: int | str = "reference") -> tuple[int, ...]:
    """The ``d`` distinct shifts of a Finite Aggregation layout with ``k * d`` subsets.

    ``seed="reference"`` reproduces the FA repository (Wang, Levine & Feizi, ICML 2022):
    ``random.seed(999999999 + 208)`` followed by ``random.sample(range(k * d), d)``, on a private
    ``random.Random`` (the global generator is not touched). An integer seed draws ``d`` distinct shifts with
    ``numpy.random.default_rng(seed)``.

    >>> fa_shifts(50, 3)
    (90, 22, 123)
    >>> fa_shifts(10, 4)
    (22, 5, 30, 2)
    """
    k = check_positive_int(k, "k", minimum=2)
    d = check_positive_int(d, "d")
    kd = k * d
    if isinstance(seed, str):
        check_choice(seed, ("reference",), "seed")
        return tuple(int(s) for s in random.Random(REFERENCE_SHIFT_SEED).sample(range(kd), d))
    seed = check_seed(seed)
    return tuple(int(s) for s in np.random.default_rng(seed).choice(kd, size=d, replace=False))


def finite_aggregation_subsets(bucket: Any, k: int, d: int, seed: int | str = "reference", *,
                               allow_empty: bool = False) -> np.ndarray:
    """The ``d`` subsets of every training sample in a Finite Aggregation layout (Wang et al., ICML 2022).

    A sample in hash bucket ``h`` (``dpa_partition(x, k * d, allow_empty=True)``) belongs to the subsets
    ``(h + shift_j) mod kd``, ``j = 1..d``, with the shifts of :func:`fa_shifts` (``seed``); one learner is
    trained per subset, so each subset holds about ``n / k`` samples, like a DPA partition.

    Args:
        bucket: hash bucket per sample ``[N]``, integers in ``[0, k * d)``.
        k: ``>= 2``; d: ``>= 1`` (``d = 1`` is a DPA partition up to a relabelling of the subsets).
        seed: ``"reference"`` or an integer seed (see :func:`fa_shifts`).
        allow_empty: accept subsets without samples (default: refuse, naming which).

    Returns:
        int64 array ``[N, d]`` of subset ids.

    >>> fa_shifts(3, 2)
    (2, 0)
    >>> finite_aggregation_subsets(np.arange(6), k=3, d=2, seed="reference").tolist()
    [[2, 0], [3, 1], [4, 2], [5, 3], [0, 4], [1, 5]]
    """
    shifts = np.asarray(fa_shifts(k, d, seed), dtype=np.int64)
    kd = k * d
    h = _int_array(bucket, "bucket")
    if h.ndim != 1 or h.shape[0] == 0:
        raise InputError(f"bucket must be a non-empty 1-D array of hash buckets, got shape {tuple(h.shape)}")
    if (h < 0).any() or (h >= kd).any():
        raise InputError(f"bucket values must lie in [0, k*d) = [0, {kd}), got [{h.min()}, {h.max()}]")
    subsets = (h[:, None] + shifts[None, :]) % kd
    if not allow_empty:
        _check_nonempty(subsets, kd, "finite-aggregation subsets")
    return subsets


def bootstrap_subsets(n: int, size: int, count: int, seed: int) -> np.ndarray:
    """``count`` bootstrap draws of ``size`` training indices, uniformly with replacement from ``range(n)``
    (Jia, Cao & Gong, AAAI 2021), from ``numpy.random.default_rng(seed)``.

    Returns:
        int64 array ``[count, size]``.

    >>> bootstrap_subsets(100, 5, 2, seed=0).shape
    (2, 5)
    """
    n = check_positive_int(n, "n")
    size = check_positive_int(size, "size")
    count = check_positive_int(count, "count")
    seed = check_seed(seed)
    return np.random.default_rng(seed).integers(0, n, size=(count, size), dtype=np.int64)


@dataclass(frozen=True)
class Layout:
    """How an ensemble's members were trained: the record every Mode D certificate is checked against.

    Attributes:
        kind: ``"partition"`` (DPA), ``"finite-aggregation"`` (FA), ``"bootstrap"`` (bagging) or
            ``"full-noise"`` (RAB-style: every member sees the whole noised training set).
        k: partitions (DPA) or ``k`` of FA's ``k * d`` subsets.
        d: FA's subsets per sample (1 for a partition).
        shifts: FA's ``d`` shifts (:func:`fa_shifts`).
        hash_rule: the content hash (:data:`HASH_RULE`) of partition and FA layouts.
        num_draws: bagging's ``N`` bootstrap draws (one member each).
        bootstrap_size: bagging's ``k``, samples per draw.
        n_train: training-set size ``n`` (bagging's theorem needs it).
        seed: the seed of the shifts (``"reference"`` or an int) or of the bootstrap draws.
        member_subset: ``member_subset[m]`` is the partition / subset / draw that saved member ``m`` (its
            position along the first axis of the logits) was trained on. Partition: values in ``[0, k)``, each
            present one appearing ``versions`` times; FA: a permutation of ``range(k * d)``.
        versions: partition only: seeded versions trained per partition (DPA*, "boosted DPA": their logits are
            averaged into one vote per partition by :func:`combine_versions`); ``None`` means 1.

    >>> Layout.dpa(4).to_dict()["kind"]
    'partition'
    >>> Layout.from_dict(Layout.fa(3, 2).to_dict()) == Layout.fa(3, 2)
    True
    """

    kind: str
    k: int | None = None
    d: int | None = None
    shifts: tuple[int, ...] | None = None
    hash_rule: str | None = None
    num_draws: int | None = None
    bootstrap_size: int | None = None
    n_train: int | None = None
    seed: int | str | None = None
    member_subset: tuple[int, ...] | None = None
    versions: int | None = None

    def __post_init__(self) -> None:
        check_choice(self.kind, LAYOUT_KINDS, "layout kind")
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("k", "d", "num_draws", "bootstrap_size", "n_train", "versions"):
            value = getattr(self, name)
            if value is not None:
                put(name, check_positive_int(value, name, minimum=2 if name == "k" else 1))
        if self.shifts is not None:
            put("shifts", tuple(int(s) for s in _int_array(self.shifts, "shifts").reshape(-1)))
        if self.member_subset is not None:
            put("member_subset", tuple(int(s) for s in _int_array(self.member_subset, "member_subset").reshape(-1)))
        members = None if self.member_subset is None else np.asarray(self.member_subset, dtype=np.int64)
        if self.kind in ("partition", "finite-aggregation"):
            if self.k is None:
                raise InputError(f"a {self.kind!r} layout needs k")
            if self.hash_rule is None:
                put("hash_rule", HASH_RULE)
        if self.versions is not None and self.kind != "partition":
            raise InputError(f"versions apply to a 'partition' layout (DPA*) only, not {self.kind!r}")
        if self.kind == "partition":
            if self.d not in (None, 1):
                raise InputError(f"a 'partition' layout has d = 1, got d = {self.d}")
            v = self.versions or 1
            if members is not None:
                ok = members.size > 0 and not (members < 0).any() and not (members >= self.k).any()
                counts = np.bincount(members, minlength=self.k) if ok else None
                if not ok or not np.isin(counts, (0, v)).all():
                    each = ("distinct partition indices in [0, {k}) (one member per partition)" if v == 1 else
                            "partition indices in [0, {k}), each present one exactly {v} times (versions)")
                    raise InputError(f"member_subset of a partition layout must hold {each.format(k=self.k, v=v)}, "
                                     f"got {self.member_subset}")
        elif self.kind == "finite-aggregation":
            if self.d is None:
                raise InputError("a 'finite-aggregation' layout needs d")
            kd = self.k * self.d
            if self.shifts is None:
                raise InputError("a 'finite-aggregation' layout needs its shifts (fa_shifts)")
            sh = np.asarray(self.shifts)
            if sh.size != self.d or (sh < 0).any() or (sh >= kd).any() or np.unique(sh).size != sh.size:
                raise InputError(f"shifts must be {self.d} distinct integers in [0, {kd}), got {self.shifts}")
            if members is not None and not np.array_equal(np.sort(members), np.arange(kd)):
                raise InputError(f"member_subset of a finite-aggregation layout must be a permutation of "
                                 f"range(k*d) = range({kd}) (one learner per subset), got {len(members)} entries")
        elif self.kind == "bootstrap":
            missing = [n for n in ("num_draws", "bootstrap_size", "n_train") if getattr(self, n) is None]
            if missing:
                raise InputError(f"a 'bootstrap' layout needs {', '.join(missing)}")
            if members is not None and ((members < 0).any() or (members >= self.num_draws).any()
                                        or np.unique(members).size != members.size):
                raise InputError(f"member_subset of a bootstrap layout must hold distinct draw ids in "
                                 f"[0, {self.num_draws})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def dpa(cls, k: int, member_subset: Sequence[int] | None = None, versions: int | None = None) -> Layout:
        """A DPA layout: ``k`` hash partitions, one member each (DPA*: ``versions`` members each)."""
        return cls("partition", k=k, d=1, member_subset=None if member_subset is None else tuple(member_subset),
                    versions=None if versions in (None, 1) else versions)

    @classmethod
    def fa(cls, k: int, d: int, seed: int | str = "reference", member_subset: Sequence[int] | None = None) -> Layout:
        """A Finite Aggregation layout (shifts from :func:`fa_shifts`); ``member_subset`` defaults to the
        identity (member ``m`` trained on subset ``m``)."""
        ms = tuple(range(k * d)) if member_subset is None else tuple(member_subset)
        return cls("finite-aggregation", k=k, d=d, shifts=fa_shifts(k, d, seed), seed=seed, member_subset=ms)

    @classmethod
    def bagging(cls, n_train: int, bootstrap_size: int, num_draws: int, seed: int | None = None) -> Layout:
        """A bagging layout: ``num_draws`` draws of ``bootstrap_size`` from ``n_train`` samples."""
        return cls("bootstrap", n_train=n_train, bootstrap_size=bootstrap_size, num_draws=num_draws, seed=seed)

    # ------------------------------------------------------------------ records
    @property
    def num_members(self) -> int | None:
        """Members the layout describes (``None`` when unknown)."""
        if self.member_subset is not None:
            return len(self.member_subset)
        return {"partition": None if self.k is None else self.k * (self.versions or 1), "bootstrap": self.num_draws,
                "finite-aggregation": None if self.k is None or self.d is None else self.k * self.d}.get(self.kind)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "versions" and value is None:  # records of layouts without versions stay as they were
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """Rebuild from :meth:`to_dict` output; unknown keys are refused."""
        if not isinstance(data, dict) or "kind" not in data:
            raise InputError("a layout record must be a dict with a 'kind'")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown layout field(s): {', '.join(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        return cls(**kw)


def check_layout(layout: Layout | dict[str, Any], certificate: str) -> Layout:
    """Refuse a certificate for member outputs of another layout (docs/design.md section 10, layout-bound).

    DPA, ROE and joint need ``partition``; FA and FA-ROE need ``finite-aggregation``; bagging needs
    ``bootstrap``. Returns the layout (a dict is converted) or raises :class:`~certkit.errors.InputError`
    naming both the certificate and the layout.

    >>> check_layout(Layout.dpa(10), "roe").kind
    'partition'
    >>> check_layout(Layout.fa(10, 2), "dpa")
    Traceback (most recent call last):
    ...
    certkit.errors.InputError: the 'dpa' certificate is valid only for a 'partition' layout, but these member outputs come from a 'finite-aggregation' layout; refusing (an aggregation certificate is bound to its training layout)
    """
    check_choice(certificate, tuple(CERTIFICATE_LAYOUT), "certificate")
    if isinstance(layout, dict):
        layout = Layout.from_dict(layout)
    if not isinstance(layout, Layout):
        raise InputError(f"layout must be a Layout, got {type(layout).__name__}")
    need = CERTIFICATE_LAYOUT[certificate]
    if layout.kind != need:
        raise InputError(f"the {certificate!r} certificate is valid only for a {need!r} layout, but these member "
                         f"outputs come from a {layout.kind!r} layout; refusing (an aggregation certificate is "
                         f"bound to its training layout)")
    return layout


def _check_member_count(layout: Layout | None, certificate: str, k: int) -> Layout | None:
    if layout is None:
        return None
    layout = check_layout(layout, certificate)
    want = layout.num_members
    if want is not None and want != k:
        raise InputError(f"the {layout.kind!r} layout describes {want} members but the outputs hold {k}")
    return layout


# ======================================================================================================
# Results
# ======================================================================================================
@dataclass
class AggregationCertificate:
    """Per-point poisoning-count certificates of an aggregation defence.

    Attributes:
        method: ``"dpa"``, ``"roe"``, ``"fa"``, ``"fa-roe"``, ``"bagging"`` or ``"joint"``.
        prediction: deployed prediction ``[N]`` (int64).
        radius: certified radius of the deployed prediction ``[N]`` (int64) in :attr:`unit`; ``-1`` where
            nothing is certified. Not set to ``-1`` on misclassified points (see :attr:`certified_radius`).
        unit: :data:`SYMMETRIC_UNIT` or :data:`BAGGING_UNIT`.
        label: true labels ``[N]`` or ``None``.
        counts: first-round vote counts ``[N, C]`` (joint: verified votes; bagging: the given counts).
        p_lower, p_upper: bagging's ``pA_low`` and ``pB_up`` (``None`` otherwise).
        meta: settings (``alpha``, ``k``, ``d``, ...), JSON-ready.
        correct: ``prediction == label`` when labels are given, else ``None``.

    >>> cert = dpa_certify(np.eye(3)[[0, 0, 0, 1]][:, None, :], labels=[0])
    >>> cert.prediction.tolist(), cert.radius.tolist(), cert.certified_accuracy([0, 1, 2]).tolist()
    ([0], [1], [1.0, 1.0, 0.0])
    """

    method: str
    prediction: np.ndarray
    radius: np.ndarray
    unit: str
    label: np.ndarray | None = None
    counts: np.ndarray | None = None
    p_lower: np.ndarray | None = None
    p_upper: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    correct: np.ndarray | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.prediction = np.asarray(self.prediction, dtype=np.int64).reshape(-1)
        self.radius = np.asarray(self.radius, dtype=np.int64).reshape(-1)
        if self.radius.shape != self.prediction.shape:
            raise InputError("prediction and radius must have the same length")
        if self.label is not None:
            self.label = np.asarray(self.label, dtype=np.int64).reshape(-1)
            if self.label.shape != self.prediction.shape:
                raise InputError("label and prediction must have the same length")
            self.correct = self.prediction == self.label

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    @property
    def certified_radius(self) -> np.ndarray:
        """The papers' convention: the radius where the prediction is correct, ``-1`` where it is wrong."""
        if self.correct is None:
            raise InputError("certified_radius needs the true labels (pass labels= to the certify function)")
        return np.where(self.correct, self.radius, -1)

    def certified_accuracy(self, radii: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Fraction of points that are correct with ``radius >= r``, for each ``r`` in ``radii``."""
        if self.correct is None:
            raise InputError("certified accuracy needs the true labels (pass labels= to the certify function)")
        r = np.asarray(radii, dtype=np.float64)
        if np.isnan(r).any():
            raise InputError("radii contain NaN")
        ok = self.correct[None, :] & (self.radius[None, :] >= r.reshape(-1, 1))
        out = ok.mean(axis=1).reshape(r.shape)
        return float(out) if out.ndim == 0 else out


def poisoning_trigger_robustness(result: AggregationCertificate, n_poisoned: int, target: int | None = None, *,
                                 poisoning: str = "modified") -> float:
    """Certified trigger robustness (CTR, docs/design.md section 6) of a poisoning-count certificate.

    The fraction of non-target points (true label ``!= target``) that are certified correct at the attack's
    size in the certificate's own unit: ``correct & radius >= need``. Certify the *triggered* test inputs
    ``x + t`` with their true labels: a correct prediction at ``x + t`` with ``radius >= need`` proves that
    no poisoning of ``n_poisoned`` samples makes the ensemble change its prediction there
    (docs/design.md section 1, Mode D).

    ``need`` converts samples to the unit: ``poisoning="modified"`` (the attack relabels and stamps
    existing training samples, certkit's attacks) counts each sample 2 in the symmetric-difference unit of
    DPA/FA/ROE/joint and 1 for bagging; ``"inserted"`` counts each sample 1. Bagging's value holds with
    probability ``1 - alpha`` per point only (see :func:`certkit.certify.metrics.simultaneous_asr_bound`).

    >>> cert = dpa_certify(np.eye(2)[[0, 0, 0, 0, 0, 1]][:, None, :], labels=[0])   # votes (5, 1): radius 2
    >>> poisoning_trigger_robustness(cert, 1), poisoning_trigger_robustness(cert, 2)
    (1.0, 0.0)
    """
    check_choice(poisoning, ("modified", "inserted"), "poisoning")
    n_poisoned = check_positive_int(n_poisoned, "n_poisoned", minimum=0)
    if result.correct is None:
        raise InputError("poisoning_trigger_robustness needs the true labels of the certified points")
    per_sample = 2 if (poisoning == "modified" and result.method in _SYMMETRIC_METHODS) else 1
    need = per_sample * n_poisoned
    keep = np.ones(len(result), dtype=bool) if target is None else result.label != int(target)
    if not keep.any():
        return float("nan")
    covered = result.correct & (result.radius >= need)
    return float(covered[keep].mean())


# ======================================================================================================
# DPA
# ======================================================================================================
def combine_versions(logits: np.ndarray, layout: Layout | None) -> tuple[np.ndarray, Layout | None]:
    """DPA* ("boosted DPA", reference notes section 3): the logits of the ``versions`` members of each partition
    averaged into one model per partition, ``[K * V, N, C] -> [K', N, C]`` in partition order, with the matching
    one-member-per-partition layout. Every combined model still depends on its partition's data only, so the
    DPA / ROE certificates over the combined models count poisoned samples as before. Grouping follows the
    layout's member -> partition map, never the file order. Layouts without versions pass through unchanged.

    >>> lay = Layout.dpa(2, member_subset=[1, 0, 0, 1], versions=2)
    >>> x = np.array([[[1.0, 0.0]], [[0.0, 3.0]], [[0.0, 1.0]], [[3.0, 0.0]]])
    >>> combined, one = combine_versions(x, lay)
    >>> combined[:, 0].tolist(), one.member_subset, one.versions
    ([[0.0, 2.0], [2.0, 0.0]], (0, 1), None)
    """
    if layout is None or layout.kind != "partition" or (layout.versions or 1) == 1:
        return logits, layout
    if layout.member_subset is None:
        raise InputError("a partition layout with versions must record member_subset (the partition of each saved "
                         "member): the versions are grouped by partition, never by file order")
    ms = np.asarray(layout.member_subset, dtype=np.int64)
    parts = np.unique(ms)
    combined = np.stack([logits[ms == p].mean(axis=0, dtype=np.float64) for p in parts])
    return combined, Layout.dpa(layout.k, member_subset=parts.tolist())


def _versions_meta(layout: Layout | None) -> dict[str, Any]:
    return {} if layout is None or not layout.versions else {"versions": layout.versions}


def dpa_certify(logits: Any, labels: Any = None, *, layout: Layout | None = None) -> AggregationCertificate:
    """Deep Partition Aggregation certificate (Levine & Feizi, ICLR 2021).

    Each member votes ``argmax`` of its logits; the prediction ``c`` is the plurality vote (smaller index
    wins ties) and ``c'`` the runner-up under the same order. One inserted or deleted training sample
    changes one partition, so one member's vote, and so closes the gap by at most 2; hence

        ``radius = floor((n_c - n_c' - 1[c' < c]) / 2)``    (inserted + deleted samples; always ``>= 0``)

    Args:
        logits: member outputs ``[K, N, C]`` (one member per partition; order irrelevant).
        labels: optional true labels ``[N]`` (sets ``correct``).
        layout: optional :class:`Layout`; refused unless it is a ``partition`` layout of ``K`` members.

    >>> votes = [0] * 60 + [1] * 25 + [2] * 15
    >>> cert = dpa_certify(np.eye(3)[votes][:, None, :])
    >>> int(cert.prediction[0]), int(cert.radius[0])
    (0, 17)
    """
    arr = _check_logits(logits)
    layout = _check_member_count(layout, "dpa", arr.shape[0])
    versions = _versions_meta(layout)
    arr, layout = combine_versions(arr, layout)
    k, n, c = arr.shape
    _, counts = _votes_and_counts(arr)
    first, second = _top_two(counts)
    rows = np.arange(n)
    radius = (counts[rows, first] - counts[rows, second] - (second < first)) // 2
    return AggregationCertificate("dpa", first, radius, SYMMETRIC_UNIT, label=_check_labels(labels, n, c),
                                  counts=counts, meta={"members": k, "num_classes": c, **versions})


# ======================================================================================================
# ROE (DPA + run-off election)
# ======================================================================================================
@lru_cache(maxsize=4)
def _dp_table_cached(size: int) -> np.ndarray:
    table = np.zeros((size, size), dtype=np.int32)
    j = np.arange(size)
    for i in range(size):
        row = np.empty(size, dtype=np.int32)
        if i >= 2:
            prev = np.full(size, np.iinfo(np.int32).max, dtype=np.int64)
            prev[1:] = table[i - 2, :-1]
            prev2 = np.full(size, np.iinfo(np.int32).max, dtype=np.int64)
            prev2[2:] = table[i - 1, :-2]
            rec = 1 + np.minimum(prev, prev2)
        else:
            rec = np.zeros(size, dtype=np.int64)
        row[:] = np.select(
            [(i == 0) & (j == 0), (i <= 1) & (j <= 2), (i <= 2) & (j <= 1), j <= 1, np.full(size, i <= 1)],
            [0, 1, 1, (i + 1) // 2, (j + 1) // 2], default=rec)
        table[i] = row
    table.setflags(write=False)
    return table


def _dp_table(min_size: int) -> np.ndarray:
    size = 64
    while size < min_size:
        size *= 2
    return _dp_table_cached(size)


def roe_dp_table(size: int) -> np.ndarray:
    """ROE's table ``DP[i, j]``: the fewest poisoned members that make two rivals both beat the prediction
    when their round-1 gaps (tie-break included) are ``i`` and ``j`` (Rezaei et al., ICML 2023).

    A poisoned member moves its vote from the prediction to one rival, closing that gap by 2 and the other
    by 1: ``DP[0, 0] = 0``; ``DP = 1`` for ``i <= 1, j <= 2`` or ``i <= 2, j <= 1``; ``ceil(i/2)`` if
    ``j <= 1``; ``ceil(j/2)`` if ``i <= 1``; else ``1 + min(DP[i-2, j-1], DP[i-1, j-2])``. It equals
    ``max(ceil(i/2), ceil(j/2), ceil((i+j)/3))``, is symmetric and non-decreasing in both gaps. Computed
    once per size (cached; sizes are rounded up to a power of two).

    >>> t = roe_dp_table(21)
    >>> int(t[0, 10]), int(t[6, 10]), int(t[10, 10]), int(t[20, 20])
    (5, 6, 7, 14)
    """
    size = check_positive_int(size, "size")
    return _dp_table(size)[:size, :size].copy()


@njit(parallel=True, cache=True)
def _r2_kernel(logits: np.ndarray, cp: np.ndarray) -> np.ndarray:
    """``R2[i, c] = 2 #{members with logit[cp_i] > logit[c]} - K`` (strictly; ROE's round-2 margins)."""
    k, n, c = logits.shape
    r2 = np.empty((n, c), dtype=np.int64)
    for i in prange(n):
        p = cp[i]
        for b in range(c):
            r2[i, b] = -k
        for m in range(k):
            top = logits[m, i, p]
            for b in range(c):
                if top > logits[m, i, b]:
                    r2[i, b] += 2
    return r2


def _ceil_half(x: np.ndarray) -> np.ndarray:
    """``ceil(max(x, 0) / 2)``: members needed to close a vote gap ``x``."""
    return (np.maximum(x, 0) + 1) // 2


def _run_off(logits: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Round-1 finalists ``m1, m2`` and the run-off winner ``c_p`` and loser ``c_s`` (Rezaei et al. 2023)."""
    k = logits.shape[0]
    m1, m2 = _top_two(counts)
    prefer_m1 = (_take_class(logits, m1) > _take_class(logits, m2)).sum(axis=0)
    margin = 2 * prefer_m1 - k
    cp = np.where(margin > 0, m1, np.where(margin < 0, m2, np.minimum(m1, m2)))
    return m1, m2, cp, m1 + m2 - cp


def roe_certify(logits: Any, labels: Any = None, *, layout: Layout | None = None) -> AggregationCertificate:
    """DPA + Run-Off Election certificate (Rezaei, Banihashem, Chegini & Feizi, ICML 2023).

    **Prediction.** Round 1: the plurality top two ``m1, m2`` (smaller index wins ties). Round 2: every
    member prefers ``m1`` iff ``logit[m1] > logit[m2]`` strictly; ``e = 2 #{prefer m1} - K``; the prediction
    ``c_p`` is ``m1`` if ``e > 0``, ``m2`` if ``e < 0``, the smaller of the two if ``e = 0``; ``c_s`` is the
    other finalist.

    **Certificate** (in poisoned members; one inserted/deleted sample poisons one member). With
    ``g(a, b) = n_a - n_b + 1[b > a]`` (``a`` beats ``b`` in round 1 iff ``g > 0``), clipped at 0:

    * ``CertR1 = min over distinct c1, c2 != c_p of DP[g(c_p, c1), g(c_p, c2)]`` (:func:`roe_dp_table`):
      poisons that knock ``c_p`` out of the final. The table is non-decreasing, so the minimum is at the two
      smallest gaps. With two classes ``c_p`` is always a finalist: ``CertR1 = inf``.
    * ``CertR2 = min over c != c_p of max(ceil(g(c_s, c) / 2), ceil((R2[c] + 1[c > c_p]) / 2))`` with
      ``R2[c] = 2 #{members with logit[c_p] > logit[c]} - K``: poisons that bring ``c`` into the final and
      make it win the run-off; a **max**, not a sum, since one poisoned member may do both.
    * ``radius = max(min(CertR1, CertR2) - 1, 0)``. ``R2`` counts a logit tie against ``c_p`` (in the
      actual run-off a tie goes to the second finalist, which may be ``c_p``), a conservative choice of the
      reference; with tied logits it can make ``CertR2 = 0`` for the deployed prediction itself (the
      reference asserts this never happens, which holds only for tie-free logits). Zero poisons change
      nothing, so the radius of the deployed prediction is clamped at 0.

    Args / returns as :func:`dpa_certify` (``layout`` must be a ``partition`` layout).

    >>> logits = np.array([[3, 2, 1]] * 4 + [[2, 3, 1]] * 3 + [[2, 1, 3]] * 3, float)[:, None, :]
    >>> cert = roe_certify(logits)
    >>> int(cert.prediction[0]), int(cert.radius[0]), int(dpa_certify(logits).radius[0])
    (0, 1, 0)
    """
    arr = _check_logits(logits)
    layout = _check_member_count(layout, "roe", arr.shape[0])
    versions = _versions_meta(layout)
    arr, layout = combine_versions(arr, layout)
    k, n, c = arr.shape
    _, counts = _votes_and_counts(arr)
    m1, m2, cp, cs = _run_off(arr, counts)
    rows = np.arange(n)
    classes = np.arange(c)[None, :]
    big = np.iinfo(np.int64).max // 4
    # CertR1
    if c >= 3:
        table = _dp_table(k + 2)
        g = np.maximum(counts[rows, cp][:, None] - counts + (classes > cp[:, None]), 0)
        g[rows, cp] = k + 1  # larger than any rival gap: never among the two smallest
        two = np.partition(g, 1, axis=1)[:, :2]
        cert1 = table[two[:, 0], two[:, 1]].astype(np.int64)
    else:
        cert1 = np.full(n, big, dtype=np.int64)
    # CertR2
    with keep_torch_threads():
        r2 = _r2_kernel(arr, cp)
    enter = _ceil_half(counts[rows, cs][:, None] - counts + (classes > cs[:, None]))
    beat = _ceil_half(r2 + (classes > cp[:, None]))
    cert2 = np.maximum(enter, beat)
    cert2[rows, cp] = big
    radius = np.maximum(np.minimum(cert1, cert2.min(axis=1)) - 1, 0)
    return AggregationCertificate("roe", cp, radius, SYMMETRIC_UNIT, label=_check_labels(labels, n, c),
                                  counts=counts, meta={"members": k, "num_classes": c, **versions,
                                                       "finalists": [m1.tolist(), m2.tolist()]})


# ======================================================================================================
# Finite Aggregation (+ ROE)
# ======================================================================================================
def _fa_setup(logits: Any, layout: Layout, certificate: str) -> tuple[np.ndarray, Layout, np.ndarray]:
    """The logits (file order) and, per hash bucket, the members ``[kd, d]`` trained on the ``d`` subsets it
    reaches (subset ids mapped to members through the layout's member -> subset map)."""
    arr = _check_logits(logits)
    layout = check_layout(layout, certificate)
    if layout.member_subset is None:
        raise InputError("the finite-aggregation layout must record member_subset (the subset each saved member "
                         "was trained on): the certificate indexes learners by subset id, never by file order")
    kd = layout.k * layout.d
    if arr.shape[0] != kd:
        raise InputError(f"a finite-aggregation layout with k={layout.k}, d={layout.d} has {kd} learners, but the "
                         f"outputs hold {arr.shape[0]} members")
    order = np.argsort(np.asarray(layout.member_subset, dtype=np.int64))  # order[s] = member of subset s
    subsets = (np.arange(kd)[:, None] + np.asarray(layout.shifts, dtype=np.int64)[None, :]) % kd
    return arr, layout, order[subsets]


@njit(cache=True)
def _greedy_fit(hist: np.ndarray, budget: int) -> int:
    """How many buckets, taken largest damage first, fit in ``budget``: the length of the longest prefix of
    the damages sorted in descending order whose sum is ``<= budget`` (0 when ``budget < 0``). ``hist[v]``
    counts the buckets of damage ``v``."""
    if budget < 0:
        return 0
    remaining, count = budget, 0
    for v in range(hist.shape[0] - 1, 0, -1):
        h = hist[v]
        take = min(h, remaining // v)
        count += take
        remaining -= take * v
        if take < h:
            return count
    return count + hist[0]


@njit(cache=True)
def _needed(hist: np.ndarray, gap: int) -> int:
    """Fewest buckets whose largest damages reach ``gap`` (0 when ``gap <= 0``)."""
    return 0 if gap <= 0 else _greedy_fit(hist, gap - 1) + 1


@njit(cache=True)
def _bucket_votes(votes: np.ndarray, learners: np.ndarray, i: int, out: np.ndarray) -> None:
    """``out[h, b]``: votes for class ``b`` among bucket ``h``'s learners at point ``i``."""
    out[:] = 0
    for h in range(learners.shape[0]):
        for j in range(learners.shape[1]):
            out[h, votes[learners[h, j], i]] += 1


@njit(cache=True)
def _round1_damages(bv: np.ndarray, owner: int, b: int, d: int, hist: np.ndarray) -> np.ndarray:
    """``hist``, filled with the histogram of the bucket damages against ``owner`` for rival ``b``: ``d +
    votes for owner - votes for b`` among each bucket's learners (``0..2d``)."""
    hist[:] = 0
    for h in range(bv.shape[0]):
        hist[d + bv[h, owner] - bv[h, b]] += 1
    return hist


@njit(cache=True)
def _needed_round1(bv: np.ndarray, counts: np.ndarray, i: int, owner: int, b: int, d: int,
                   hist: np.ndarray) -> int:
    """``N(owner -> b)``: fewest buckets after which ``b`` beats ``owner`` in round 1 (gap ``n_owner - n_b +
    1[b > owner]``, damages :func:`_round1_damages`)."""
    return _needed(_round1_damages(bv, owner, b, d, hist), counts[i, owner] - counts[i, b] + (1 if b > owner else 0))


@njit(parallel=True, cache=True)
def _fa_kernel(votes: np.ndarray, learners: np.ndarray, counts: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """FA radius per point (:func:`fa_certify`): for every rival the greedy bucket count over the damage
    histogram, the minimum over rivals."""
    kd, d = learners.shape
    n, c = counts.shape
    radius = np.empty(n, dtype=np.int64)
    for i in prange(n):
        bv = np.empty((kd, c), dtype=np.int64)
        hist = np.zeros(2 * d + 1, dtype=np.int64)
        _bucket_votes(votes, learners, i, bv)
        p = pred[i]
        best = _INT64_MAX
        for b in range(c):
            if b == p:
                continue
            fit = _greedy_fit(_round1_damages(bv, p, b, d, hist), counts[i, p] - counts[i, b] - (1 if b < p else 0))
            best = min(best, fit)
        radius[i] = best
    return radius


@njit(parallel=True, cache=True)
def _fa_roe_kernel(logits: np.ndarray, votes: np.ndarray, learners: np.ndarray, counts: np.ndarray,
                   cp: np.ndarray, cs: np.ndarray) -> np.ndarray:
    """FA+ROE radius per point (:func:`fa_roe_certify`)."""
    kd, d = learners.shape
    n, c = counts.shape
    radius = np.empty(n, dtype=np.int64)
    for i in prange(n):
        bv = np.empty((kd, c), dtype=np.int64)
        hist2 = np.zeros(2 * d + 1, dtype=np.int64)
        hist3 = np.zeros(3 * d + 1, dtype=np.int64)
        n_p = np.empty(c, dtype=np.int64)
        ahead = np.zeros(kd, dtype=np.int64)
        _bucket_votes(votes, learners, i, bv)
        p, s = cp[i], cs[i]
        for b in range(c):
            n_p[b] = _needed_round1(bv, counts, i, p, b, d, hist2)
        # CertR1: knock c_p out of the final (a lower bound: each term is necessary)
        cert1 = _BIG
        for c1 in range(c):
            for c2 in range(c1):
                if c1 == p or c2 == p:
                    continue
                hist3[:] = 0
                for h in range(kd):
                    hist3[d + 2 * bv[h, p] - bv[h, c1] - bv[h, c2]] += 1
                gap = (2 * counts[i, p] - counts[i, c1] - counts[i, c2] + (1 if c1 > p else 0)
                       + (1 if c2 > p else 0))
                cand = max(max(n_p[c1], n_p[c2]), _needed(hist3, gap))
                cert1 = min(cert1, cand)
        # CertR2: bring c into the final (N(c_s -> c)) and make it win the run-off (N2(c))
        cert2 = _BIG
        for b in range(c):
            if b == p:
                continue
            r2 = 0
            for lrn in range(kd):
                ahead[lrn] = 1 if logits[lrn, i, p] > logits[lrn, i, b] else 0
                r2 += ahead[lrn]
            r2 = 2 * r2 - kd
            hist2[:] = 0
            for h in range(kd):
                k_ahead = 0
                for j in range(d):
                    k_ahead += ahead[learners[h, j]]
                hist2[2 * k_ahead] += 1
            n2 = _needed(hist2, r2 + (1 if b > p else 0))
            n_s = _needed_round1(bv, counts, i, s, b, d, hist2)
            cert2 = min(cert2, max(n_s, n2))
        radius[i] = max(min(cert1, cert2) - 1, 0)
    return radius


def fa_certify(logits: Any, layout: Layout, labels: Any = None) -> AggregationCertificate:
    """Finite Aggregation certificate (Wang, Levine & Feizi, ICML 2022).

    ``k * d`` learners, learner ``s`` trained on subset ``s``; a training sample of hash bucket ``h`` is in
    the ``d`` subsets ``(h + shift_j) mod kd``, so inserting or deleting it changes at most those ``d``
    learners. Learners are taken in **subset order from the layout's member -> subset map**, never in file
    order. The prediction ``c`` is the plurality vote over the ``kd`` learners (smaller index wins ties).
    For every rival ``c' != c``, with ``gap = n_c - n_c' - 1[c' < c]`` (``c`` wins iff ``gap >= 0``), bucket
    ``h`` can close the gap by at most ``damage_h = sum over its d learners of
    (1 + 1[vote = c] - 1[vote = c'])``; the radius against ``c'`` is the largest ``R`` with the sum of the
    ``R`` largest damages ``<= gap``; the certificate is the minimum over rivals. With ``d = 1`` this is
    DPA's ``floor(gap / 2)``.

    >>> layout = Layout.fa(3, 1)                    # d = 1: a DPA partition of 3 learners
    >>> logits = np.eye(2)[[0, 0, 1]][:, None, :]   # votes (2, 1)
    >>> int(fa_certify(logits, layout).radius[0]) == int(dpa_certify(logits).radius[0]) == 0
    True
    """
    arr, layout, learners = _fa_setup(logits, layout, "fa")
    kd, n, c = arr.shape
    d = layout.d
    votes, counts = _votes_and_counts(arr)
    pred, _ = _top_two(counts)
    with keep_torch_threads():
        radius = _fa_kernel(votes, learners, counts, pred)
    return AggregationCertificate("fa", pred, radius, SYMMETRIC_UNIT, label=_check_labels(labels, n, c),
                                  counts=counts, meta={"k": layout.k, "d": d, "shifts": list(layout.shifts),
                                                       "num_classes": c})


def fa_roe_certify(logits: Any, layout: Layout, labels: Any = None) -> AggregationCertificate:
    """Finite Aggregation + Run-Off Election certificate (Rezaei et al., ICML 2023, FA+ROE).

    Prediction as :func:`roe_certify` over the ``kd`` learners (subset order from the layout). Each count
    below is the fewest **buckets** whose largest damages (greedy, as in :func:`fa_certify`) reach a gap:

    * ``N(a -> b)``: ``b`` beats ``a`` in round 1; gap ``g(a, b) = n_a - n_b + 1[b > a]``, bucket damage
      ``sum over its learners of (1 + 1[vote = a] - 1[vote = b])``.
    * ``CertR1 = min over pairs {c1, c2} not containing c_p of max(N(c_p -> c1), N(c_p -> c2), N_sum)``,
      ``N_sum`` closing ``g(c_p, c1) + g(c_p, c2)`` with damages ``sum (1 + 2 1[vote = c_p] - 1[vote = c1]
      - 1[vote = c2])``: a *lower bound* on the buckets that knock ``c_p`` out of the final (the reference's
      rule, not an exact optimum; sound because each term is necessary).
    * ``CertR2 = min over c != c_p of max(N(c_s -> c), N2(c))`` with ``N2(c)`` closing
      ``R2[c] + 1[c > c_p]`` (``R2`` as in ROE over the ``kd`` learners) with bucket damages
      ``2 #{its learners with logit[c_p] > logit[c]}``.
    * ``radius = max(min(CertR1, CertR2) - 1, 0)`` (clamped at 0 for the reason given in
      :func:`roe_certify`).

    >>> layout = Layout.fa(5, 1)
    >>> logits = np.eye(3)[[0, 0, 0, 0, 1]][:, None, :]
    >>> int(fa_roe_certify(logits, layout).radius[0])
    1
    """
    arr, layout, learners = _fa_setup(logits, layout, "fa-roe")
    kd, n, c = arr.shape
    d = layout.d
    votes, counts = _votes_and_counts(arr)
    m1, m2, cp, cs = _run_off(arr, counts)
    with keep_torch_threads():
        radius = _fa_roe_kernel(arr, votes, learners, counts, cp, cs)
    return AggregationCertificate("fa-roe", cp, radius, SYMMETRIC_UNIT, label=_check_labels(labels, n, c),
                                  counts=counts, meta={"k": layout.k, "d": d, "shifts": list(layout.shifts),
                                                       "num_classes": c,
                                                       "finalists": [m1.tolist(), m2.tolist()]})


# ======================================================================================================
# Bagging
# ======================================================================================================
def _bagging_condition(r: np.ndarray, pa: np.ndarray, pb: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Jia et al.'s Theorem 1 holds at ``r``: ``max over n' in [n, n+r] of
    (n'/n)^k - 2 ((n' - r)/n)^k + 1 - pA + pB < 0``, the maximiser at the stationary point clamped."""

    def value(nprime: np.ndarray) -> np.ndarray:
        return np.power(nprime / n, k) - 2.0 * np.power((nprime - r) / n, k) + 1.0 - pa + pb

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # only in branches not taken
        denom = 1.0 - np.power(0.5, 1.0 / (k - 1.0))
        stationary = np.where(k > 1, r / np.where(k > 1, denom, 1.0), -np.inf)  # k = 1: decreasing in n'
        low_side = stationary <= n
        high_side = stationary >= n + r
        inner = np.maximum(value(np.ceil(stationary)), value(np.floor(stationary)))
        best = np.where(low_side, value(n), np.where(high_side, value(n + r), inner))
    return best < 0


def bagging_radius(p_a_lower: Any, p_b_upper: Any, n: Any, k: Any) -> Any:
    """Certified poisoning size of bagging (Jia, Cao & Gong, AAAI 2021, Theorem 1), vectorised.

    ``r*`` is the largest ``r`` with ``max over n' in [n, n + r] of (n'/n)^k - 2 ((n' - r)/n)^k + 1 - pA_low +
    pB_up < 0``; the maximiser over ``n'`` is the stationary point ``r / (1 - 0.5^(1/(k-1)))`` clamped to
    ``[n, n + r]`` (its floor and ceiling are both tried inside). Found by binary search (the condition is
    monotone in ``r`` and fails for ``r >= n (2^(1/k) - 1)``). ``-1`` when ``pA_low <= pB_up``. The unit is
    modified (or inserted, or deleted) training samples, each counting 1.

    Args:
        p_a_lower, p_b_upper: probability bounds in ``[0, 1]`` (broadcast together with ``n`` and ``k``).
        n: training-set size (``>= 1``); k: bootstrap sample size (``>= 1``).

    Returns:
        int64 array of the broadcast shape (``np.int64`` for scalar inputs).

    >>> int(bagging_radius(0.9, 0.1, 60000, 30)), int(bagging_radius(0.9, 0.1, 1437, 100))
    (1013, 7)
    """
    pa = np.asarray(_numpy(p_a_lower), dtype=np.float64)
    pb = np.asarray(_numpy(p_b_upper), dtype=np.float64)
    nn = np.asarray(_numpy(n), dtype=np.float64)
    kk = np.asarray(_numpy(k), dtype=np.float64)
    for name, arr in (("p_a_lower", pa), ("p_b_upper", pb)):
        if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
            raise InputError(f"{name} must lie in [0, 1]")
    for name, arr in (("n", nn), ("k", kk)):
        if not np.isfinite(arr).all() or (arr < 1).any() or (arr != np.floor(arr)).any():
            raise InputError(f"{name} must be a positive integer")
    try:
        shape = np.broadcast_shapes(pa.shape, pb.shape, nn.shape, kk.shape)
    except ValueError as exc:
        raise InputError("p_a_lower, p_b_upper, n and k do not broadcast") from exc
    pa, pb, nn, kk = (np.broadcast_to(a, shape).reshape(-1) for a in (pa, pb, nn, kk))
    ok = pa > pb
    lo = np.zeros(pa.shape)  # condition holds at lo (r = 0 holds iff pA > pB)
    hi = np.floor(nn * (np.power(2.0, 1.0 / kk) - 1.0)) + 1.0  # condition fails at hi
    while True:
        active = ok & (hi - lo > 1)
        if not active.any():
            break
        mid = np.floor((lo + hi) / 2)
        holds = _bagging_condition(mid, pa, pb, nn, kk)
        lo = np.where(active & holds, mid, lo)
        hi = np.where(active & ~holds, mid, hi)
    out = np.where(ok, lo, -1).astype(np.int64).reshape(shape)
    return out[()] if out.ndim == 0 else out


def bagging_certify(votes_counts: Any, n: int, k: int, alpha: float = 0.001, num_classes: int | None = None,
                    n_test: int | None = None, *, labels: Any = None,
                    layout: Layout | None = None) -> AggregationCertificate:
    """Bagging certificate (Jia, Cao & Gong, AAAI 2021, Theorem 1) from the vote counts of ``N`` members,
    each trained on ``k`` samples drawn with replacement from the ``n`` training samples.

    The deployed prediction ``A`` is the plurality of the counts (smaller index wins ties). Every class gets
    a one-sided exact Clopper-Pearson bound (:func:`~certkit.certify.bounds.clopper_pearson`) at
    ``alpha' / C`` (simultaneous over the ``C`` classes, so the data-chosen ``A`` is covered); ``alpha' =
    alpha / n_test`` when ``n_test`` is given (Bonferroni over the test set, as the reference script does),
    else ``alpha``. ``pA_low`` is the lower bound of ``A``, ``pB_up`` the largest upper bound of the other
    classes, capped at ``1 - pA_low``; the radius is :func:`bagging_radius`, ``-1`` when
    ``pA_low <= pB_up``. It holds with probability ``>= 1 - alpha`` per point (over the bootstrap draws).

    Args:
        votes_counts: ``[N_test, C]`` (or ``[C]``) vote counts per class; each row sums to the members.
        n: training-set size; k: bootstrap sample size; alpha: error level in ``(0, 1)``.
        num_classes: ``C`` (default: the counts' last axis; must match it).
        n_test: optional Bonferroni factor (number of test points certified together).
        labels: optional true labels; layout: optional ``bootstrap`` :class:`Layout` (checked against
            ``n``, ``k`` and the member count).

    >>> cert = bagging_certify([[1000, 0, 0]], n=60000, k=30, alpha=0.001, n_test=10000)
    >>> round(float(cert.p_lower[0]), 10), int(cert.radius[0])
    (0.9829306527, 1304)
    """
    counts = _int_array(votes_counts, "votes_counts")
    if counts.ndim == 1:
        counts = counts[None, :]
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise InputError(f"votes_counts must have shape [N, C], got {tuple(np.shape(_numpy(votes_counts)))}")
    c = counts.shape[1]
    if num_classes is not None and check_positive_int(num_classes, "num_classes", minimum=2) != c:
        raise InputError(f"num_classes = {num_classes} but votes_counts has {c} columns")
    if c < 2:
        raise InputError("bagging needs at least 2 classes")
    if (counts < 0).any():
        raise InputError("votes_counts must be non-negative")
    totals = counts.sum(axis=1)
    if (totals == 0).any():
        raise InputError("every point needs at least one vote (a row of votes_counts sums to 0)")
    n = check_positive_int(n, "n")
    k = check_positive_int(k, "k")
    alpha = check_alpha(alpha)
    if layout is not None:
        layout = check_layout(layout, "bagging")
        if layout.n_train != n or layout.bootstrap_size != k:
            raise InputError(f"the layout records n={layout.n_train}, k={layout.bootstrap_size}, but n={n}, k={k} "
                             f"were passed")
        if (totals != layout.num_draws).any():
            raise InputError(f"the layout has {layout.num_draws} members, but vote rows sum to {sorted(set(totals))[:5]}")
    per_point = alpha if n_test is None else alpha / check_positive_int(n_test, "n_test")
    level = per_point / c
    pred, _ = _top_two(counts)
    rows = np.arange(counts.shape[0])
    p_low = np.asarray(clopper_pearson(counts[rows, pred], totals, level, alternative="greater").low)
    upper = np.asarray(clopper_pearson(counts, totals[:, None], level, alternative="less").high).copy()
    upper[rows, pred] = -np.inf
    p_up = np.minimum(upper.max(axis=1), 1.0 - p_low)
    radius = np.asarray(bagging_radius(p_low, p_up, n, k)).reshape(-1)
    return AggregationCertificate(
        "bagging", pred, radius, BAGGING_UNIT, label=_check_labels(labels, counts.shape[0], c), counts=counts,
        p_lower=p_low, p_upper=p_up,
        meta={"n": n, "k": k, "alpha": alpha, "n_test": n_test, "alpha_per_bound": level, "num_classes": c})


# ======================================================================================================
# Joint: poisoning + patch (PECAN-style)
# ======================================================================================================
def joint_certify(member_labels_or_abstain: Any, num_classes: int, labels: Any = None, *,
                  layout: Layout | None = None) -> AggregationCertificate:
    """Joint certificate "at most ``r`` poisoned training samples AND any patch" (PECAN-style: Zhang,
    Albarghouthi & D'Antoni, arXiv 2301.11824; ``reference/patch-certificates.md`` section 2).

    DPA members (one per hash partition) each carry a test-time certificate at ``x`` (Mode C: no patch of
    side ``<= m`` changes that member's prediction). Member ``i`` *votes* its label ``l_i`` when its
    certificate holds and *abstains* (``-1``) otherwise. ``c`` is the plurality of the votes (smaller index
    wins ties; abstentions are no class) and ``c'`` the runner-up. Rule proved here:

        ``r = floor((n_c - n_c' - 1[c' < c] - n_abstain) / 2)``, reported as ``-1`` when negative.

    *Proof.* Take any training set within ``r`` inserted/deleted samples and any patched ``x'``. At most
    ``r`` members are retrained (one sample reaches one partition) and may output anything. Every other
    voting member outputs ``l_i`` at ``x'`` (its patch certificate). Every other abstaining member may output
    any class (or nothing). For a rival ``b``, the margin ``n_c - n_b`` therefore drops by at most 2 per
    retrained voter (a vote leaves ``c`` and joins ``b``), by at most 1 per retrained or plain abstainer
    (it joins ``b``): the new margin is ``>= n_c - n_b - 2r - n_abstain``. ``c`` still beats ``b`` iff the
    new margin is ``> 0``, or ``= 0`` with ``c < b``, i.e. iff ``margin - 1[b < c] >= 0``. The worst rival is
    the runner-up ``c'`` (it has the most votes, and among those the smallest index), so
    ``n_c - n_c' - 1[c' < c] - n_abstain - 2r >= 0`` suffices. *Tightness:* with ``r + 1`` retrained voters of
    ``c`` and every abstainer voting ``c'`` the margin is below that bound, so ``c`` loses; the tests confirm
    by exhaustive search (up to 7 members, 3 classes) that this ``r`` is the exact certified radius. The
    rule PECAN's code applies, ``floor((N1 - N2 - 1)/2) - N_abstain``, is sound but looser (an abstainer
    there costs 1 poisoned sample instead of 1/2).

    Deployment assumption: at test time each member votes its plain prediction (or abstains by its own rule,
    covered as "nothing"); a member verified at ``x`` keeps its label on the whole patch set.

    Args:
        member_labels_or_abstain: ``[K, N]`` (or ``[K]`` for one point) integer votes in
            ``[-1, num_classes)``, ``-1`` = abstain.
        num_classes: ``C >= 2``. labels: optional true labels ``[N]``. layout: optional ``partition`` layout.

    >>> cert = joint_certify([[0], [0], [0], [0], [0], [1], [-1]], num_classes=3)   # votes (5, 1, 0), 1 abstains
    >>> int(cert.prediction[0]), int(cert.radius[0])
    (0, 1)
    """
    c = check_positive_int(num_classes, "num_classes", minimum=2)
    votes = _int_array(member_labels_or_abstain, "member_labels_or_abstain")
    if votes.ndim == 1:
        votes = votes[:, None]
    if votes.ndim != 2 or votes.shape[0] == 0 or votes.shape[1] == 0:
        raise InputError(f"member_labels_or_abstain must have shape [K members, N points], got "
                         f"{tuple(np.shape(_numpy(member_labels_or_abstain)))}")
    if (votes < -1).any() or (votes >= c).any():
        raise InputError(f"member votes must lie in [-1, {c}) (-1 = abstain), got [{votes.min()}, {votes.max()}]")
    k, n = votes.shape
    layout = _check_member_count(layout, "joint", k)
    if layout is not None and (layout.versions or 1) > 1:
        raise InputError(f"the joint certificate needs one member per partition; this layout trains "
                         f"{layout.versions} versions per partition (DPA*), whose certified votes cannot be combined")
    voted = votes >= 0
    flat = (np.arange(n)[None, :] * c + np.where(voted, votes, 0))[voted]
    counts = np.bincount(flat, minlength=n * c).reshape(n, c)
    abstain = (~voted).sum(axis=0)
    first, second = _top_two(counts)
    rows = np.arange(n)
    radius = np.maximum((counts[rows, first] - counts[rows, second] - (second < first) - abstain) // 2, -1)
    return AggregationCertificate("joint", first, radius, SYMMETRIC_UNIT, label=_check_labels(labels, n, c),
                                  counts=counts, meta={"members": k, "num_classes": c, "abstain": abstain.tolist(),
                                                       "threat_model": "<= r poisoned training samples and any "
                                                       "test-time patch covered by the members' certificates"})
