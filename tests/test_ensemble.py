"""SmoothedEnsemble / certify_votes (Mode B): closed forms, reference facts, selection soundness, votes I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from certkit.certify.ensemble import EnsembleVotes, SmoothedEnsemble, certify_votes, joint_trigger_norms
from certkit.errors import InputError, RecordError, UnknownNameError


def votes_from_counts(counts: np.ndarray, soft: np.ndarray | None = None) -> EnsembleVotes:
    """EnsembleVotes whose members vote so that the class counts per point are ``counts`` ([N, C])."""
    n, c = counts.shape
    m = int(counts.sum(1)[0])
    preds = np.stack([np.repeat(np.arange(c), row) for row in counts], axis=1)
    soft_sum = counts.astype(float) if soft is None else soft * m
    return EnsembleVotes(predictions=preds, soft_sum=soft_sum, num_classes=c)


def test_unanimous_votes_give_the_closed_form_radius():
    # all M votes for one class: pA_low = (alpha/(2C))^(1/M) (C lower and C upper bounds, C >= 3) and
    # pB_up = 1 - pA_low, R = sigma * PhiInv(pA_low)
    m, c, alpha, sigma = 200, 4, 1e-3, 0.5
    counts = np.zeros((3, c), dtype=int)
    counts[:, 2] = m
    res = certify_votes(votes_from_counts(counts), [2, 2, 1], sigma=sigma, alpha=alpha)
    p = (alpha / (2 * c)) ** (1 / m)
    np.testing.assert_allclose(res.p_lower, p, rtol=1e-13)
    np.testing.assert_allclose(res.radius, sigma * stats.norm.ppf(p), rtol=1e-12)
    assert res.prediction.tolist() == [2, 2, 2] and res.correct.tolist() == [True, True, False]
    # without the selection correction each bound is taken at alpha
    res2 = certify_votes(votes_from_counts(counts), sigma=sigma, alpha=alpha, selection_correction=False)
    np.testing.assert_allclose(res2.p_lower, alpha ** (1 / m), rtol=1e-13)


@pytest.mark.parametrize("p_a, expected", [(0.95, 1.23310), (0.99, 1.48502), (0.70, 0.36175), (1.0, 1.5651856)])
def test_released_rab_evaluator_numbers_with_hoeffding_and_no_correction(p_a, expected):
    # docs/design.md section 9: N = 1000, alpha = 1e-3, two classes, mean soft score pA
    counts = np.array([[1000, 0]])
    soft = np.array([[p_a, 1 - p_a]])
    res = certify_votes(votes_from_counts(counts, soft), sigma=1.0, alpha=1e-3, bound="hoeffding",
                        selection_correction=False)
    assert res.radius[0] == pytest.approx(expected, abs=5e-6)


def test_hoeffding_uses_the_number_of_members_from_the_data():
    # the released code hard-codes N = 1000; with 200 members the largest radius is 1.1197364 sigma
    counts = np.array([[200, 0]])
    res = certify_votes(votes_from_counts(counts, np.array([[1.0, 0.0]])), sigma=1.0, alpha=1e-3,
                        bound="hoeffding", selection_correction=False)
    assert res.radius[0] == pytest.approx(1.1197364, abs=5e-7)


def test_two_bounds_beat_the_binary_bound_when_votes_spread_over_classes():
    counts = np.array([[70, 10, 10, 10]])
    two = certify_votes(votes_from_counts(counts), sigma=1.0, alpha=1e-3)
    p_a = two.p_lower[0]
    assert two.radius[0] > stats.norm.ppf(p_a)  # 1 - pA_low would be looser than the runner-up's bound


@pytest.mark.parametrize("bound", ["clopper-pearson", "hoeffding"])
def test_selection_correction_keeps_coverage_when_classes_tie(bound):
    # worst case for choosing the class from the same votes: two classes with p = 1/2 each. A certificate is
    # wrong when the data-chosen class gets pA_low > its true probability 1/2, i.e. whenever it certifies.
    rng = np.random.default_rng(0)
    m, alpha, trials = 101, 0.05, 20_000
    k = rng.binomial(m, 0.5, size=trials)
    counts = np.stack([k, m - k], axis=1)
    soft = counts / m
    votes = votes_from_counts(counts, soft)
    corrected = certify_votes(votes, sigma=1.0, alpha=alpha, bound=bound)
    wrong = np.mean(corrected.prediction >= 0)
    assert wrong <= alpha + 3 * np.sqrt(alpha / trials)
    if bound == "clopper-pearson":  # without it, both classes' tails add up: about 2 * alpha
        naive = certify_votes(votes, sigma=1.0, alpha=alpha, bound=bound, selection_correction=False)
        assert np.mean(naive.prediction >= 0) > alpha


class Shift(nn.Module):
    """Class 0 iff the first pixel exceeds ``t`` (a 'member' with its own threshold)."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x):
        s = (x.flatten(1)[:, 0] - self.t) * 10
        return torch.stack([s, -s], 1)


