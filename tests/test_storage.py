"""Specification of certkit.certify.storage: storage-update (memory-based) certification (docs/design.md section 2;
certification-notes.md 1.e and 3.2): align, trim, maximise, store; the invariant; order; persistence."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import ndtri

from certkit.certify.results import CertificationResult
from certkit.certify.storage import (
    STORE_FORMAT_VERSION,
    CertifiedStore,
    StorageCertifier,
    StorageResult,
    _distance_rtol,
)
from certkit.errors import InputError, RecordError

# ---------------------------------------------------------------- helpers


def make_cert(pred, rad, label=None, sigma=0.5) -> CertificationResult:
    pred = np.asarray(pred, dtype=np.int64)
    rad = np.where(pred >= 0, np.asarray(rad, dtype=np.float64), 0.0)
    n = pred.shape[0]
    return CertificationResult(
        label=pred.clip(min=0) if label is None else label, prediction=pred, radius=rad,
        p_lower=np.full(n, 0.9), sigma=np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n,)).copy(),
    )


def reference_storage(x, pred, rad, order, tie_last=False):
    """A plain NumPy storage update, point by point, distances to the whole current store.

    Returns (prediction, radius, flags (1 align, 2 trim, 4 maximise), covered_by, store labels, store radii).
    An abstention inside a stored ball is aligned (takes the deepest ball's label and depth); the trim bound
    ``D_j - r_j`` carries the module's rounding margin (``D_j (1 - _distance_rtol(d))``, then ``* (1 - 4u)``).
    """
    n = x.shape[0]
    x = np.asarray(x, dtype=np.float64).reshape(n, -1)
    keep = 1.0 - _distance_rtol(x.shape[1])
    centers, labels, radii = [], [], []
    out_pred = np.asarray(pred, dtype=np.int64).copy()
    out_rad = np.where(out_pred >= 0, rad, 0.0).astype(np.float64)
    flags = np.zeros(n, dtype=np.int64)
    covered = np.full(n, -1, dtype=np.int64)
    for row in order:
        y, r = out_pred[row], out_rad[row]
        if centers:
            s, lab, rr = np.array(centers), np.array(labels), np.array(radii)
            dist = np.sqrt(((s - x[row]) ** 2).sum(axis=1))
        else:
            dist = lab = rr = np.zeros(0)
        inside = dist < rr
        if inside.any():
            depth = np.where(inside, rr - dist, -np.inf)
            ties = np.flatnonzero(depth == depth.max())
            covered[row] = ties[-1] if tie_last else ties[0]
        if y < 0 and not inside.any():
            continue
        other = inside & (lab != y)
        if other.any():  # align
            dep = np.where(other, rr - dist, -np.inf)
            j = int(np.argmax(dep))
            y, r = lab[j], rr[j] - dist[j]
            flags[row] |= 1
        oth = lab != y  # trim (after aligning, against every other label), with the rounding margin
        if oth.any():
            b = (dist[oth] * keep - 2.0**-500) - rr[oth]
            bound = max(0.0, float((np.where(b > 0, b * (1 - 2.0**-51), 0.0)).min()))
        else:
            bound = np.inf
        if r > bound:
            r = bound
            flags[row] |= 2
        same = inside & (lab == y)  # maximise, capped by the trim bound
        if same.any():
            mx = min(float((rr[same] - dist[same]).max()), bound)
            if mx > r:
                r = mx
                flags[row] |= 4
        out_pred[row], out_rad[row] = y, r
        if r > 0:
            centers.append(x[row])
            labels.append(y)
            radii.append(r)
    return out_pred, out_rad, flags, covered, np.array(labels, dtype=np.int64), np.array(radii)


def flags_of(res: StorageResult) -> np.ndarray:
    return res.aligned * 1 + res.trimmed * 2 + res.maximised * 4


def pairwise_ok(store: CertifiedStore, rtol=1e-9) -> bool:
    """Invariant checked independently with NumPy: different labels => D_ij >= r_i + r_j."""
    c = store.centers
    if len(store) < 2:
        return True
    dist = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    diff = store.labels[:, None] != store.labels[None, :]
    need = store.radii[:, None] + store.radii[None, :]
    return bool(np.all(~diff | (need <= dist * (1 + rtol))))


def random_case(rng, n, d, classes, scale, abstain=0.1):
    x = rng.random((n, d))
    pred = rng.integers(0, classes, n)
    pred[rng.random(n) < abstain] = -1
    rad = rng.random(n) * scale * np.sqrt(d)
    return x, make_cert(pred, rad)


# ---------------------------------------------------------------- hand-made cases


def test_align_takes_the_label_and_the_depth_of_the_containing_ball():
    x = np.array([[0.0, 0.0], [0.5, 0.0]])
    cert = make_cert([0, 1], [2.0, 1.0], label=[0, 1])
    res = StorageCertifier().certify(x, cert)
    np.testing.assert_array_equal(res.result.prediction, [0, 0])
    np.testing.assert_allclose(res.result.radius, [2.0, 1.5], rtol=0, atol=1e-15)
    assert (res.n_aligned, res.n_trimmed, res.n_maximised) == (1, 0, 0)
    np.testing.assert_array_equal(res.aligned, [False, True])
    np.testing.assert_array_equal(res.covered_by, [-1, 0])
    np.testing.assert_array_equal(res.result.correct, [True, False])  # recomputed: label 1, now predicts 0
    assert res.result.meta["storage"]["n_aligned"] == 1
    np.testing.assert_array_equal(res.store.labels, [0, 0])
    np.testing.assert_allclose(res.store.radii, [2.0, 1.5])


def test_align_then_recheck_against_the_points_own_label():
    # B (label 1, r = 5) lies inside A (label 0, r = 2): aligned to 0 with r = 2 - 1.5 = 0.5; the trim bound
    # is recomputed against C (label 1 = B's old label): 1.5 - 0.9 = 0.6 >= 0.5, so no trim.
    x = np.array([[0.0, 0.0], [3.0, 0.0], [1.5, 0.0]])
    res = StorageCertifier().certify(x, make_cert([0, 1, 1], [2.0, 0.9, 5.0]))
    np.testing.assert_array_equal(res.result.prediction, [0, 1, 0])
    np.testing.assert_allclose(res.result.radius, [2.0, 0.9, 0.5], atol=1e-15)
    np.testing.assert_array_equal(flags_of(res), [0, 0, 1])
    assert res.store.check_invariant()


def test_trim_to_the_surface_of_the_nearest_other_label_ball():
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    res = StorageCertifier().certify(x, make_cert([0, 1, 1], [1.0, 2.5, 3.5]))
    # B: 3 - 1 = 2; C: min(4 - 1, 5 - 2 (same label: ignored)) = 3
    np.testing.assert_allclose(res.result.radius, [1.0, 2.0, 3.0], atol=1e-15)
    np.testing.assert_array_equal(res.result.prediction, [0, 1, 1])
    assert (res.n_aligned, res.n_trimmed, res.n_maximised) == (0, 2, 0)
    np.testing.assert_array_equal(res.trimmed, [False, True, True])


def test_maximise_inside_a_same_label_ball():
    x = np.array([[0.0, 0.0], [0.5, 0.0]])
    res = StorageCertifier().certify(x, make_cert([0, 0], [2.0, 0.5]))
    np.testing.assert_allclose(res.result.radius, [2.0, 1.5], atol=1e-15)
    assert (res.n_aligned, res.n_trimmed, res.n_maximised) == (0, 0, 1)
    np.testing.assert_array_equal(res.covered_by, [-1, 0])


def test_maximise_is_capped_by_the_trim_bound_and_a_larger_own_radius_wins():
    x = np.array([[0.0, 0.0], [0.5, 0.0], [0.25, 0.0]])
    res = StorageCertifier().certify(x, make_cert([0, 0, 0], [1.0, 0.3, 2.0]))
    # B: max(0.3, 1 - 0.5) = 0.5 (maximised); C: own 2.0 > depths 0.75 / 0.55 -> kept
    np.testing.assert_allclose(res.result.radius, [1.0, 0.5, 2.0], atol=1e-15)
    np.testing.assert_array_equal(flags_of(res), [0, 4, 0])


def test_trimmed_to_zero_keeps_the_prediction_but_is_not_stored():
    x = np.array([[0.0, 0.0], [1.0, 0.0]])
    res = StorageCertifier().certify(x, make_cert([0, 1], [1.0, 0.5]))
    np.testing.assert_array_equal(res.result.prediction, [0, 1])
    np.testing.assert_array_equal(res.result.radius, [1.0, 0.0])
    np.testing.assert_array_equal(res.stored_as, [0, -1])
    assert len(res.store) == 1 and res.n_trimmed == 1 and res.n_stored == 1


def test_abstention_inside_a_ball_reports_the_stored_label():
    # formerly "stays abstaining": an abstention inside a stored ball now reports the deployed answer, the
    # stored label with the align step's radius r_j - D_j (soundness issue, storage item)
    x = np.array([[0.0, 0.0], [0.5, 0.5], [9.0, 9.0]])
    res = StorageCertifier().certify(x, make_cert([3, -1, -1], [2.0, 0.0, 0.0], label=[3, 3, 1]))
    np.testing.assert_array_equal(res.result.prediction, [3, 3, -1])
    np.testing.assert_allclose(res.result.radius, [2.0, 2.0 - np.sqrt(0.5), 0.0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(res.result.correct, [True, True, False])
    np.testing.assert_array_equal(res.covered_by, [-1, 0, -1])
    np.testing.assert_array_equal(res.adopted, [False, True, False])
    np.testing.assert_array_equal(res.aligned, [False, True, False])
    np.testing.assert_array_equal(res.stored_as, [0, 1, -1])
    assert res.counts()["n_covered_abstentions"] == 1
    labels, covered = res.store.predict(x)
    np.testing.assert_array_equal(labels, [3, 3, -1])  # the memory classifier answers inside the ball
    np.testing.assert_array_equal(labels, res.result.prediction)
    np.testing.assert_array_equal(covered, [True, True, False])


def test_touching_balls_are_allowed_and_boundary_points_are_not_inside():
    x = np.array([[0.0], [2.0], [1.0]])
    res = StorageCertifier().certify(x, make_cert([0, 1, 1], [1.0, 1.0, 0.5]))
    # the second ball is trimmed a few ulps of the distance below 2 - 1 (exact invariant)
    np.testing.assert_allclose(res.result.radius[:2], [1.0, 1.0], rtol=0, atol=1e-14)
    assert res.result.radius[1] < 1.0
    assert res.store.check_invariant()
    assert res.covered_by[2] == -1  # the touching point lies on both surfaces, inside neither
    assert res.result.radius[2] == 0.0 and res.result.prediction[2] == 1
    assert res.store.predict(np.array([1.0])) == (-1, False)


def test_tie_break_changes_only_the_reported_ball():
    x = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    cert = make_cert([0, 0, 1], [1.5, 1.5, 1.0])
    first = StorageCertifier(tie_break="first").certify(x, cert)
    last = StorageCertifier(tie_break="last").certify(x, cert)
    assert first.covered_by[2] == 0 and last.covered_by[2] == 1
    np.testing.assert_array_equal(first.result.prediction, last.result.prediction)
    np.testing.assert_array_equal(first.result.radius, last.result.radius)
    assert first.result.prediction[2] == 0 and first.result.radius[2] == pytest.approx(0.5)


# ---------------------------------------------------------------- order


def test_order_changes_results_and_is_recorded():
    x = np.array([[0.0, 0.0], [1.5, 0.0]])
    cert = make_cert([0, 1], [1.0, 1.0])
    a = StorageCertifier().certify(x, cert)
    b = StorageCertifier().certify(x, cert, order=[1, 0])
    np.testing.assert_allclose(a.result.radius, [1.0, 0.5])
    np.testing.assert_allclose(b.result.radius, [0.5, 1.0])
    np.testing.assert_array_equal(a.order, [0, 1])
    np.testing.assert_array_equal(b.order, [1, 0])
    assert b.result.meta["storage"]["order"] == "explicit"


def test_a_permutation_changes_a_random_overlapping_result():
    rng = np.random.default_rng(5)
    x, cert = random_case(rng, 60, 2, 3, 0.3, abstain=0.0)
    base = StorageCertifier().certify(x, cert)
    changed = 0
    for seed in range(5):
        other = StorageCertifier(order="shuffle", seed=seed).certify(x, cert)
        changed += not np.array_equal(other.result.radius, base.result.radius)
    assert changed >= 1


def test_shuffle_order_is_seeded_recorded_and_replayable():
    rng = np.random.default_rng(1)
    x, cert = random_case(rng, 80, 3, 3, 0.3)
    a = StorageCertifier(order="shuffle", seed=7).certify(x, cert)
    np.testing.assert_array_equal(a.order, np.random.default_rng(7).permutation(80))
    b = StorageCertifier(order="shuffle", seed=7).certify(x, cert)
    c = StorageCertifier().certify(x, cert, order=a.order)
    for other in (b, c):
        np.testing.assert_array_equal(other.result.prediction, a.result.prediction)
        np.testing.assert_array_equal(other.result.radius, a.result.radius)
        np.testing.assert_array_equal(other.store.centers, a.store.centers)
    assert a.result.meta["storage"]["order"] == "shuffle" and a.result.meta["storage"]["seed"] == 7


def test_continuing_from_a_store_equals_one_pass():
    rng = np.random.default_rng(2)
    x, cert = random_case(rng, 120, 4, 3, 0.35)
    whole = StorageCertifier().certify(x, cert)
    first = StorageCertifier().certify(x[:50], cert.subset(np.arange(50)))
    second = StorageCertifier().certify(x[50:], cert.subset(np.arange(50, 120)), store=first.store)
    np.testing.assert_array_equal(np.concatenate([first.result.prediction, second.result.prediction]),
                                  whole.result.prediction)
    np.testing.assert_array_equal(np.concatenate([first.result.radius, second.result.radius]), whole.result.radius)
    np.testing.assert_array_equal(second.store.centers, whole.store.centers)
    np.testing.assert_array_equal(second.store.ids, whole.store.ids)
    assert second.result.meta["storage"]["continued_from"] == first.store.fingerprint


# ---------------------------------------------------------------- properties (hypothesis)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    d=st.sampled_from([2, 8]),
    classes=st.integers(2, 3),
    scale=st.floats(0.05, 0.8),
    shuffle=st.booleans(),
)
def test_storage_properties(seed, n, d, classes, scale, shuffle):
    rng = np.random.default_rng(seed)
    x, cert = random_case(rng, n, d, classes, scale)
    certifier = StorageCertifier(order="shuffle" if shuffle else "given", seed=seed % 1000)
    res = certifier.certify(x, cert)
    store = res.store
    # the invariant, checked by the store and independently
    assert store.check_invariant()
    assert pairwise_ok(store)
    # radii: never above the own radius except where aligned or maximised (then: the depth of the ball)
    own = cert.radius
    plain = ~res.aligned & ~res.maximised
    assert np.all(res.result.radius[plain] <= own[plain])
    grown = res.aligned | res.maximised
    assert np.all(res.covered_by[grown] >= 0)
    depth_bound = store.radii[res.covered_by[grown]] - np.linalg.norm(
        x[grown] - store.centers[res.covered_by[grown]], axis=1)
    assert np.all(res.result.radius[grown] <= depth_bound * (1 + 1e-12) + 1e-15)
    # abstentions: inside a ball (when processed) they report the store's answer, else stay -1, unstored
    abst = cert.prediction < 0
    adopted = abst & (res.covered_by >= 0)
    np.testing.assert_array_equal(res.adopted, adopted)
    if adopted.any():
        np.testing.assert_array_equal(res.result.prediction[adopted], store.predict(x[adopted])[0])
    lone = abst & ~adopted
    assert np.all(res.result.prediction[lone] == -1) and np.all(res.result.radius[lone] == 0)
    assert np.all(res.stored_as[lone] == -1)
    stored = res.stored_as >= 0
    np.testing.assert_array_equal(store.labels[res.stored_as[stored]], res.result.prediction[stored])
    np.testing.assert_array_equal(store.radii[res.stored_as[stored]], res.result.radius[stored])
    assert np.all(res.result.radius[~stored] == 0)
    assert res.n_aligned == res.aligned.sum() and res.n_trimmed == res.trimmed.sum()
    # the recorded order reproduces everything
    again = StorageCertifier().certify(x, cert, order=res.order)
    np.testing.assert_array_equal(again.result.prediction, res.result.prediction)
    np.testing.assert_array_equal(again.result.radius, res.result.radius)
    np.testing.assert_array_equal(again.covered_by, res.covered_by)
    # predict: stored centres -> their labels; inside a ball -> its label; far away -> -1
    if len(store):
        labels, covered = store.predict(store.centers)
        np.testing.assert_array_equal(labels, store.labels)
        assert covered.all()
        direction = rng.standard_normal(store.centers.shape)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        inside = store.centers + direction * (0.9 * store.radii)[:, None]
        np.testing.assert_array_equal(store.predict(inside)[0], store.labels)
    far = x + 100.0 * (1 + own.max())
    labels, covered = store.predict(far)
    assert np.all(labels == -1) and not covered.any()


@pytest.mark.parametrize("d", [1, 2, 8, 33])
@pytest.mark.parametrize("block_size", [1, 5, None])
def test_kernel_equals_numpy_reference(d, block_size):
    rng = np.random.default_rng(100 + d)
    for trial in range(4):
        n = int(rng.integers(1, 300))
        scale = [0.05, 0.2, 0.5, 1.0][trial]
        x, cert = random_case(rng, n, d, 3, scale)
        tie = trial % 2 == 1
        res = StorageCertifier(order="shuffle", seed=trial, tie_break="last" if tie else "first",
                               block_size=block_size).certify(x, cert)
        pred, rad, flags, covered, labels, radii = reference_storage(x, cert.prediction, cert.radius, res.order, tie)
        np.testing.assert_array_equal(res.result.prediction, pred)
        np.testing.assert_allclose(res.result.radius, rad, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(flags_of(res), flags)
        np.testing.assert_array_equal(res.covered_by, covered)
        np.testing.assert_array_equal(res.store.labels, labels)
        np.testing.assert_allclose(res.store.radii, radii, rtol=1e-12, atol=1e-14)


def test_results_do_not_depend_on_threads_or_block_size():
    import numba

    rng = np.random.default_rng(12)
    x, cert = random_case(rng, 400, 12, 3, 0.35)
    base = StorageCertifier(order="shuffle", seed=2).certify(x, cert)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = StorageCertifier(order="shuffle", seed=2, block_size=7).certify(x, cert)
    finally:
        numba.set_num_threads(before)
    for name in ("prediction", "radius"):
        np.testing.assert_array_equal(getattr(one.result, name), getattr(base.result, name))
    np.testing.assert_array_equal(one.covered_by, base.covered_by)
    np.testing.assert_array_equal(one.store.centers, base.store.centers)


def test_kernel_equals_reference_with_float64_bounds_for_large_values():
    # |x| > 1e15 switches the distance bounds from float32 to float64 products; |x| > 1e100 is refused
    rng = np.random.default_rng(11)
    x, cert = random_case(rng, 200, 5, 3, 0.4)
    big = make_cert(cert.prediction, cert.radius * 1e20)
    res = StorageCertifier(block_size=32).certify(x * 1e20, big)
    pred, rad, flags, covered, _, _ = reference_storage(x * 1e20, big.prediction, big.radius, res.order)
    np.testing.assert_array_equal(res.result.prediction, pred)
    np.testing.assert_allclose(res.result.radius, rad, rtol=1e-12)
    np.testing.assert_array_equal(flags_of(res), flags)
    np.testing.assert_array_equal(res.covered_by, covered)
    small = StorageCertifier(block_size=32).certify(x, cert)  # same geometry at unit scale
    np.testing.assert_array_equal(small.result.prediction, res.result.prediction)
    with pytest.raises(InputError, match="values up to"):
        StorageCertifier().certify(x * 1e101, cert)


def test_kernel_equals_reference_with_overflowing_candidate_lists():
    # 700 heavily overlapping points in 16-D: more than one block, and more candidates per point than listed
    rng = np.random.default_rng(3)
    x, cert = random_case(rng, 700, 16, 3, 0.4)
    res = StorageCertifier(order="shuffle", seed=1).certify(x, cert)
    pred, rad, flags, covered, labels, _ = reference_storage(x, cert.prediction, cert.radius, res.order)
    np.testing.assert_array_equal(res.result.prediction, pred)
    np.testing.assert_allclose(res.result.radius, rad, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(flags_of(res), flags)
    np.testing.assert_array_equal(res.covered_by, covered)
    assert res.n_trimmed > 0 and res.n_aligned > 0


# ---------------------------------------------------------------- real overlaps: digits


def test_overlaps_really_occur_on_digits_with_large_sigma():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # [1797, 64] in [0, 1]
    y = digits.target
    rng = np.random.default_rng(0)
    n = x.shape[0]
    # a Cert-SSB-like regime: per-sample sigma around 1 pixel unit, confident votes -> radii 1.3-2.6,
    # larger than most inter-sample distances (median nearest-neighbour distance about 1.0)
    sigma = rng.uniform(0.8, 1.2, n)
    p_lower = rng.uniform(0.9, 0.995, n)
    radius = sigma * ndtri(p_lower)
    pred = np.where(rng.random(n) < 0.9, y, (y + 1) % 10)  # a 90 % accurate smoothed classifier
    cert = CertificationResult(label=y, prediction=pred, radius=radius, p_lower=p_lower, sigma=sigma)
    res = StorageCertifier(order="shuffle", seed=0).certify(x, cert)
    assert res.n_trimmed > 100 and res.n_aligned > 10
    assert res.store.check_invariant()
    assert pairwise_ok(res.store)
    ref_pred, ref_rad, flags, _, _, _ = reference_storage(x.astype(np.float64), pred, radius, res.order)
    np.testing.assert_array_equal(res.result.prediction, ref_pred)
    np.testing.assert_allclose(res.result.radius, ref_rad, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(flags_of(res), flags)
    assert res.result.acr() <= cert.acr() + 1e-12 or res.n_maximised > 0
    np.testing.assert_array_equal(res.store.sigmas, sigma[res.store.ids])


# ---------------------------------------------------------------- inputs and shapes


def test_image_shaped_tensor_inputs_and_single_queries():
    rng = np.random.default_rng(4)
    x = torch.rand(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    cert = make_cert(rng.integers(0, 2, 30), rng.random(30) * 2.0)
    res = StorageCertifier().certify(x, cert)
    assert res.store.shape == (1, 4, 4) and res.store.centers.shape[1] == 16
    flat = StorageCertifier().certify(x.reshape(30, 16).numpy(), cert)
    np.testing.assert_array_equal(flat.result.radius, res.result.radius)
    j = int(res.stored_as[res.stored_as >= 0][0])
    row = int(np.flatnonzero(res.stored_as == j)[0])
    label, covered = res.store.predict(x[row])  # one input of shape [1, 4, 4]
    assert covered and label == res.store.labels[j] and isinstance(label, int)
    assert res.store.predict(x[row].reshape(-1))[0] == label
    labels, cov = res.store.predict(x)  # a batch
    assert labels.shape == (30,) and cov.dtype == bool
    with pytest.raises(InputError, match="shape"):
        res.store.predict(np.zeros((3, 5)))


def test_fingerprint_identifies_the_inputs():
    rng = np.random.default_rng(6)
    x, cert = random_case(rng, 20, 3, 2, 0.2)
    a = StorageCertifier().certify(x, cert).store.fingerprint
    assert a == StorageCertifier().certify(x.copy(), cert).store.fingerprint and len(a) == 64
    assert a != StorageCertifier().certify(x + 1e-9, cert).store.fingerprint
    assert StorageCertifier().certify(x, cert, fingerprint="digits-test").store.fingerprint == "digits-test"


def test_input_validation():
    x = np.zeros((3, 2))
    cert = make_cert([0, 1, 0], [1.0, 1.0, 1.0])
    sc = StorageCertifier()
    with pytest.raises(InputError, match="one row per certificate"):
        sc.certify(np.zeros((4, 2)), cert)
    with pytest.raises(InputError, match="permutation"):
        sc.certify(x, cert, order=[0, 0, 1])
    with pytest.raises(InputError, match="NaN"):
        sc.certify(np.full((3, 2), np.nan), cert)
    with pytest.raises(InputError, match="infinite"):
        sc.certify(x, make_cert([0, 1, 0], [1.0, np.inf, 1.0]))
    with pytest.raises(InputError, match="CertificationResult"):
        sc.certify(x, {"prediction": [0, 1, 0]})
    for bad in (StorageCertifier(order="random"), StorageCertifier(tie_break="middle"),
                StorageCertifier(seed=-1), StorageCertifier(block_size=0)):
        with pytest.raises(InputError):
            bad.certify(x, cert)
    other = StorageCertifier().certify(np.zeros((3, 5)), cert).store
    with pytest.raises(InputError, match="shape"):
        sc.certify(x, cert, store=other)
    with pytest.raises(InputError, match="no store"):
        StorageCertifier().predict(x)


def test_empty_input_and_all_abstaining():
    res = StorageCertifier().certify(np.zeros((0, 3)), make_cert(np.zeros(0, np.int64), np.zeros(0)))
    assert len(res.store) == 0 and res.store.predict(np.zeros((2, 3)))[0].tolist() == [-1, -1]
    res = StorageCertifier().certify(np.eye(3), make_cert([-1, -1, -1], [0.0, 0.0, 0.0]))
    assert len(res.store) == 0 and res.n_stored == 0


def test_invariant_violations_are_detected():
    bad = CertifiedStore(np.array([[0.0, 0.0], [1.0, 0.0]]), [0, 1], [0.6, 0.6], [1.0, 1.0], (2,))
    assert not bad.check_invariant()
    with pytest.raises(RecordError, match="invariant"):
        bad.predict(np.array([0.5, 0.0]))
    ok = CertifiedStore(np.array([[0.0, 0.0], [1.0, 0.0]]), [0, 0], [0.6, 0.6], [1.0, 1.0], (2,))
    assert ok.check_invariant() and ok.predict(np.array([0.5, 0.0])) == (0, True)


# ---------------------------------------------------------------- persistence


@pytest.fixture
def fitted():
    rng = np.random.default_rng(8)
    x, cert = random_case(rng, 50, 6, 3, 0.3)
    return x.reshape(50, 2, 3), StorageCertifier(order="shuffle", seed=3).certify(x.reshape(50, 2, 3), cert)


def test_save_load_round_trip(tmp_path, fitted):
    x, res = fitted
    path = res.store.save(tmp_path / "store.npz")
    loaded = CertifiedStore.load(path, expected_shape=(2, 3), check_invariant=True)
    for name in ("centers", "labels", "radii", "sigmas", "ids"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(res.store, name))
    assert loaded.shape == (2, 3) and loaded.fingerprint == res.store.fingerprint
    assert loaded.meta == res.store.meta and loaded.meta["order"] == "shuffle"
    np.testing.assert_array_equal(loaded.predict(x)[0], res.store.predict(x)[0])
    with np.load(path, allow_pickle=False) as data:  # no object arrays: loadable without pickle
        assert int(data["format_version"]) == STORE_FORMAT_VERSION and len(str(data["checksum"])) == 64
    # the certifier-level API
    sc = StorageCertifier.load(path, expected_shape=(2, 3))
    assert sc.order == "shuffle" and sc.seed == 3
    np.testing.assert_array_equal(sc.predict(x)[0], res.store.predict(x)[0])
    sc.save(tmp_path / "again.npz")
    assert CertifiedStore.load(tmp_path / "again.npz").fingerprint == res.store.fingerprint


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as data:
        contents = {k: data[k] for k in data.files}
    contents.update(changes)
    with open(path, "wb") as fh:
        np.savez(fh, **contents)


def test_load_refuses_corrupt_files(tmp_path, fitted):
    _, res = fitted
    path = tmp_path / "store.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(RecordError, match="not a readable store"):
        CertifiedStore.load(path)
    good = res.store.save(tmp_path / "good.npz").read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(RecordError):
        CertifiedStore.load(path)
    with pytest.raises(InputError, match="no store file"):
        CertifiedStore.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(RecordError, match="missing"):
        CertifiedStore.load(tmp_path / "other.npz")


def test_load_refuses_tampered_stores(tmp_path, fitted):
    _, res = fitted
    path = res.store.save(tmp_path / "store.npz")
    _rewrite(path, radii=res.store.radii * 1.5)
    with pytest.raises(RecordError, match="checksum"):
        CertifiedStore.load(path)
    path = res.store.save(tmp_path / "store.npz")
    _rewrite(path, format_version=np.asarray(STORE_FORMAT_VERSION + 1))
    with pytest.raises(RecordError, match="format version"):
        CertifiedStore.load(path)
    path = res.store.save(tmp_path / "store.npz")
    with pytest.raises(InputError, match="shape"):
        CertifiedStore.load(path, expected_shape=(28, 28))


def test_failed_save_leaves_the_old_store_intact(tmp_path, fitted, monkeypatch):
    _, res = fitted
    path = res.store.save(tmp_path / "store.npz")
    before = path.read_bytes()
    other = CertifiedStore(res.store.centers[:3], res.store.labels[:3], res.store.radii[:3],
                           res.store.sigmas[:3], res.store.shape)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.npz"]  # no temporary file left behind
    assert len(CertifiedStore.load(path)) == len(res.store)
