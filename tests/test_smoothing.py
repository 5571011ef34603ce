"""RandomizedSmoothing (Cohen et al. 2019): exactness on closed forms, soundness, reproducibility, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from certkit import RandomizedSmoothing
from certkit.errors import InputError


class ConstantModel(nn.Module):
    """Always predicts ``cls``."""

    def __init__(self, num_classes: int = 3, cls: int = 1):
        super().__init__()
        self.num_classes, self.cls = num_classes, cls

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.num_classes)
        out[:, self.cls] = 1.0
        return out


class HalfSpace(nn.Module):
    """Two-class linear classifier: class 0 iff ``w.x + b > 0``."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w.flatten(), b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([s, -s], dim=1)

    def distance(self, x):
        return ((x.flatten(1) @ self.w + self.b).abs() / self.w.norm()).numpy()


def half_space(dim: int = 16, seed: int = 0) -> HalfSpace:
    g = torch.Generator().manual_seed(seed)
    return HalfSpace(torch.randn(dim, generator=g), b=-0.3)


def points(n: int, dim: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 4, dim // 4, generator=torch.Generator().manual_seed(seed))


def test_constant_model_gives_the_closed_form_radius():
    # all n votes for the top class: p_lower = alpha ** (1/n) and R = sigma * PhiInv(p_lower)
    smoother = RandomizedSmoothing(ConstantModel(), 3, 0.25, progress=False)
    res = smoother.certify(torch.rand(5, 1, 3, 3), torch.tensor([1, 1, 0, 1, 2]), n0=10, n=100_000, alpha=0.001)
    assert (res.prediction == 1).all()
    np.testing.assert_allclose(res.p_lower, 0.9999309248330094, rtol=0, atol=1e-15)
    np.testing.assert_allclose(res.radius, 0.25 * 3.8114565633899145, rtol=1e-12)
    np.testing.assert_array_equal(res.correct, [True, True, False, True, False])


def test_same_seed_same_result_independent_of_batch_size_and_order():
    model, x = half_space(), points(12)
    y = torch.as_tensor(model(x).argmax(1))
    kw = dict(n0=50, n=700, alpha=0.01)
    a = RandomizedSmoothing(model, 2, 0.5, batch_size=1000, seed=3, noise_block=256, progress=False).certify(x, y, **kw)
    b = RandomizedSmoothing(model, 2, 0.5, batch_size=37, seed=3, noise_block=256, progress=False).certify(x, y, **kw)
    np.testing.assert_array_equal(a.p_lower, b.p_lower)
    np.testing.assert_array_equal(a.radius, b.radius)
    # a reversed subset with its ids reproduces the same rows
    sel = torch.tensor([9, 4, 0])
    c = RandomizedSmoothing(model, 2, 0.5, batch_size=5, seed=3, noise_block=256, progress=False).certify(
        x[sel], y[sel], ids=sel, **kw)
    np.testing.assert_array_equal(c.radius, a.radius[sel.numpy()])
    # another seed gives different draws
    d = RandomizedSmoothing(model, 2, 0.5, seed=4, noise_block=256, progress=False).certify(x, y, **kw)
    assert not np.array_equal(d.p_lower, a.p_lower)


def test_vote_frequencies_follow_the_gaussian_at_each_points_own_sigma():
    # for a half-space, P(class 0 under noise) = Phi((w.x + b) / (sigma ||w||)) exactly
    model = half_space()
    x = points(6)
    sigma = torch.tensor([0.1, 0.2, 0.4, 0.8, 0.3, 0.6])
    n = 20_000
    counts = RandomizedSmoothing(model, 2, sigma, progress=False).counts(x, n)
    margin = (x.flatten(1) @ model.w + model.b).numpy() / model.w.norm().item()
    p0 = stats.norm.cdf(margin / sigma.numpy())
    z = (counts[:, 0] - n * p0) / np.sqrt(n * p0 * (1 - p0) + 1e-12)
    assert np.all(np.abs(z) < 4.5), z
    assert (counts.sum(1) == n).all()


def test_certified_radius_is_sound_and_tight_for_a_linear_classifier():
    # the exact smoothed radius of a half-space is the distance to it (docs/design.md section 9)
    model = half_space(seed=2)
    x = points(120, seed=5)
    true = model.distance(x)
    y = model(x).argmax(1)
    res = RandomizedSmoothing(model, 2, 0.5, progress=False).certify(x, y, n0=100, n=5000, alpha=0.001)
    certified = res.prediction >= 0
    assert certified.sum() > 60
    assert np.all(res.radius[certified] < true[certified])  # each fails w.p. <= alpha: none expected here
    assert np.all(res.correct[certified])  # a half-space's smoothed class is its own class
    tight = RandomizedSmoothing(model, 2, 0.5, progress=False).certify(x[:10], y[:10], n0=100, n=100_000, alpha=0.001)
    ok = (tight.prediction >= 0) & (true[:10] < 1.5)
    assert ok.sum() >= 3
    assert np.all(tight.radius[ok] > 0.9 * true[:10][ok])
    assert np.all(tight.radius[ok] >= res.radius[:10][ok] - 1e-12)


def test_predict_abstains_at_n10_and_answers_at_n11():
    # binomtest(10, 10, 0.5) = 0.00195 > 0.001 (always abstains); (11, 11) = 0.00098 < 0.001
    x = torch.rand(3, 1, 2, 2)
    s = RandomizedSmoothing(ConstantModel(4, 2), 4, 0.5, progress=False)
    p10 = s.predict(x, n=10, alpha=0.001)
    p11 = s.predict(x, n=11, alpha=0.001)
    assert (p10.prediction == -1).all()
    np.testing.assert_allclose(p10.pvalue, 0.001953125, rtol=1e-12)
    assert (p11.prediction == 2).all()
    np.testing.assert_allclose(p11.pvalue, 0.0009765625, rtol=1e-12)


def test_predict_pvalue_matches_scipy_binomtest():
    model = half_space()
    x = points(8)
    out = RandomizedSmoothing(model, 2, 1.0, progress=False).predict(x, n=200, alpha=0.05)
    for counts, pv in zip(out.counts, out.pvalue):
        top = np.sort(counts)[::-1]
        assert pv == pytest.approx(stats.binomtest(int(top[0]), int(top[0] + top[1]), 0.5).pvalue, rel=1e-10)


def test_abstains_near_the_boundary():
    model = HalfSpace(torch.tensor([1.0, 0.0, 0.0, 0.0]), b=-0.5)
    x = torch.tensor([[[[0.5, 0.3], [0.2, 0.9]]]])  # exactly on the hyperplane: p = 1/2
    res = RandomizedSmoothing(model, 2, 0.5, progress=False).certify(x, torch.tensor([0]), n0=50, n=2000)
    assert res.prediction[0] == -1 and res.radius[0] == 0.0 and not res.correct[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"), ({"alpha": float("nan")}, "alpha"),
     ({"n": 0}, "n must"), ({"n0": -1}, "n0")],
)
def test_bad_certify_arguments(kwargs, match):
    s = RandomizedSmoothing(ConstantModel(), 3, 0.5, progress=False)
    with pytest.raises(InputError, match=match):
        s.certify(torch.rand(2, 1, 2, 2), **kwargs)