def test_votes_are_collected_member_by_member_with_each_members_test_noise():
    x = torch.tensor([[[[0.2, 0.0]]], [[[0.8, 0.0]]]])
    members = [Shift(0.5), Shift(0.5), Shift(0.1)]
    noise = [torch.zeros(1, 1, 2), torch.tensor([[[0.5, 0.0]]]), torch.zeros(1, 1, 2)]
    ens = SmoothedEnsemble(members, 2, sigma=0.5, test_noise=noise, device="cpu", progress=False, batch_size=1)
    v = ens.votes(x)
    # point 0 (0.2): member0 -> 1, member1 sees 0.7 -> 0, member2 (t=0.1) -> 0
    assert v.predictions[:, 0].tolist() == [1, 0, 0]
    assert v.predictions[:, 1].tolist() == [0, 0, 0]
    assert v.counts().tolist() == [[2, 1], [3, 0]]
    np.testing.assert_allclose(v.soft_sum.sum(1), 3.0)
    res = ens.certify(x, torch.tensor([0, 0]), alpha=0.1, votes=v)
    assert res.meta["members"] == 3 and len(res) == 2
    # a loader callable gives the same votes
    lazy = SmoothedEnsemble(members.__getitem__, 2, 0.5, noise.__getitem__, n_members=3, device="cpu", progress=False)
    assert np.array_equal(lazy.votes(x).predictions, v.predictions)


def test_votes_file_round_trip_and_corruption(tmp_path):
    counts = np.array([[5, 3, 2], [0, 10, 0]])
    v = votes_from_counts(counts)
    v.meta = {"test_sha256": "abc", "sigma": 0.5}
    path = v.save(tmp_path / "votes.npz")
    back = EnsembleVotes.load(path)
    assert np.array_equal(back.predictions, v.predictions) and np.array_equal(back.soft_sum, v.soft_sum)
    assert back.meta == v.meta
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(RecordError, match="corrupt"):
        EnsembleVotes.load(path)
    with pytest.raises(RecordError, match="does not exist"):
        EnsembleVotes.load(tmp_path / "missing.npz")


def test_joint_trigger_norm_is_sqrt_r_plus_one_times_the_norm_for_constant_triggers():
    r, t = 25, 0.2
    np.testing.assert_allclose(joint_trigger_norms(r * t**2, np.full(4, t)), np.sqrt(r + 1) * t)


def test_bad_input():
    v = votes_from_counts(np.array([[3, 1]]))
    with pytest.raises(InputError, match="alpha"):
        certify_votes(v, sigma=1.0, alpha=1.0)
    with pytest.raises(UnknownNameError, match="bound"):
        certify_votes(v, sigma=1.0, bound="bernstein")
    with pytest.raises(InputError, match="sigma"):
        certify_votes(v, sigma=0.0)
    with pytest.raises(InputError, match="labels outside"):
        certify_votes(v, [2], sigma=1.0)
    with pytest.raises(InputError, match="class indices"):
        EnsembleVotes(predictions=np.array([[3]]), soft_sum=np.zeros((1, 2)), num_classes=2)
    with pytest.raises(InputError, match="test-noise"):
        SmoothedEnsemble([Shift(0.1)], 2, 0.5, [torch.zeros(1, 1, 2)] * 2)
    ens = SmoothedEnsemble([Shift(0.1)], 2, 0.5, [torch.zeros(1, 1, 3)], device="cpu", progress=False)
    with pytest.raises(InputError, match="test noise has shape"):
        ens.votes(torch.zeros(2, 1, 1, 2))
    with pytest.raises(InputError, match="NaN"):
        ens.votes(torch.full((2, 1, 1, 3), float("nan")))

    class Bad(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("inf"))

    with pytest.raises(InputError, match="member 0 produced NaN or inf"):
        SmoothedEnsemble([Bad()], 2, 0.5, [torch.zeros(1, 1, 2)], device="cpu", progress=False).votes(torch.zeros(1, 1, 1, 2))
    with pytest.raises(InputError, match="joint|poison"):
        joint_trigger_norms(-1.0, [0.1])
