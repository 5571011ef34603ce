"""Soundness of the certification maths (docs/design.md sections 2, 6 and 10): the smaller items of the soundness
issue, one block per module: radius, bounds, storage, ensemble, metrics."""

from __future__ import annotations

import doctest
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from certkit.certify import metrics as metrics_module
from certkit.certify.bounds import clopper_pearson, hoeffding, hoeffding_halfwidth
from certkit.certify.ensemble import EnsembleVotes, certify_votes
from certkit.certify.metrics import SimultaneousBound, certified_trigger_robustness, simultaneous_asr_bound
from certkit.certify.radius import cohen_certify_counts, gaussian_radius, hoeffding_soft_radius
from certkit.certify.results import CertificationResult
from certkit.certify.storage import CertifiedStore, StorageCertifier
from certkit.errors import InputError

# ---------------------------------------------------------------- radius: Hoeffding soft-score radius


def test_soft_radius_binary_bound_is_one_bound_at_alpha_design_reference_values():
    # docs/design.md section 9 values are for the single bound pA - h(alpha), pB_up = 1 - pA_low: kept as they are
    p_a = np.array([0.95, 0.99, 0.70])
    radius = hoeffding_soft_radius(p_a, 1000, 1e-3, 1.0, selected_from_scores=False)
    np.testing.assert_allclose(radius, [1.23310, 1.48502, 0.36175], atol=5e-6)
    h = math.sqrt(math.log(1 / 1e-3) / 2000)
    np.testing.assert_allclose(radius, stats.norm.ppf(p_a - h), rtol=1e-13)


def test_soft_radius_with_two_bounds_from_the_same_scores_splits_alpha():
    p_a, p_b = np.array([0.8, 0.6, 0.9]), np.array([0.15, 0.3, 0.02])
    got = hoeffding_soft_radius(p_a, 500, 1e-3, 0.5, p_b_mean=p_b, selected_from_scores=False)
    h2 = math.sqrt(math.log(2 / 1e-3) / 1000)  # h(alpha / 2), not h(alpha)
    np.testing.assert_allclose(got, 0.25 * (stats.norm.ppf(p_a - h2) - stats.norm.ppf(p_b + h2)), rtol=1e-12)
    h1 = math.sqrt(math.log(1 / 1e-3) / 1000)
    unsplit = 0.25 * (stats.norm.ppf(p_a - h1) - stats.norm.ppf(p_b + h1))
    assert np.all(got < unsplit)