def test_bad_inputs_are_named():
    s = RandomizedSmoothing(ConstantModel(), 3, 0.5, progress=False)
    with pytest.raises(InputError, match="sigma"):
        RandomizedSmoothing(ConstantModel(), 3, -0.1)
    with pytest.raises(InputError, match="sigma"):
        RandomizedSmoothing(ConstantModel(), 3, torch.tensor([0.1, float("nan")]))
    with pytest.raises(InputError, match="NaN"):
        s.certify(torch.full((2, 1, 2, 2), float("nan")))
    with pytest.raises(InputError, match="floating"):
        s.certify(torch.zeros(2, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(InputError, match=r"y must have shape \[2\]"):
        s.certify(torch.rand(2, 1, 2, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(InputError, match="outside"):
        s.certify(torch.rand(2, 1, 2, 2), torch.tensor([0, 3]))
    with pytest.raises(InputError, match="3 per-sample"):
        RandomizedSmoothing(ConstantModel(), 3, torch.tensor([0.1, 0.2, 0.3]), progress=False).certify(torch.rand(2, 1, 2, 2))
    with pytest.raises(InputError, match="num_classes=5"):
        RandomizedSmoothing(ConstantModel(3), 5, 0.5, progress=False).certify(torch.rand(2, 1, 2, 2))
    with pytest.raises(InputError, match="num_classes"):
        RandomizedSmoothing(ConstantModel(), 1, 0.5)


def test_model_producing_nan_is_reported():
    class NaNModel(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    with pytest.raises(InputError, match="NaN or inf"):
        RandomizedSmoothing(NaNModel(), 2, 0.5, progress=False).certify(torch.rand(1, 1, 2, 2), n0=5, n=5)


def test_model_training_flag_is_restored():
    model = half_space()
    model.train()
    RandomizedSmoothing(model, 2, 0.5, progress=False).certify(points(2), n0=5, n=10)
    assert model.training
