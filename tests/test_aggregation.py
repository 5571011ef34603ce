"""Specification of certkit.certify.aggregation (Mode D: DPA, ROE, FA, FA+ROE, bagging, joint).

Reference values: reference/poisoning-certificates-fct-gdm.md section 5, items 8-14. Soundness: exhaustive
search over every way to change <= r members (DPA, ROE, joint) or <= r hash buckets (FA, FA+ROE). The
brute-force predictors below are written independently of the module (stable argsort, explicit loops).
"""

from __future__ import annotations

import doctest
import itertools
import json
import random

import numpy as np
import pytest
import torch
from statsmodels.stats.proportion import proportion_confint

from certkit.certify import aggregation
from certkit.certify.aggregation import (
    BAGGING_UNIT,
    SYMMETRIC_UNIT,
    AggregationCertificate,
    Layout,
    bagging_certify,
    bagging_radius,
    bootstrap_subsets,
    check_layout,
    combine_versions,
    dpa_certify,
    dpa_partition,
    fa_certify,
    fa_roe_certify,
    fa_shifts,
    finite_aggregation_subsets,
    joint_certify,
    order_within_partitions,
    poisoning_trigger_robustness,
    roe_certify,
    roe_dp_table,
)
from certkit.errors import InputError, UnknownNameError