def test_selection_corrected_two_class_ensemble_equals_soft_radius_at_half_alpha():
    # the docstring's advice: with the class picked from the same scores, pass alpha / 2; the ensemble
    # (selection_correction=True, alpha / C with C = 2) certifies exactly that radius
    rng = np.random.default_rng(0)
    m, n = 400, 50
    p0 = rng.beta(8.0, 2.0, size=(m, n))  # class 0 ahead on most points
    p0[:, :10] = 1 - p0[:, :10]  # class 1 ahead on some
    soft = np.stack([p0, 1 - p0], axis=-1)  # [M, N, 2]
    votes = EnsembleVotes(predictions=soft.argmax(-1), soft_sum=soft.sum(0), num_classes=2)
    res = certify_votes(votes, sigma=0.5, alpha=1e-3, bound="hoeffding")
    top = votes.soft_mean().max(1)
    expected = hoeffding_soft_radius(top, m, 1e-3, 0.5)  # the default selection correction: alpha / 2
    assert (expected > 0).sum() > 30
    np.testing.assert_allclose(res.radius, expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- radius: abstain at exactly 1/2


def test_cohen_certify_abstains_when_the_lower_bound_is_exactly_one_half():
    # k = n = 10 at alpha = 2^-10: p_lower = alpha^(1/n) = 1/2 exactly (Cohen's code certified radius 0 here)
    p_lower, radius, abstain = cohen_certify_counts(10, 10, 2.0**-10, 1.0)
    assert p_lower == 0.5
    assert abstain and radius == 0.0
    p_lower, radius, abstain = cohen_certify_counts([10, 10], 10, [2.0**-10, 2.0**-9], 1.0)
    np.testing.assert_array_equal(abstain, [True, False])
    assert radius[0] == 0.0 and radius[1] > 0.0 and p_lower[1] > 0.5


def test_gaussian_radius_abstains_where_the_bounds_meet():
    assert gaussian_radius(0.5, 1.0) == 0.0
    assert gaussian_radius(0.7, 1.0, 0.7) == 0.0
    assert gaussian_radius(np.nextafter(0.5, 1.0), 1.0) > 0.0


# ---------------------------------------------------------------- bounds: one-sided alpha < 1/2


@pytest.mark.parametrize("alternative", ["greater", "less"])
@pytest.mark.parametrize("alpha", [0.5, 0.6, 0.999, [0.01, 0.7]])
def test_one_sided_bounds_refuse_alpha_of_one_half_or_more(alternative, alpha):
    with pytest.raises(InputError, match=rf"alpha must be < 0.5 .*alternative='{alternative}'"):
        clopper_pearson(5, 10, alpha, alternative)
    with pytest.raises(InputError, match=rf"alpha must be < 0.5 .*alternative='{alternative}'"):
        hoeffding(0.5, 10, alpha, alternative)


def test_one_sided_alpha_just_below_one_half_and_two_sided_alpha_up_to_one_are_accepted():
    low = clopper_pearson(5, 10, 0.4999, "greater").low
    assert low <= 0.5  # a lower bound stays below k / n
    high = clopper_pearson(5, 10, 0.4999, "less").high
    assert high >= 0.5
    two = clopper_pearson(5, 10, 0.9)
    assert two.low <= 0.5 <= two.high
    ci = hoeffding(0.5, 10, 0.9)
    assert ci.low <= 0.5 <= ci.high


def test_the_radius_functions_and_halfwidth_refuse_one_sided_alpha_of_one_half():
    with pytest.raises(InputError, match="alpha must be < 0.5"):
        cohen_certify_counts(8, 10, 0.5, 1.0)
    with pytest.raises(InputError, match="alpha must be < 0.5"):
        hoeffding_soft_radius(0.9, 100, 0.6, 1.0, selected_from_scores=False)
    with pytest.raises(InputError, match="alpha must be < 0.5"):
        hoeffding_halfwidth(100, 0.5)
    # two bounds at alpha / 2 each: alpha up to 1 is fine
    assert hoeffding_soft_radius(0.9, 100, 0.6, 1.0, p_b_mean=0.05) > 0


def test_ensemble_without_selection_correction_refuses_alpha_of_one_half():
    votes = EnsembleVotes(predictions=np.zeros((20, 3), dtype=np.int64),
                          soft_sum=np.tile([18.0, 2.0], (3, 1)), num_classes=2)
    for bound in ("clopper-pearson", "hoeffding"):
        with pytest.raises(InputError, match="alpha must be < 0.5"):
            certify_votes(votes, sigma=1.0, alpha=0.6, bound=bound, selection_correction=False)
        # the default correction bounds each class at alpha / C < 1/2
        assert certify_votes(votes, sigma=1.0, alpha=0.6, bound=bound).prediction.tolist() == [0, 0, 0]


# ---------------------------------------------------------------- storage: exact invariant


def exact_violations(store: CertifiedStore) -> int:
    """Pairs of stored balls of different labels with ``(r_i + r_j)^2 > D_ij^2`` in exact rational
    arithmetic on the float64 values (pairs clearly apart in float64 are skipped)."""
    c, lab, r = store.centers, store.labels, store.radii
    k = len(store)
    if k < 2:
        return 0
    dist = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    near = (lab[:, None] != lab[None, :]) & (dist <= (r[:, None] + r[None, :]) * (1 + 1e-9))
    near &= np.triu(np.ones((k, k), dtype=bool), 1)
    bad = 0
    for i, j in zip(*np.nonzero(near)):
        d2 = sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(c[i].tolist(), c[j].tolist()))
        s = Fraction(float(r[i])) + Fraction(float(r[j]))
        bad += s * s > d2
    return bad


def _cert(pred, rad, label=None) -> CertificationResult:
    pred = np.asarray(pred, dtype=np.int64)
    n = pred.shape[0]
    rad = np.where(pred >= 0, np.asarray(rad, dtype=np.float64), 0.0)
    return CertificationResult(label=np.maximum(pred, 0) if label is None else label, prediction=pred,
                               radius=rad, p_lower=np.full(n, 0.9), sigma=np.full(n, 0.5))


def _touching_store(x, pred, rad, **kwargs):
    res = StorageCertifier(**kwargs).certify(x, _cert(pred, rad))
    assert res.n_trimmed > 0
    return res.store


@pytest.mark.parametrize("seed", range(4))
def test_invariant_holds_exactly_on_random_stores(seed):
    # 200 points in 5-D, three labels, radii of about the inter-point distances: many trims (before the
    # rounding margin, dozens of pairs per store overlapped by ~1e-16 in exact arithmetic)
    rng = np.random.default_rng(seed)
    x = rng.random((200, 5))
    store = _touching_store(x, rng.integers(0, 3, 200), rng.random(200) * 0.3)
    assert len(store) > 100 and len(np.unique(store.labels)) > 1
    assert exact_violations(store) == 0


@pytest.mark.parametrize("seed", range(2))
def test_invariant_holds_exactly_when_every_later_ball_is_trimmed_to_touch(seed):
    rng = np.random.default_rng(10 + seed)
    x = rng.random((200, 5))
    rad = 1e3 * rng.random(200) + 0.01  # every ball wants far more than there is room for
    rad[0] = 0.05
    store = _touching_store(x, rng.integers(0, 3, 200), rad)
    assert exact_violations(store) == 0


def test_invariant_holds_exactly_when_trimmed_radii_are_tiny_next_to_the_distance():
    # cancellation: r_new = D - r_j with r_j within 1e-12 of D; a margin of a few ulps of r_new is not enough
    rng = np.random.default_rng(3)
    pts, pred, rad = [], [], []
    for i in range(60):
        a = rng.random(5) * 10
        b = a + rng.standard_normal(5)
        d = float(np.sqrt(((a - b) ** 2).sum()))
        pts += [a, b]
        pred += [i % 2, 1 - i % 2]
        rad += [d * (1 - 10.0 ** rng.uniform(-15, -9)), 5.0]
    store = _touching_store(np.array(pts), np.array(pred), np.array(rad))
    assert exact_violations(store) == 0


@pytest.mark.parametrize(("d", "scale"), [(64, 1.0), (5, 1e20), (3, 1e-3)])
def test_invariant_holds_exactly_in_other_dimensions_and_scales(d, scale):
    rng = np.random.default_rng(d)
    x = rng.random((150, d)) * scale
    typical = np.sqrt(d / 6) * scale  # mean distance of uniform points
    store = _touching_store(x, rng.integers(0, 2, 150), rng.random(150) * typical, block_size=16)
    assert exact_violations(store) == 0


def test_invariant_holds_exactly_on_a_lattice_of_exact_touches():
    # integer lattice, radius 1/2 each, alternating labels: in exact arithmetic every neighbour pair touches
    g = np.stack(np.meshgrid(np.arange(8.0), np.arange(8.0), np.arange(3.0)), -1).reshape(-1, 3)
    pred = (g.sum(1) % 2).astype(np.int64)
    res = StorageCertifier().certify(g * 0.1, _cert(pred, np.full(len(g), 0.05)))
    assert exact_violations(res.store) == 0
    assert np.all(res.result.radius <= 0.05) and np.all(res.result.radius > 0.05 * (1 - 1e-13))