# ------------------------------------------------------------------------------------------ helpers
def one_hot_logits(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """Votes ``[K, N]`` (or ``[K]``) as one-hot float logits ``[K, N, C]``."""
    votes = np.asarray(votes)
    if votes.ndim == 1:
        votes = votes[:, None]
    return np.eye(num_classes)[votes].astype(np.float32)


def votes_from_counts(counts: tuple[int, ...]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def plurality(counts: np.ndarray) -> np.ndarray:
    """Most votes, the smaller index winning ties: stable argsort of -counts along the last axis."""
    return np.argsort(-counts, axis=-1, kind="stable")[..., 0]


def counts_of(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts over the last axis of integer votes (``-1`` = abstain, not counted)."""
    return np.stack([(votes == c).sum(axis=-1) for c in range(num_classes)], axis=-1)


def roe_predict(logits: np.ndarray) -> np.ndarray:
    """Run-off election prediction of logits ``[B, K, C]`` (independent of the module)."""
    b, k, c = logits.shape
    votes = logits.argmax(axis=-1)
    order = np.argsort(-counts_of(votes, c), axis=-1, kind="stable")
    m1, m2 = order[:, 0], order[:, 1]
    rows = np.arange(b)
    l1 = logits[rows, :, m1]
    l2 = logits[rows, :, m2]
    e = 2 * (l1 > l2).sum(axis=1) - k
    return np.where(e > 0, m1, np.where(e < 0, m2, np.minimum(m1, m2)))


def weak_orders(num_classes: int) -> np.ndarray:
    """One logit vector per weak ordering of the classes (13 for 3 classes). ROE's prediction depends on a
    member's logits only through their order (argmax with first-index ties, strict pairwise comparisons),
    so these are *all* the behaviours a poisoned member can have."""
    seen = {}
    for v in itertools.product(range(num_classes), repeat=num_classes):
        ranks = tuple(sorted(set(v)).index(x) for x in v)
        seen[ranks] = np.array(ranks, dtype=np.float64)
    return np.stack(list(seen.values()))


def fa_layout_learners(layout: Layout) -> list[list[int]]:
    kd = layout.k * layout.d
    return [[(h + s) % kd for s in layout.shifts] for h in range(kd)]


# ------------------------------------------------------------------------------------------ layouts
def test_dpa_partition_is_the_pixel_sum_mod_k_on_the_0_255_scale():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 1, 4, 4), dtype=np.uint8)
    part = dpa_partition(x, 5, allow_empty=True)
    assert part.dtype == np.int64
    assert part.tolist() == [int(img.astype(int).sum()) % 5 for img in x]
    # float copies in [0, 1] (float32 and float64, numpy and torch) hash exactly like the uint8 image
    assert dpa_partition(x.astype(np.float32) / 255, 5, allow_empty=True).tolist() == part.tolist()
    assert dpa_partition(torch.from_numpy(x.astype(np.float64) / 255), 5, allow_empty=True).tolist() == part.tolist()
    # rounding, not truncation: 0.4/255 -> 0 and 0.6/255 -> 1
    assert dpa_partition(np.array([[0.4 / 255, 0.6 / 255]]), 7, allow_empty=True).tolist() == [1]


def test_dpa_partition_ignores_labels_and_order():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(60, 3, 2, 2), dtype=np.uint8)
    perm = rng.permutation(60)
    assert dpa_partition(x[perm], 4).tolist() == dpa_partition(x, 4)[perm].tolist()


def test_empty_partition_is_refused_naming_which_and_how_many():
    x = np.array([[1, 0], [2, 0], [3, 0]], dtype=np.uint8)  # sums 1, 2, 3 mod 6: partitions 0, 4, 5 empty
    with pytest.raises(InputError, match=r"3 of 6 partitions are empty.*: 0, 4, 5"):
        dpa_partition(x, 6)
    assert dpa_partition(x, 6, allow_empty=True).tolist() == [1, 2, 3]
    with pytest.raises(InputError, match=r"of 6 finite-aggregation subsets are empty"):
        finite_aggregation_subsets(np.array([0, 0]), k=3, d=2)


@pytest.mark.parametrize("bad_k", [1, 0, -3, True, 2.0])
def test_k_at_most_one_or_not_an_int_is_refused(bad_k):
    x = np.zeros((4, 2), dtype=np.uint8)
    with pytest.raises(InputError, match="k must be"):
        dpa_partition(x, bad_k)
    with pytest.raises(InputError, match="k must be"):
        finite_aggregation_subsets(np.zeros(4, dtype=int), bad_k, 2)


def test_bad_images_are_refused():
    with pytest.raises(InputError, match=r"must lie in \[0, 1\]"):
        dpa_partition(np.array([[0.5, 1.5]]), 2, allow_empty=True)
    with pytest.raises(InputError, match="NaN"):
        dpa_partition(np.array([[0.5, np.nan]]), 2, allow_empty=True)
    with pytest.raises(InputError, match="0..255"):
        dpa_partition(np.array([[0, 256]]), 2, allow_empty=True)
    with pytest.raises(InputError, match="no training samples"):
        dpa_partition(np.zeros((0, 4), dtype=np.uint8), 2)


def test_order_within_partitions_is_lexicographic_by_label_then_pixel_bytes_and_content_only():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, size=(80, 3), dtype=np.uint8)  # small alphabet: many shared prefixes
    y = rng.integers(0, 3, size=80)
    part = dpa_partition(x, 3)
    groups = order_within_partitions(part, x, y)
    assert sorted(np.concatenate(groups).tolist()) == list(range(80))
    for p, idx in enumerate(groups):
        assert (part[idx] == p).all()
        keys = [(int(y[i]), bytes(x[i])) for i in idx]
        assert keys == sorted(keys)
    # the same content in another order gives the same ordered content per partition
    perm = rng.permutation(80)
    groups2 = order_within_partitions(dpa_partition(x[perm], 3), x[perm], y[perm])
    for a, b in zip(groups, groups2):
        assert [(int(y[i]), bytes(x[i])) for i in a] == [(int(y[perm][i]), bytes(x[perm][i])) for i in b]
    # float images in [0, 1] are ordered by their 0-255 values
    groups3 = order_within_partitions(part, x / 255.0, y)
    assert all(np.array_equal(a, b) for a, b in zip(groups, groups3))
    # FA subsets: each sample appears in its d subsets
    subsets = finite_aggregation_subsets(dpa_partition(x, 6, allow_empty=True), 3, 2)
    fa_groups = order_within_partitions(subsets, x, y, num_subsets=6)
    assert sum(len(g) for g in fa_groups) == 160


def test_fa_shifts_reproduce_the_reference_and_leave_the_global_generator_alone():
    state = random.getstate()
    assert fa_shifts(50, 3) == (90, 22, 123)
    assert fa_shifts(10, 4) == (22, 5, 30, 2)
    assert random.getstate() == state
    # the reference's own recipe, for the record
    random.seed(999999999 + 208)
    assert tuple(random.sample(range(150), 3)) == (90, 22, 123)
    random.setstate(state)
    seeded = fa_shifts(10, 4, seed=7)
    assert seeded == fa_shifts(10, 4, seed=7) and len(set(seeded)) == 4 and all(0 <= s < 40 for s in seeded)
    with pytest.raises(UnknownNameError):
        fa_shifts(10, 4, seed="other")


def test_finite_aggregation_subsets_put_each_sample_in_d_shifted_subsets():
    rng = np.random.default_rng(3)
    bucket = rng.integers(0, 40, size=500)
    subsets = finite_aggregation_subsets(bucket, k=10, d=4)
    shifts = np.array(fa_shifts(10, 4))
    assert subsets.shape == (500, 4)
    assert np.array_equal(subsets, (bucket[:, None] + shifts) % 40)
    assert all(len(set(row)) == 4 for row in subsets.tolist())
    with pytest.raises(InputError, match="d must be"):
        finite_aggregation_subsets(bucket, k=10, d=0)
    with pytest.raises(InputError, match=r"\[0, 40\)"):
        finite_aggregation_subsets(np.array([40]), k=10, d=4, allow_empty=True)


def test_bootstrap_subsets_are_seeded_draws_with_replacement():
    a = bootstrap_subsets(50, 30, 8, seed=4)
    assert a.shape == (8, 30) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 50
    assert np.array_equal(a, bootstrap_subsets(50, 30, 8, seed=4))
    assert not np.array_equal(a, bootstrap_subsets(50, 30, 8, seed=5))
    assert np.array_equal(a, np.random.default_rng(4).integers(0, 50, size=(8, 30)))
    with pytest.raises(InputError, match="size must be"):
        bootstrap_subsets(50, 0, 8, seed=4)
    with pytest.raises(InputError, match="count must be"):
        bootstrap_subsets(50, 3, 0, seed=4)
    with pytest.raises(InputError, match="seed"):
        bootstrap_subsets(50, 3, 2, seed=-1)


def test_layout_round_trips_through_json():
    for layout in (Layout.dpa(7, member_subset=[3, 1, 0, 2, 6, 5, 4]), Layout.fa(10, 4), Layout.fa(3, 2, seed=11),
                   Layout.bagging(60000, 30, 1000, seed=0), Layout("full-noise", seed=3)):
        record = json.loads(json.dumps(layout.to_dict()))
        assert Layout.from_dict(record) == layout
    assert Layout.fa(10, 4).shifts == (22, 5, 30, 2)
    assert Layout.dpa(7).hash_rule == aggregation.HASH_RULE
    with pytest.raises(InputError, match="unknown layout field"):
        Layout.from_dict({"kind": "partition", "k": 3, "colour": 1})


def test_bad_layouts_are_refused():
    with pytest.raises(UnknownNameError):
        Layout("shards", k=3)
    with pytest.raises(InputError, match="needs k"):
        Layout("partition")
    with pytest.raises(InputError, match="k must be"):
        Layout.dpa(1)
    with pytest.raises(InputError, match="distinct partition indices"):
        Layout.dpa(3, member_subset=[0, 0, 1])
    with pytest.raises(InputError, match="permutation"):
        Layout.fa(3, 2, member_subset=[0, 1, 2, 3, 4, 4])
    with pytest.raises(InputError, match="shifts"):
        Layout("finite-aggregation", k=3, d=2, shifts=(1, 1), member_subset=tuple(range(6)))
    with pytest.raises(InputError, match="needs num_draws"):
        Layout("bootstrap", n_train=10, bootstrap_size=3)


LAYOUTS = {"partition": Layout.dpa(4), "finite-aggregation": Layout.fa(2, 2), "bootstrap": Layout.bagging(100, 10, 4),
           "full-noise": Layout("full-noise")}


@pytest.mark.parametrize("certificate", sorted(aggregation.CERTIFICATE_LAYOUT))
def test_check_layout_refuses_every_other_layout_naming_both(certificate):
    need = aggregation.CERTIFICATE_LAYOUT[certificate]
    assert check_layout(LAYOUTS[need], certificate) is LAYOUTS[need]
    assert check_layout(LAYOUTS[need].to_dict(), certificate) == LAYOUTS[need]
    for kind, layout in LAYOUTS.items():
        if kind != need:
            with pytest.raises(InputError) as err:
                check_layout(layout, certificate)
            assert repr(certificate) in str(err.value) and repr(kind) in str(err.value)
            assert repr(need) in str(err.value)


def test_certify_functions_refuse_a_wrong_or_inconsistent_layout():
    logits = one_hot_logits(np.array([0, 0, 1, 1]), 3)
    with pytest.raises(InputError, match="'dpa'.*'finite-aggregation'"):
        dpa_certify(logits, layout=Layout.fa(2, 2))
    with pytest.raises(InputError, match="'roe'.*'full-noise'"):
        roe_certify(logits, layout=Layout("full-noise"))
    with pytest.raises(InputError, match="'joint'.*'bootstrap'"):
        joint_certify([0, 0, 1, -1], 3, layout=Layout.bagging(100, 10, 4))
    with pytest.raises(InputError, match="'fa'.*'partition'"):
        fa_certify(logits, Layout.dpa(4))
    with pytest.raises(InputError, match="'fa-roe'.*'partition'"):
        fa_roe_certify(logits, Layout.dpa(4))
    with pytest.raises(InputError, match="'bagging'.*'partition'"):
        bagging_certify([[3, 1]], n=100, k=10, layout=Layout.dpa(4))
    with pytest.raises(InputError, match="5 members but the outputs hold 4"):
        dpa_certify(logits, layout=Layout.dpa(5))
    with pytest.raises(InputError, match="has 6 learners"):
        fa_certify(logits, Layout.fa(3, 2))
    with pytest.raises(InputError, match="never by file order"):
        fa_certify(logits, Layout("finite-aggregation", k=2, d=2, shifts=(0, 1)))
    with pytest.raises(InputError, match="n=100, k=10"):
        bagging_certify([[3, 1]], n=100, k=11, layout=Layout.bagging(100, 10, 4))
    assert dpa_certify(logits, layout=Layout.dpa(4)).radius.tolist() == [0]


# ------------------------------------------------------------------------------------------ DPA
@pytest.mark.parametrize("counts, prediction, radius", [
    ((60, 25, 15), 0, 17), ((37, 43), 1, 2), ((40, 40), 0, 0), ((20, 30, 30, 20), 1, 0), ((5, 30, 31), 2, 0),
])
def test_dpa_reference_facts(counts, prediction, radius):
    cert = dpa_certify(one_hot_logits(votes_from_counts(counts), len(counts)), labels=[prediction])
    assert (int(cert.prediction[0]), int(cert.radius[0])) == (prediction, radius)
    assert cert.unit == SYMMETRIC_UNIT == "inserted + deleted training samples; a modified sample counts 2"
    assert cert.correct.tolist() == [True] and cert.counts[0].tolist() == list(counts)


def _exact_radius(original: np.ndarray, finals: np.ndarray, num_classes: int, free: np.ndarray) -> np.ndarray:
    """Exact certified radius by exhaustion: (fewest changed members that change the plurality) - 1.

    ``original [M, K]`` vote vectors (``-1`` = abstain); ``finals [F, K]`` every vote vector reachable; a
    member costs 1 when it is changed, except where ``free`` (abstainers may take any value for free).
    """
    pred0 = plurality(counts_of(original, num_classes))
    fin_counts = counts_of(finals, num_classes)
    pred_f = plurality(fin_counts)
    nobody = fin_counts.sum(axis=1) == 0  # every member abstains: counted as a change (conservative)
    out = np.empty(len(original), dtype=np.int64)
    for i, (orig, p) in enumerate(zip(original, pred0)):
        cost = ((finals != orig) & ~free[i]).sum(axis=1)
        flips = (pred_f != p) | nobody
        out[i] = cost[flips].min() - 1
    return out


@pytest.mark.parametrize("num_classes, max_members", [(2, 7), (3, 7), (4, 5)])
def test_dpa_is_exact_by_brute_force(num_classes, max_members):
    """Every vote multiset of K <= 7 members: changing any <= r votes never changes the plurality, and some
    r + 1 changes do (DPA's radius is tight)."""
    for k in range(1, max_members + 1):
        originals = np.array(list(itertools.combinations_with_replacement(range(num_classes), k)))
        finals = np.array(list(itertools.product(range(num_classes), repeat=k)))
        exact = _exact_radius(originals, finals, num_classes, np.zeros(originals.shape, bool))
        cert = dpa_certify(one_hot_logits(originals.T, num_classes))
        assert np.array_equal(cert.prediction, plurality(counts_of(originals, num_classes)))
        assert np.array_equal(cert.radius, exact), k


def test_dpa_accepts_tensors_and_float16_and_uses_first_index_on_logit_ties():
    logits = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 2.0, 2.0]], [[0.0, 0.0, 3.0]]], dtype=torch.float16)
    cert = dpa_certify(logits)  # votes 0, 1, 2 -> tie, class 0
    assert cert.counts.tolist() == [[1, 1, 1]] and cert.prediction.tolist() == [0] and cert.radius.tolist() == [0]


# ------------------------------------------------------------------------------------------ ROE
def test_roe_dp_table_facts():
    t = roe_dp_table(21)
    facts = {(0, 0): 0, (0, 1): 1, (2, 2): 2, (3, 3): 2, (0, 10): 5, (6, 10): 6, (7, 10): 6, (10, 10): 7,
             (20, 20): 14}
    for (i, j), v in facts.items():
        assert t[i, j] == v, (i, j)


def test_roe_dp_table_is_symmetric_monotone_and_has_a_closed_form():
    t = roe_dp_table(200).astype(np.int64)
    i, j = np.meshgrid(np.arange(200), np.arange(200), indexing="ij")
    closed = np.maximum(np.maximum((i + 1) // 2, (j + 1) // 2), (i + j + 2) // 3)
    assert np.array_equal(t, closed)
    assert np.array_equal(t, t.T)
    assert (np.diff(t, axis=0) >= 0).all() and (np.diff(t, axis=1) >= 0).all()
    # the recurrence as the reference states it, element by element, on a small corner
    ref = np.zeros((30, 30), dtype=int)
    for a in range(30):
        for b in range(30):
            if a == 0 and b == 0:
                ref[a, b] = 0
            elif (a <= 1 and b <= 2) or (a <= 2 and b <= 1):
                ref[a, b] = 1
            elif b <= 1:
                ref[a, b] = (a + 1) // 2
            elif a <= 1:
                ref[a, b] = (b + 1) // 2
            else:
                ref[a, b] = 1 + min(ref[a - 2, b - 1], ref[a - 1, b - 2])
    assert np.array_equal(t[:30, :30], ref)


def test_roe_beats_dpa_on_the_reference_example():
    logits = np.array([[3, 2, 1]] * 4 + [[2, 3, 1]] * 3 + [[2, 1, 3]] * 3, dtype=np.float64)[:, None, :]
    dpa = dpa_certify(logits)
    roe = roe_certify(logits, labels=[0])
    assert (int(dpa.prediction[0]), int(dpa.radius[0])) == (0, 0)
    assert (int(roe.prediction[0]), int(roe.radius[0])) == (0, 1)
    assert roe.meta["finalists"] == [[0], [1]]
    json.dumps(roe.meta)


def _roe_reference_structure(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DPA+ROE certificate point by point with every pair (c1, c2), as the reference lays it out."""
    k, n, c = logits.shape
    table = roe_dp_table(k + 3)
    preds, radii = [], []
    for i in range(n):
        votes = logits[:, i].argmax(axis=1)
        cnt = np.bincount(votes, minlength=c)
        order = np.argsort(-cnt, kind="stable")
        m1, m2 = int(order[0]), int(order[1])
        e = 2 * int((logits[:, i, m1] > logits[:, i, m2]).sum()) - k
        cp = m1 if e > 0 else m2 if e < 0 else min(m1, m2)
        cs = m1 + m2 - cp
        gap = {(a, b): int(cnt[a] - cnt[b] + (b > a)) for a in range(c) for b in range(c)}
        cert1 = min((table[max(gap[cp, c1], 0), max(gap[cp, c2], 0)] for c1 in range(c) for c2 in range(c)
                     if len({cp, c1, c2}) == 3), default=10**9)
        cert2 = min(max(_ceil2(gap[cs, b]), _ceil2(2 * int((logits[:, i, cp] > logits[:, i, b]).sum()) - k + (b > cp)))
                    for b in range(c) if b != cp)
        preds.append(cp)
        radii.append(min(cert1, cert2) - 1)
    return np.array(preds), np.array(radii)


def _ceil2(x: int) -> int:
    return (max(x, 0) + 1) // 2


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_roe_vectorised_matches_the_reference_layout(num_classes):
    rng = np.random.default_rng(6 + num_classes)
    for k in (1, 4, 9, 20):
        logits = rng.normal(size=(k, 60, num_classes))
        logits[:, :20, 0] += 1.5  # some confident points
        logits[:, 20:30] = np.round(logits[:, 20:30])  # logit ties
        cert = roe_certify(logits)
        pred, radius = _roe_reference_structure(logits)
        assert np.array_equal(cert.prediction, pred)
        # the reference's tie-conservative R2 can give -1 to the deployed prediction on tied logits;
        # zero poisons change nothing, so certkit reports 0 there
        assert np.array_equal(cert.radius, np.maximum(radius, 0))
        assert (radius[30:] >= 0).all()  # without logit ties the reference never goes below 0


def _roe_can_flip(logits: np.ndarray, groups: list[list[int]], radius: int, prediction: int) -> bool:
    """Whether giving the members of some ``radius`` groups (members, or FA buckets) arbitrary logit orders
    changes the run-off prediction: exhaustive over the groups and over all weak orders per member."""
    patterns = weak_orders(logits.shape[1])
    for chosen in itertools.combinations(range(len(groups)), radius):
        members = sorted({m for g in chosen for m in groups[g]})
        assign = np.array(list(itertools.product(range(len(patterns)), repeat=len(members))))
        batch = np.repeat(logits[None], len(assign), axis=0)
        if members:
            batch[:, members] = patterns[assign]
        if (roe_predict(batch) != prediction).any():
            return True
    return False


def test_roe_is_sound_by_brute_force():
    """For random ensembles of up to 6 members over 3 classes, every way to give <= r members any logit
    order (all 13 weak orders) keeps the ROE prediction."""
    rng = np.random.default_rng(7)
    patterns = weak_orders(3)
    assert len(patterns) == 13
    seen_radii = set()
    flips_one_more = 0
    for _case in range(120):
        k = int(rng.integers(2, 7))
        favourite = rng.integers(0, 13, size=2)
        choice = np.where(rng.random(k) < 0.6, rng.choice(favourite, size=k), rng.integers(0, 13, size=k))
        logits = patterns[choice]
        cert = roe_certify(logits[:, None, :])
        r, p = int(cert.radius[0]), int(cert.prediction[0])
        assert p == int(roe_predict(logits[None])[0])
        seen_radii.add(r)
        groups = [[m] for m in range(k)]
        assert not _roe_can_flip(logits, groups, r, p), (logits, r)
        flips_one_more += r + 1 <= k and _roe_can_flip(logits, groups, r + 1, p)
    assert {0, 1, 2} <= seen_radii
    assert flips_one_more > 60  # the search does find attacks just beyond the radius (often tight)


# ------------------------------------------------------------------------------------------ FA
def test_fa_with_d_1_equals_dpa_on_200_random_cases():
    rng = np.random.default_rng(8)
    for case in range(200):
        k = int(rng.integers(2, 40))
        c = int(rng.integers(2, 6))
        weights = rng.dirichlet(np.ones(c) * 0.5)
        votes = rng.choice(c, size=(k, 3), p=weights)
        perm = rng.permutation(k)
        layout = Layout.fa(k, 1, member_subset=perm.tolist())
        logits = one_hot_logits(votes, c)
        fa = fa_certify(logits, layout)
        dpa = dpa_certify(logits)
        assert np.array_equal(fa.prediction, dpa.prediction) and np.array_equal(fa.radius, dpa.radius), case


def _greedy_reference(gap: int, damages: np.ndarray) -> int:
    """Buckets, largest damage first, whose running sum stays <= gap (the FA paper's loop)."""
    radius = 0
    for dmg in sorted(damages.tolist(), reverse=True):
        if gap - dmg < 0:
            break
        gap -= dmg
        radius += 1
    return radius


def _needed_reference(gap: int, damages: np.ndarray) -> int:
    """Fewest buckets, largest damage first, that close ``gap`` (``inf`` if they cannot)."""
    count = 0
    for dmg in sorted(damages.tolist(), reverse=True):
        if gap <= 0:
            break
        gap -= dmg
        count += 1
    return count if gap <= 0 else 10**9


def _fa_reference_structure(logits: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FA and FA+ROE point by point, learners in subset order (member_subset is the identity here)."""
    kd, n, c = logits.shape
    buckets = np.array(fa_layout_learners(layout))  # [kd, d]
    fa, faroe, preds = [], [], []
    for i in range(n):
        lg = logits[:, i]
        votes = lg.argmax(axis=1)
        cnt = np.bincount(votes, minlength=c)
        order = np.argsort(-cnt, kind="stable")
        y = int(order[0])
        vb = votes[buckets]
        fa.append(min(_greedy_reference(int(cnt[y] - cnt[b] - (b < y)), (1 + (vb == y) - (vb == b)).sum(axis=1))
                      for b in range(c) if b != y))
        m1, m2 = int(order[0]), int(order[1])
        e = 2 * int((lg[:, m1] > lg[:, m2]).sum()) - kd
        cp = m1 if e > 0 else m2 if e < 0 else min(m1, m2)
        cs = m1 + m2 - cp
        gap = lambda a, b, cnt=cnt: int(cnt[a] - cnt[b] + (b > a))  # noqa: E731

        def need(a, b, vb=vb, gap=gap):
            return _needed_reference(gap(a, b), (1 + (vb == a) - (vb == b)).sum(axis=1))

        cert1 = 10**9
        for c1 in range(c):
            for c2 in range(c1):
                if cp in (c1, c2):
                    continue
                dmg = (1 + 2 * (vb == cp) - (vb == c1) - (vb == c2)).sum(axis=1)
                cert1 = min(cert1, max(need(cp, c1), need(cp, c2), _needed_reference(gap(cp, c1) + gap(cp, c2), dmg)))
        cert2 = 10**9
        for b in range(c):
            if b == cp:
                continue
            ahead = lg[:, cp] > lg[:, b]
            n2 = _needed_reference(2 * int(ahead.sum()) - kd + (b > cp), 2 * ahead[buckets].sum(axis=1))
            cert2 = min(cert2, max(need(cs, b), n2))
        faroe.append(max(min(cert1, cert2) - 1, 0))
        preds.append(cp)
    return np.array(fa), np.array(faroe), np.array(preds)


@pytest.mark.parametrize("k, d, c", [(5, 3, 4), (4, 4, 3), (10, 2, 5), (3, 1, 2)])
def test_fa_and_fa_roe_kernels_match_the_reference_layout(k, d, c):
    rng = np.random.default_rng(k * 100 + d * 10 + c)
    layout = Layout.fa(k, d)
    logits = rng.normal(size=(k * d, 40, c))
    logits[:, :25, 0] += rng.uniform(0, 2.5, size=25)  # a range of margins
    logits[:, 30:] = np.round(logits[:, 30:])  # ties
    fa, faroe, preds = _fa_reference_structure(logits, layout)
    assert np.array_equal(fa_certify(logits, layout).radius, fa)
    got = fa_roe_certify(logits, layout)
    assert np.array_equal(got.prediction, preds) and np.array_equal(got.radius, faroe)
    assert fa.max() >= 1 and faroe.max() >= 1


def test_fa_indexes_learners_by_subset_id_not_file_order():
    rng = np.random.default_rng(9)
    layout = Layout.fa(10, 3)
    differs = 0
    for _ in range(10):
        votes = rng.choice(10, size=(30, 200), p=rng.dirichlet(np.ones(10) * 0.5))  # learner s = subset s
        logits = one_hot_logits(votes, 10)
        base = fa_certify(logits, layout)
        perm = rng.permutation(30)  # saved in another order: file position m holds subset perm[m]
        again = fa_certify(logits[perm], Layout.fa(10, 3, member_subset=perm.tolist()))
        assert np.array_equal(base.radius, again.radius) and np.array_equal(base.prediction, again.prediction)
        differs += int((fa_certify(logits[perm], layout).radius != base.radius).sum())
    assert differs > 0  # trusting the file order would give other (unsound) certificates


def _all_and_some_vote_vectors(kd: int, sample: int | None) -> np.ndarray:
    votes = np.array(list(itertools.product(range(3), repeat=kd)))
    if sample is not None:  # favour confident ensembles, where the radius is large
        rng = np.random.default_rng(kd)
        confident = votes[(votes == 0).sum(axis=1) >= kd - 2]
        votes = np.concatenate([confident, votes[rng.choice(len(votes), sample, replace=False)]])
    return votes


@pytest.mark.parametrize("k, d, sample", [(3, 2, None), (4, 2, 80)])
def test_fa_is_sound_by_brute_force_on_a_tiny_layout(k, d, sample):
    """k = 3, d = 2 (6 learners, each bucket reaches 2; all 3^6 vote vectors) and k = 4, d = 2 (a sample
    with radii up to 2): every choice of r buckets whose learners change arbitrarily keeps the plurality."""
    layout = Layout.fa(k, d)
    groups = fa_layout_learners(layout)
    votes = _all_and_some_vote_vectors(k * d, sample)  # [M, kd] in subset order
    cert = fa_certify(one_hot_logits(votes.T, 3), layout)
    assert np.array_equal(cert.prediction, plurality(counts_of(votes, 3)))
    assert set(cert.radius.tolist()) >= ({0, 1} if sample is None else {0, 1, 2})
    tight = 0
    for v, r, p in zip(votes, cert.radius, cert.prediction):
        for chosen in itertools.combinations(range(k * d), int(r)):
            members = sorted({m for g in chosen for m in groups[g]})
            assign = np.array(list(itertools.product(range(3), repeat=len(members))))
            batch = np.repeat(v[None], len(assign), axis=0)
            if members:
                batch[:, members] = assign
            assert (plurality(counts_of(batch, 3)) == p).all(), (v, r, chosen)
        tight += any(_plurality_flips(v, groups, chosen, p) for chosen in itertools.combinations(range(k * d), int(r) + 1))
    assert tight > len(votes) // 2  # the search finds attacks with one bucket more


def _plurality_flips(votes: np.ndarray, groups: list[list[int]], chosen: tuple[int, ...], prediction: int) -> bool:
    members = sorted({m for g in chosen for m in groups[g]})
    assign = np.array(list(itertools.product(range(3), repeat=len(members))))
    batch = np.repeat(votes[None], len(assign), axis=0)
    batch[:, members] = assign
    return bool((plurality(counts_of(batch, 3)) != prediction).any())


def test_fa_roe_is_sound_by_brute_force_on_a_tiny_layout():
    layout = Layout.fa(3, 2)
    groups = fa_layout_learners(layout)
    rng = np.random.default_rng(10)
    patterns = weak_orders(3)
    seen = set()
    flips_one_more = 0
    for _case in range(40):
        favourite = rng.integers(0, 13)
        choice = np.where(rng.random(6) < 0.7, favourite, rng.integers(0, 13, size=6))
        logits = patterns[choice]  # learner s = subset s
        cert = fa_roe_certify(logits[:, None, :], layout)
        r, p = int(cert.radius[0]), int(cert.prediction[0])
        assert p == int(roe_predict(logits[None])[0])
        seen.add(r)
        assert not _roe_can_flip(logits, groups, r, p), (logits, r)
        flips_one_more += _roe_can_flip(logits, groups, r + 1, p)
    assert {0, 1} <= seen
    assert flips_one_more > 10


def test_fa_roe_with_d_1_is_at_least_roe():
    rng = np.random.default_rng(11)
    for k, c in ((5, 3), (12, 4), (30, 10)):
        logits = rng.normal(size=(k, 80, c))
        logits[:, :40, 1] += 1.0
        fa_roe = fa_roe_certify(logits, Layout.fa(k, 1))
        roe = roe_certify(logits)
        assert np.array_equal(fa_roe.prediction, roe.prediction)
        assert (fa_roe.radius >= roe.radius).all() and (fa_roe.radius >= 0).all()


# ------------------------------------------------------------------------------------------ bagging
@pytest.mark.parametrize("p_a, p_b, n, k, expected", [
    (0.9, 0.1, 60000, 30, 1013), (0.9, 0.1, 60000, 50, 609), (0.9, 0.1, 60000, 100, 305),
    (0.99, 0.01, 60000, 30, 1331), (0.7, 0.3, 60000, 100, 133),
    (0.9, 0.1, 1437, 30, 24), (0.9, 0.1, 1437, 50, 14), (0.9, 0.1, 1437, 100, 7), (0.8, 0.1, 1437, 50, 12),
])
def test_bagging_radius_reference_facts(p_a, p_b, n, k, expected):
    assert int(bagging_radius(p_a, p_b, n, k)) == expected


def test_bagging_radius_vectorised_and_abstains_when_bounds_overlap():
    out = bagging_radius(np.array([0.9, 0.9, 0.5, 0.4]), np.array([0.1, 0.1, 0.5, 0.6]), 60000, np.array([30, 50, 30, 30]))
    assert out.tolist() == [1013, 609, -1, -1]
    assert int(bagging_radius(0.6, 0.4, 1437, 1)) >= 0


def test_bagging_radius_against_a_full_scan_of_the_theorem():
    """Scan every r and every n' in [n, n + r] (no stationary-point shortcut) on a small n."""
    n = 300
    for p_a, p_b, k in ((0.9, 0.1, 10), (0.75, 0.2, 25), (0.99, 0.005, 5), (0.6, 0.39, 40)):
        r = 0
        while True:
            nprime = np.arange(n, n + r + 2, dtype=float)
            worst = np.max((nprime / n) ** k - 2 * ((nprime - (r + 1)) / n) ** k + 1 - p_a + p_b)
            if worst >= 0:
                break
            r += 1
        assert int(bagging_radius(p_a, p_b, n, k)) == r, (p_a, p_b, k)


def test_bagging_certify_reference_bounds_and_radii():
    cert = bagging_certify([[1000, 0, 0], [950, 30, 20]], n=60000, k=30, alpha=0.001, num_classes=3, n_test=10000)
    assert cert.p_lower[0] == pytest.approx(0.9829306527, abs=1e-10)
    assert cert.p_upper[0] == pytest.approx(0.0170693473, abs=1e-10)
    assert cert.p_lower[1] == pytest.approx(0.9030876037, abs=1e-10)
    assert cert.p_upper[1] == pytest.approx(0.0695078114, abs=1e-10)
    assert cert.radius.tolist() == [1304, 1068]
    assert cert.unit == BAGGING_UNIT == "modified training samples"
    assert bagging_certify([1000, 0, 0], n=60000, k=100, alpha=0.001, num_classes=3, n_test=10000).radius.tolist() == [394]
    # the bounds are statsmodels' two-sided interval at 2 * alpha' / C
    low, _ = proportion_confint(950, 1000, alpha=2 * 0.001 / 10000 / 3, method="beta")
    _, high = proportion_confint(30, 1000, alpha=2 * 0.001 / 10000 / 3, method="beta")
    assert cert.p_lower[1] == pytest.approx(low, abs=1e-12) and cert.p_upper[1] == pytest.approx(high, abs=1e-12)


def test_bagging_certifies_the_deployed_prediction_and_checks_its_input():
    cert = bagging_certify([[10, 900, 90], [500, 500, 0]], n=60000, k=30, labels=[1, 1])
    assert cert.prediction.tolist() == [1, 0] and cert.correct.tolist() == [True, False]
    assert cert.radius[0] > 0 and cert.radius[1] == -1
    layout = Layout.bagging(60000, 30, 1000)
    assert bagging_certify([[10, 900, 90]], n=60000, k=30, layout=layout).radius[0] == cert.radius[0]
    with pytest.raises(InputError, match="num_classes"):
        bagging_certify([[3, 1]], n=100, k=10, num_classes=3)
    with pytest.raises(InputError, match="alpha"):
        bagging_certify([[3, 1]], n=100, k=10, alpha=0)
    with pytest.raises(InputError, match="non-negative"):
        bagging_certify([[3, -1]], n=100, k=10)
    with pytest.raises(InputError, match="sums to 0"):
        bagging_certify([[0, 0]], n=100, k=10)
    with pytest.raises(InputError, match="members"):
        bagging_certify([[3, 1]], n=60000, k=30, layout=layout)


# ------------------------------------------------------------------------------------------ joint
def test_joint_rule_is_exact_by_brute_force():
    """Every multiset of K <= 7 member verdicts over 3 classes + abstain: the derived radius
    floor((n_c - n_c' - 1[c' < c] - n_abstain) / 2) (-1 when negative) equals the exact one: changing any
    <= r members to any class or to abstain, and turning every abstainer into any class (or leaving it
    abstaining), never changes the plurality, and some r + 1 changes do."""
    c = 3
    for k in range(1, 8):
        originals = np.array(list(itertools.combinations_with_replacement(range(-1, c), k)))
        finals = np.array(list(itertools.product(range(-1, c), repeat=k)))
        exact = _exact_radius(originals, finals, c, originals == -1)
        cert = joint_certify(originals.T, c)
        cnt = counts_of(originals, c)
        assert np.array_equal(cert.prediction, plurality(cnt))
        assert np.array_equal(cert.radius, exact), k
        # the rule as written, and PECAN's coded rule is never larger (sound but looser)
        order = np.argsort(-cnt, axis=1, kind="stable")
        rows = np.arange(len(cnt))
        first, second = order[:, 0], order[:, 1]
        n_abs = (originals == -1).sum(axis=1)
        gap = cnt[rows, first] - cnt[rows, second]
        rule = np.maximum((gap - (second < first) - n_abs) // 2, -1)
        assert np.array_equal(cert.radius, rule)
        assert (np.maximum((gap - 1) // 2 - n_abs, -1) <= cert.radius).all()


def test_joint_without_abstentions_is_dpa_and_checks_its_input():
    rng = np.random.default_rng(12)
    votes = rng.integers(0, 4, size=(15, 50))
    assert np.array_equal(joint_certify(votes, 4).radius, dpa_certify(one_hot_logits(votes, 4)).radius)
    assert joint_certify([-1, -1, -1], 2).radius.tolist() == [-1]
    assert joint_certify(torch.tensor([[0, 1], [0, 1], [0, -1]]), 2, labels=[0, 1]).correct.tolist() == [True, True]
    with pytest.raises(InputError, match=r"\[-1, 3\)"):
        joint_certify([[0], [3]], 3)
    with pytest.raises(InputError, match=r"\[-1, 3\)"):
        joint_certify([[0], [-2]], 3)
    with pytest.raises(InputError, match="integers"):
        joint_certify([[0.5], [1.0]], 3)
    with pytest.raises(InputError, match="num_classes"):
        joint_certify([[0], [0]], 1)


# ------------------------------------------------------------------------------------------ results, input
@pytest.mark.parametrize("fn", [dpa_certify, roe_certify, lambda x: fa_certify(x, Layout.fa(2, 2)),
                                lambda x: fa_roe_certify(x, Layout.fa(2, 2))])
def test_nan_or_inf_logits_are_refused(fn):
    logits = np.zeros((4, 3, 3))
    logits[1, 2, 0] = np.nan
    with pytest.raises(InputError, match=r"1 NaN value\(s\) \(first at member 1, point 2, class 0\)"):
        fn(logits)
    logits[1, 2, 0] = np.inf
    with pytest.raises(InputError, match="infinite"):
        fn(logits)


def test_bad_logits_and_labels_are_refused():
    with pytest.raises(InputError, match=r"\[K members, N points, C classes\]"):
        dpa_certify(np.zeros((4, 3)))
    with pytest.raises(InputError, match="at least 2 classes"):
        dpa_certify(np.zeros((4, 3, 1)))
    with pytest.raises(InputError, match="no members or no points"):
        roe_certify(np.zeros((0, 3, 3)))
    with pytest.raises(InputError, match="dtype"):
        dpa_certify(np.zeros((4, 3, 2), dtype=bool))
    with pytest.raises(InputError, match=r"labels must have shape \[3\]"):
        dpa_certify(np.zeros((4, 3, 2)), labels=[0, 1])
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\)"):
        dpa_certify(np.zeros((4, 3, 2)), labels=[0, 1, 2])


def test_certified_accuracy_and_certified_radius():
    votes = np.array([[0, 0, 1, 2]] * 5 + [[0, 1, 1, 2]] * 2)  # 7 members, 4 points
    cert = dpa_certify(one_hot_logits(votes, 3), labels=[0, 1, 1, 0])
    assert cert.prediction.tolist() == [0, 0, 1, 2]
    assert cert.radius.tolist() == [3, 1, 3, 3]
    assert cert.correct.tolist() == [True, False, True, False]
    assert cert.certified_radius.tolist() == [3, -1, 3, -1]
    assert cert.certified_accuracy([0, 3, 4]).tolist() == [0.5, 0.5, 0.0]
    assert cert.certified_accuracy(3) == 0.5
    assert len(cert) == 4
    with pytest.raises(InputError, match="true labels"):
        dpa_certify(one_hot_logits(votes, 3)).certified_accuracy(0)


def test_poisoning_trigger_robustness_converts_samples_to_the_certificate_unit():
    votes = np.array([[0] * 9 + [1]] * 3 + [[1] * 10]).T  # votes (9, 1) x 3 and (0, 10): radius 4 each
    cert = dpa_certify(one_hot_logits(votes, 2), labels=[0, 0, 1, 1])
    assert cert.radius.tolist() == [4, 4, 4, 4]
    # a modified sample counts 2 in DPA units: 2 modified -> need 4, 3 modified -> need 6
    assert poisoning_trigger_robustness(cert, 2, target=None) == 0.75
    assert poisoning_trigger_robustness(cert, 3, target=None) == 0.0
    assert poisoning_trigger_robustness(cert, 4, target=None, poisoning="inserted") == 0.75
    assert poisoning_trigger_robustness(cert, 2, target=1) == 1.0  # only the two class-0 points count
    assert np.isnan(poisoning_trigger_robustness(dpa_certify(one_hot_logits(votes, 2), labels=[1] * 4), 1, 1))
    bag = bagging_certify([[900, 100], [950, 50]], n=60000, k=30, labels=[0, 0])
    r = int(bag.radius.min())
    assert poisoning_trigger_robustness(bag, r, target=1) == 1.0  # bagging: a modified sample counts 1
    assert poisoning_trigger_robustness(bag, int(bag.radius.max()) + 1, target=1) == 0.0
    with pytest.raises(InputError, match="true labels"):
        poisoning_trigger_robustness(dpa_certify(one_hot_logits(votes, 2)), 1, 0)
    with pytest.raises(UnknownNameError):
        poisoning_trigger_robustness(cert, 1, 0, poisoning="flipped")


def test_result_shapes_are_checked():
    with pytest.raises(InputError, match="same length"):
        AggregationCertificate("dpa", [0, 1], [0], SYMMETRIC_UNIT)


def test_every_public_function_has_a_passing_doctest():
    result = doctest.testmod(aggregation, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    public = [getattr(aggregation, name) for name in aggregation.__all__ if callable(getattr(aggregation, name))]
    missing = [f.__name__ for f in public if ">>>" not in (f.__doc__ or "")]
    assert missing == []
    assert result.attempted >= len(public)


# ------------------------------------------------------------------------------------------ DPA* (versions)
def test_versions_layout_is_checked_and_keeps_old_records():
    lay = Layout.dpa(3, member_subset=[2, 0, 1, 0, 2, 1], versions=2)
    assert lay.num_members == 6 and Layout.from_dict(lay.to_dict()) == lay
    assert "versions" not in Layout.dpa(3).to_dict()  # layout.json of runs without versions is unchanged
    assert Layout.dpa(3, versions=1).versions is None
    with pytest.raises(InputError, match="each present one exactly 2 times"):
        Layout.dpa(3, member_subset=[0, 0, 1, 1, 2], versions=2)
    with pytest.raises(InputError, match="versions apply to a 'partition' layout"):
        Layout("finite-aggregation", k=2, d=2, shifts=(0, 1), versions=2)
    with pytest.raises(InputError, match="must record member_subset"):
        combine_versions(np.zeros((4, 1, 2)), Layout("partition", k=2, versions=2))


def test_dpa_star_averages_the_versions_of_each_partition_whatever_the_file_order():
    rng = np.random.default_rng(21)
    k, v, n, c = 6, 3, 50, 4
    logits = rng.normal(size=(k * v, n, c))
    logits[:, :, 1] += rng.uniform(0, 1.5, size=(1, n))
    subset = np.repeat(np.arange(k), v)
    perm = rng.permutation(k * v)                       # members saved in a shuffled file order
    lay = Layout.dpa(k, member_subset=subset[perm].tolist(), versions=v)
    manual = np.stack([logits[subset == p].mean(axis=0) for p in range(k)])  # independent grouping
    for certify in (dpa_certify, roe_certify):
        got = certify(logits[perm], layout=lay)
        want = certify(manual)
        assert np.array_equal(got.prediction, want.prediction) and np.array_equal(got.radius, want.radius)
        assert got.meta["versions"] == v and got.meta["members"] == k
    # without the layout the 18 members would be taken as 18 partitions: a different (unsound) count
    assert not np.array_equal(dpa_certify(logits).radius, dpa_certify(manual).radius)


def test_dpa_star_is_sound_by_brute_force_over_every_r_poisoned_partitions():
    """One poisoned sample can change every version of its partition: any r partitions' averaged votes may
    become anything. Enumerated for k = 5 partitions of 3 versions, 3 classes: the prediction survives every
    choice of r <= radius partitions and every new vote for them."""
    rng = np.random.default_rng(22)
    k, v, c = 5, 3, 3
    lay = Layout.dpa(k, member_subset=np.repeat(np.arange(k), v).tolist(), versions=v)
    seen, tight = set(), 0
    for _case in range(60):
        logits = rng.normal(size=(k * v, 1, c))
        logits[:, 0, int(rng.integers(c))] += rng.uniform(0, 2)
        cert = dpa_certify(logits, layout=lay)
        pred, r = int(cert.prediction[0]), int(cert.radius[0])
        seen.add(r)
        votes = np.argmax(combine_versions(logits, lay)[0][:, 0], axis=1)
        # r insertions / deletions reach at most r partitions (one each); every vote they could then cast
        for parts in itertools.combinations(range(k), max(r, 0)):
            for new in itertools.product(range(c), repeat=len(parts)):
                changed = votes.copy()
                changed[list(parts)] = new
                assert plurality(counts_of(changed[None, :], c))[0] == pred, (logits, r, parts, new)
        flips = [plurality(counts_of(np.where(np.isin(np.arange(k), parts), b, votes)[None, :], c))[0] != pred
                 for parts in itertools.combinations(range(k), r + 1) for b in range(c)]
        tight += any(flips)
    assert {0, 1, 2} <= seen and tight > 20  # radii of several sizes, mostly tight (r + 1 partitions can flip)