# ---------------------------------------------------------------- storage: abstentions answered by the store


def test_abstentions_inside_a_stored_ball_report_what_the_store_predicts():
    rng = np.random.default_rng(7)
    n = 300
    x = rng.random((n, 4))
    pred = rng.integers(0, 3, n)
    pred[rng.random(n) < 0.3] = -1
    cert = _cert(pred, rng.random(n) * 0.4)
    res = StorageCertifier(order="shuffle", seed=1).certify(x, cert)
    abst = pred < 0
    covered = abst & (res.covered_by >= 0)
    assert covered.sum() > 10 and (abst & ~covered).sum() > 0
    np.testing.assert_array_equal(res.adopted, covered)
    labels, inside = res.store.predict(x[covered])
    assert inside.all()
    np.testing.assert_array_equal(res.result.prediction[covered], labels)
    # radius: the align step's depth r_j - D_j of the deepest containing ball (up to the trim margin)
    j = res.covered_by[covered]
    depth = res.store.radii[j] - np.linalg.norm(x[covered] - res.store.centers[j], axis=1)
    np.testing.assert_allclose(res.result.radius[covered], depth, rtol=1e-12, atol=1e-14)
    assert np.all(res.aligned[covered])
    assert res.counts()["n_covered_abstentions"] == int(covered.sum())
    # correct is recomputed against the labels
    np.testing.assert_array_equal(res.result.correct[covered], labels == cert.label[covered])
    # abstentions outside every ball stay -1 with radius 0
    assert np.all(res.result.prediction[abst & ~covered] == -1)
    assert np.all(res.result.radius[abst & ~covered] == 0.0)
    assert exact_violations(res.store) == 0


def test_an_abstention_is_answered_by_the_store_as_it_was_when_the_query_came():
    # the abstention (row 0) comes first: no ball yet, so it stays -1 even though row 1's ball covers it later
    x = np.array([[0.1, 0.0], [0.0, 0.0], [0.2, 0.0]])
    res = StorageCertifier().certify(x, _cert([-1, 2, -1], [0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(res.result.prediction, [-1, 2, 2])
    assert res.result.radius[0] == 0.0 and res.result.radius[2] == pytest.approx(0.8, abs=1e-15)
    np.testing.assert_array_equal(res.adopted, [False, False, True])


# ---------------------------------------------------------------- ensemble: Hoeffding-mode prediction


def _disagreeing_votes(members: int = 1000) -> EnsembleVotes:
    """60% of the members vote class 0 with a soft score of 0.4, 40% vote class 1 with 1.0: the hard majority
    is 0, the largest mean soft score is class 1 (0.61 against 0.24)."""
    a = int(0.6 * members)
    soft = np.array([[0.4, 0.35, 0.25]] * a + [[0.0, 1.0, 0.0]] * (members - a))  # [M, 3], one point
    return EnsembleVotes(predictions=soft.argmax(1)[:, None], soft_sum=soft.sum(0)[None, :], num_classes=3)


def test_hoeffding_prediction_is_the_soft_ranking_not_the_hard_majority():
    votes = _disagreeing_votes()
    assert votes.counts().argmax(1).tolist() == [0]  # what the ensemble's accuracy / ASR used
    assert votes.prediction("clopper-pearson").tolist() == [0]
    assert votes.prediction("hoeffding").tolist() == [1]
    res = certify_votes(votes, [1], sigma=0.5, alpha=1e-3, bound="hoeffding")
    assert res.prediction.tolist() == [1] and res.radius[0] > 0
    assert res.accuracy() == 1.0
    cp = certify_votes(votes, [1], sigma=0.5, alpha=1e-3, bound="clopper-pearson")
    assert cp.prediction.tolist() == [0]


@pytest.mark.parametrize("bound", ["clopper-pearson", "hoeffding"])
def test_point_prediction_is_the_certified_class_wherever_the_ensemble_certifies(bound):
    rng = np.random.default_rng(4)
    m, n, c = 200, 400, 4
    logits = rng.standard_normal((m, n, c)) * 2 + rng.standard_normal((1, n, c)) * 2
    soft = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    flip = rng.random((m, n)) < 0.3  # hard votes that disagree with the soft argmax now and then
    hard = np.where(flip, rng.integers(0, c, (m, n)), soft.argmax(-1))
    votes = EnsembleVotes(predictions=hard, soft_sum=soft.sum(0), num_classes=c)
    res = certify_votes(votes, sigma=0.5, alpha=1e-3, bound=bound)
    pred = votes.prediction(bound)
    ok = res.prediction >= 0
    assert ok.sum() > 50
    np.testing.assert_array_equal(res.prediction[ok], pred[ok])
    np.testing.assert_array_equal(pred, votes.scores(bound).argmax(1))
    assert not np.array_equal(votes.prediction("hoeffding"), votes.prediction("clopper-pearson"))


# ---------------------------------------------------------------- metrics: simultaneous ASR bound


@pytest.mark.parametrize(("n", "alpha", "delta"), [(1000, 1e-3, 0.05), (10_000, 1e-3, 0.01), (50, 0.01, 0.1),
                                                  (1, 1e-3, 0.05), (200_000, 1e-4, 1e-6), (500, 0.2, 0.3)])
def test_binomial_quantile_matches_scipy(n, alpha, delta):
    res = simultaneous_asr_bound(0.7, n, alpha, delta)
    q = res.q
    assert res.method == "binomial"
    assert stats.binom.sf(q - 1, n, alpha) <= delta  # P(F >= q) <= delta
    if q > 1:
        assert stats.binom.sf(q - 2, n, alpha) > delta  # and q is the smallest such
    assert q == int(stats.binom.isf(delta, n, alpha)) + 1
    assert res.bound == pytest.approx(min(1.0, 0.3 + q / n), abs=1e-15)


@pytest.mark.parametrize(("n", "alpha", "delta"), [(1000, 1e-3, 0.05), (10_000, 1e-3, 0.01), (7, 0.3, 0.5),
                                                  (1000, 1e-3, 0.1)])
def test_markov_quantile(n, alpha, delta):
    res = simultaneous_asr_bound(0.9, n, alpha, delta, independent=False)
    assert res.method == "markov"
    assert res.q == math.ceil(n * alpha / delta - 1e-9)
    assert n * alpha / res.q <= delta
    assert res.q >= simultaneous_asr_bound(0.9, n, alpha, delta).q  # never tighter than the binomial one


def test_simultaneous_bound_result_and_statement():
    res = simultaneous_asr_bound(0.9, 1000, alpha=0.001, delta=0.05)
    assert isinstance(res, SimultaneousBound)
    assert (res.q, res.n, res.alpha, res.delta) == (4, 1000, 0.001, 0.05)
    assert res.bound == pytest.approx(0.104)
    assert res.statement == ("smoothed ASR <= 0.104 with probability >= 0.95 "
                             "(at most 4 of 1000 certificates fail)")
    assert str(res) == res.statement
    # the sentence never prints the bound below its value, nor the level above 1 - delta
    tight = simultaneous_asr_bound(0.8956, 1000, alpha=0.001, delta=1e-6)
    assert tight.bound == pytest.approx(0.1144)
    assert "ASR <= 0.115 with probability >= 0.999999 " in tight.statement
    # edge cases: the bound is capped at 1; CTR 1 leaves only the failures
    assert simultaneous_asr_bound(0.0, 100, 0.01, 0.05).bound == 1.0
    assert simultaneous_asr_bound(1.0, 1000, 0.001, 0.05).bound == pytest.approx(0.004)
    assert simultaneous_asr_bound(1.0, 1, 1e-9, 0.5).q == 1  # at least one failure is always budgeted


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ctr": 1.2}, "ctr"), ({"ctr": -0.1}, "ctr"), ({"ctr": float("nan")}, "ctr"), ({"ctr": "a"}, "ctr"),
        ({"ctr": True}, "ctr"), ({"n_nontarget": 0}, "n_nontarget"), ({"n_nontarget": 10.0}, "n_nontarget"),
        ({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"delta": 0.0}, "delta"),
        ({"delta": 1.5}, "delta"), ({"independent": "yes"}, "independent"),
    ],
)
def test_simultaneous_bound_validates_its_inputs(kwargs, match):
    args = {"ctr": 0.5, "n_nontarget": 100, "alpha": 0.001, "delta": 0.05, **kwargs}
    with pytest.raises(InputError, match=match):
        simultaneous_asr_bound(**args)


@pytest.mark.parametrize(("n", "alpha", "delta"), [(1000, 1e-3, 0.05), (200, 0.02, 0.1), (5000, 1e-3, 0.01)])
def test_monte_carlo_coverage_of_the_failure_quantile(n, alpha, delta):
    trials = 40_000
    rng = np.random.default_rng(n)
    tol = 4 * math.sqrt(delta * (1 - delta) / trials)
    # independent per-point failures (Cohen certification with independent noise per point)
    failures = (rng.random((trials, n)) < alpha).sum(1) if n <= 1000 else rng.binomial(n, alpha, trials)
    q = simultaneous_asr_bound(0.5, n, alpha, delta).q
    assert np.mean(failures >= q) <= delta + tol
    # fully dependent failures (all points share one draw, as in an ensemble): the Markov form still holds
    shared = np.where(rng.random(trials) < alpha, n, 0)
    q_markov = simultaneous_asr_bound(0.5, n, alpha, delta, independent=False).q
    assert np.mean(shared >= q_markov) <= delta + tol


def test_the_binomial_form_needs_independence():
    # one shared draw for all points (failure of all n with probability alpha): the binomial quantile is
    # exceeded with probability alpha > delta, the Markov quantile with probability 0
    n, alpha, delta = 1000, 0.05, 0.01
    q = simultaneous_asr_bound(0.5, n, alpha, delta).q
    assert q < n and alpha > delta  # so P(F >= q) = alpha > delta under full dependence
    assert simultaneous_asr_bound(0.5, n, alpha, delta, independent=False).q > n


def test_ctr_docstring_points_to_the_simultaneous_bound_and_doctests_pass():
    doc = certified_trigger_robustness.__doc__
    assert "simultaneous_asr_bound" in doc
    assert "certified upper bound on the smoothed classifier's ASR" not in doc
    result = doctest.testmod(metrics_module)
    assert result.attempted >= 3 and result.failed == 0


def test_soft_radius_of_a_class_selected_from_its_own_scores_holds_at_alpha_by_monte_carlo():
    """Two classes at a near tie (true p_0 = 0.5 + tiny): the class is the argmax of the same n scores. The
    uncorrected single bound at alpha fails about twice as often as alpha; the default correction holds."""
    rng = np.random.default_rng(1)
    n, alpha, trials, p0 = 40, 0.05, 40_000, 0.5
    means = rng.binomial(n, p0, size=trials) / n  # scores in {0, 1}: the mean of class 0
    top = np.maximum(means, 1 - means)  # selected class: the larger empirical mean, true p = 0.5 for both
    h = lambda a: math.sqrt(math.log(1 / a) / (2 * n))  # noqa: E731
    fails_uncorrected = np.mean(top - h(alpha) > 0.5)
    radius = hoeffding_soft_radius(top, n, alpha, 1.0)
    fails_default = np.mean(radius > 0)  # any positive radius claims p_selected > 1/2: false here
    assert fails_default <= alpha
    assert fails_uncorrected > fails_default
