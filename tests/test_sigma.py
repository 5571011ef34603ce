"""optimize_sigma (DDRS / Cert-SSB SGA on the proxy radius): reference facts, closed forms, monotonicity,
DDRS gradients vs finite differences, Mode B against a per-sample reference loop, seeding, bounds, I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from certkit.certify.sigma import DEFAULT_STEPS, SigmaResult, optimize_sigma, proxy_radius
from certkit.errors import InputError, RecordError

PHI_INV_098 = 2.0537489106318225

# Mode B calls below choose sigma on the members' own test draws on purpose (the optimiser's maths)
pytestmark = pytest.mark.filterwarnings("ignore::certkit.certify.sigma.CertifyingDrawsWarning")


class Constant(nn.Module):
    """Ignores its input: softmax output fixed at ``probs`` (float64 logits)."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.log(torch.as_tensor(probs, dtype=torch.float64)))

    def forward(self, u):
        return self.logits.expand(u.shape[0], -1).clone()


class Ring(nn.Module):
    """Two logits ``[a - b * ||u - x0||^2, 0]``: more noise lowers the confidence (strongly, for large b)."""

    def __init__(self, x0, a=6.0, b=2.0):
        super().__init__()
        self.register_buffer("x0", torch.as_tensor(x0, dtype=torch.float64))
        self.a, self.b = a, b

    def forward(self, u):
        m = self.a - self.b * ((u.double() - self.x0) ** 2).flatten(1).sum(1)
        return torch.stack([m, torch.zeros_like(m)], 1)


def mlp(seed, d=8, c=3, hidden=6, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, c)).to(dtype)


def run(model, x, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    return optimize_sigma(model, x, **kw)


X4 = torch.rand((4, 1, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ------------------------------------------------------------------ reference facts and closed forms
@pytest.mark.parametrize("detach", [True, False])
def test_one_step_reference_facts(detach):
    # DESIGN section 9 / notes fact 20: p = 0.9 -> 1.28155e-4; clamped (p >= 0.98) -> 2.05375e-4 (largest step)
    r = run(Constant([0.9, 0.1]), X4, base_sigma=0.12, steps=1, lr=1e-4, detach_model=detach)
    step = r.sigma - 0.12
    np.testing.assert_allclose(step, 1.28155e-4, atol=1e-9)
    np.testing.assert_allclose(step, 1e-4 * 0.5 * (stats.norm.ppf(0.9) - stats.norm.ppf(0.1)), rtol=1e-9)
    r = run(Constant([0.995, 0.005]), X4, base_sigma=0.12, steps=1, lr=1e-4, detach_model=detach)
    np.testing.assert_allclose(r.sigma - 0.12, 2.05375e-4, atol=1e-9)
    np.testing.assert_allclose(r.sigma - 0.12, 1e-4 * PHI_INV_098, rtol=1e-9)


def test_trajectory_closed_form_for_a_constant_model():
    probs = [0.6, 0.3, 0.1]
    base = np.array([0.12, 0.25, 0.5, 1.0])
    k, lr = 37, 1e-3
    r = run(Constant(probs), X4, base_sigma=base, steps=k, lr=lr, record_every=5)
    g = 0.5 * (stats.norm.ppf(0.6) - stats.norm.ppf(0.3))
    np.testing.assert_allclose(r.sigma, base + k * lr * g, rtol=1e-12)
    assert r.trajectory_steps.tolist() == [0, 5, 10, 15, 20, 25, 30, 35]
    np.testing.assert_allclose(r.trajectory, base[None] + r.trajectory_steps[:, None] * lr * g, rtol=1e-12)
    np.testing.assert_allclose(r.proxy_radius, r.sigma * g, rtol=1e-12)  # sigma/2 * gap
    np.testing.assert_array_equal(r.base_sigma, base)
    assert r.steps == k and r.lr == lr and r.detach_model and len(r) == 4


def test_released_step_bound_matches_fact_18_growth():
    # K steps of the maximal step: sigma_base + K * 1e-4 * PhiInv(0.98) (released sigma files: K = 850, 1100)
    r = run(Constant([0.999, 0.001]), X4[:1], base_sigma=0.12, steps=850)
    np.testing.assert_allclose(r.sigma, 0.12 + 850 * 1e-4 * PHI_INV_098, rtol=1e-12)
    np.testing.assert_allclose(r.sigma, 0.2946, atol=1e-4)  # released one-pixel sigma0.12 maximum
    assert DEFAULT_STEPS == 1000


@pytest.mark.parametrize("probs", [[0.5, 0.5], [0.01] * 100])
def test_no_update_where_the_proxy_radius_is_zero(probs):
    # p1 == p2, or both clamped to 0.02: R = 0, and ReLU(R) gives no update in either mode
    for detach in (True, False):
        r = run(Constant(probs), X4, base_sigma=0.3, steps=3, detach_model=detach)
        np.testing.assert_array_equal(r.sigma, 0.3)
        np.testing.assert_array_equal(r.proxy_radius, 0.0)


# ------------------------------------------------------------------ monotonicity and the DDRS gradient
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), base=st.floats(0.02, 1.5), steps=st.integers(1, 6),
       draws=st.integers(1, 3), lr=st.floats(1e-4, 1e-1))
def test_detached_update_never_decreases_sigma(seed, base, steps, draws, lr):
    model = mlp(seed)
    x = torch.rand((5, 1, 2, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    r = run(model, x, base_sigma=base, steps=steps, draws=draws, lr=lr, seed=seed, record_every=1)
    d = np.diff(r.trajectory, axis=0)
    assert (d >= 0).all()
    assert (d <= lr * PHI_INV_098 * (1 + 1e-12)).all()  # the largest possible step
    np.testing.assert_array_equal(r.trajectory[-1], r.sigma)


def test_ddrs_gradient_can_decrease_sigma_and_detached_cannot():
    x0 = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    x = x0.unsqueeze(0).repeat(3, 1, 1, 1)
    kw = dict(base_sigma=0.3, steps=20, lr=1e-2, draws=8, record_every=1)
    ddrs = run(Ring(x0), x, detach_model=False, **kw)
    cert_ssb = run(Ring(x0), x, detach_model=True, **kw)
    assert (ddrs.sigma < 0.29).all() and (cert_ssb.sigma > 0.3).all()
    assert (np.diff(cert_ssb.trajectory, axis=0) >= 0).all()
    assert ddrs.proxy_radius.mean() > cert_ssb.proxy_radius.mean()  # the DDRS ascent improves the proxy
    assert ddrs.meta["method"] == "ddrs" and cert_ssb.meta["method"] == "cert-ssb-detached"


@torch.no_grad()
def _proxy(model, x, z, s, clamp=(0.02, 0.98)):
    p = torch.softmax(model(x.unsqueeze(0) + s * z.unsqueeze(0)).double(), 1)
    return float(proxy_radius(p, torch.tensor([s], dtype=torch.float64), clamp)[0])


def test_ddrs_step_equals_finite_difference_of_the_proxy():
    # Mode B, one member, fixed test draw: the proxy is a deterministic function of sigma
    model = mlp(3)
    z = torch.randn((1, 2, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = torch.rand((6, 1, 2, 4), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    base, lr, h = 0.4, 1e-6, 1e-6
    r = run([model], x, base_sigma=base, steps=1, lr=lr, detach_model=False, test_noise=[z])
    for i in range(len(x)):
        fd = (_proxy(model, x[i], z, base + h) - _proxy(model, x[i], z, base - h)) / (2 * h)
        assert fd != 0 and _proxy(model, x[i], z, base) > 0
        np.testing.assert_allclose((r.sigma[i] - base) / lr, fd, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ Mode B
def reference_mode_b(members, zs, x, base, steps, lr, detach, clamp=(0.02, 0.98)):
    """Per-sample loop over all members, written from the formula."""
    out = []
    for i in range(len(x)):
        s = torch.tensor(float(base), dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            p = sum(torch.softmax(f(x[i:i + 1] + s * z), 1) for f, z in zip(members, zs)) / len(members)
            if detach:
                p = p.detach()
            r = proxy_radius(p, s.view(1), clamp)[0]
            (g,) = torch.autograd.grad(r, s)
            with torch.no_grad():
                if r > 0:
                    s += lr * g
        out.append(float(s.detach()))
    return np.array(out)


@pytest.mark.parametrize("detach", [True, False])
def test_mode_b_with_all_members_matches_a_per_sample_reference(detach):
    members = [mlp(s) for s in range(3)]
    for f in members:
        f.requires_grad_(False)
    gen = torch.Generator().manual_seed(7)
    zs = [torch.randn((1, 2, 4), generator=gen, dtype=torch.float64) for _ in members]
    x = torch.rand((5, 1, 2, 4), generator=gen, dtype=torch.float64)
    r = run(members, x, base_sigma=0.3, steps=6, lr=0.05, draws=3, detach_model=detach, test_noise=zs)
    np.testing.assert_allclose(r.sigma, reference_mode_b(members, zs, x, 0.3, 6, 0.05, detach), rtol=1e-10)
    # seed does not matter when every member is used; batch size does not matter
    r2 = run(members, x, base_sigma=0.3, steps=6, lr=0.05, draws=99, detach_model=detach, test_noise=zs,
             seed=123, batch_size=2)
    np.testing.assert_allclose(r2.sigma, r.sigma, rtol=1e-12)


def test_mode_b_equals_mode_a_for_input_independent_members():
    m = Constant([0.7, 0.2, 0.1])
    a = run(m, X4, base_sigma=0.2, steps=9, lr=1e-3)
    b = run([m, m], X4, base_sigma=0.2, steps=9, lr=1e-3, test_noise=[torch.randn(1, 2, 2)] * 2)
    np.testing.assert_allclose(b.sigma, a.sigma, rtol=1e-13)
    np.testing.assert_allclose(b.proxy_radius, a.proxy_radius, rtol=1e-13)
    assert a.meta["mode"] == "A" and b.meta["mode"] == "B" and b.meta["members"] == 2


def test_mode_b_duplicates_scale_and_loader_are_consistent():
    f = mlp(11)
    z = torch.randn((1, 2, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = torch.rand((4, 1, 2, 4), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(base_sigma=0.25, steps=5, lr=0.05, detach_model=False)
    one = run([f], x, test_noise=[z], **kw)
    # M identical members with identical test draws: the same soft vote as one member (any draws)
    three = run([f, f, f], x, test_noise=[z, z, z], draws=2, **kw)
    np.testing.assert_allclose(three.sigma, one.sigma, rtol=1e-12)
    # test noise given at another scale (as member_test_noise returns it)
    scaled = run([f], x, test_noise=[0.7 * z], test_noise_scale=0.7, **kw)
    np.testing.assert_allclose(scaled.sigma, one.sigma, rtol=1e-12)
    # loader + n_members: each member loaded at most once
    calls = []

    def loader(m):
        calls.append(m)
        return f

    lazy = run(loader, x, test_noise=lambda m: z, n_members=1, **kw)
    np.testing.assert_allclose(lazy.sigma, one.sigma, rtol=0)
    assert calls == [0]
    # an nn.ModuleList is a list of members, not one model
    np.testing.assert_array_equal(run(nn.ModuleList([f]), x, test_noise=[z], **kw).sigma, one.sigma)


def test_mode_b_member_choice_is_seeded():
    members = [mlp(s) for s in range(4)]
    gen = torch.Generator().manual_seed(9)
    zs = [torch.randn((1, 2, 4), generator=gen, dtype=torch.float64) for _ in members]
    x = torch.rand((3, 1, 2, 4), generator=gen, dtype=torch.float64)
    kw = dict(base_sigma=0.3, steps=8, lr=0.05, draws=1, test_noise=zs)
    a, b, c = run(members, x, seed=1, **kw), run(members, x, seed=1, **kw), run(members, x, seed=2, **kw)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    assert not np.allclose(a.sigma, c.sigma)


# ------------------------------------------------------------------ Mode A seeding
def test_mode_a_is_seeded_and_independent_of_batching_order_and_length():
    model = mlp(4)
    x = torch.rand((7, 1, 2, 4), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(base_sigma=0.3, steps=20, lr=0.05, draws=2, detach_model=False, record_every=1)
    a = run(model, x, seed=5, **kw)
    np.testing.assert_array_equal(run(model, x, seed=5, batch_size=3, **kw).sigma, a.sigma)
    assert not np.allclose(run(model, x, seed=6, **kw).sigma, a.sigma)
    # a subset with its ids reproduces the full run's rows; a shorter run is a prefix
    sub = run(model, x[[5, 1]], ids=[5, 1], seed=5, **kw)
    np.testing.assert_array_equal(sub.sigma, a.sigma[[5, 1]])
    short = run(model, x, seed=5, **{**kw, "steps": 13})
    np.testing.assert_array_equal(short.trajectory, a.trajectory[:14])
    np.testing.assert_array_equal(a.index, np.arange(7))


def test_model_state_is_restored_and_parameters_untouched():
    model = mlp(8).train()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.rand((3, 1, 2, 4), dtype=torch.float64)
    run(model, x, base_sigma=0.2, steps=4, lr=0.1, detach_model=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


def test_float32_model_on_digits_shaped_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    x = torch.rand(5, 1, 8, 8)
    r = run(model, x, base_sigma=torch.full((5,), 0.12), steps=10, draws=3)
    assert r.sigma.dtype == np.float64 and (r.sigma >= 0.12).all() and np.isfinite(r.proxy_radius).all()
    assert r.meta["num_classes"] == 10


# ------------------------------------------------------------------ bounds
def test_sigma_bounds_are_respected():
    up = run(Constant([0.99, 0.01]), X4, base_sigma=0.2, steps=50, sigma_max=0.201, record_every=1)
    np.testing.assert_array_equal(up.sigma, 0.201)
    assert up.trajectory.max() <= 0.201
    x0 = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    down = run(Ring(x0), x0.unsqueeze(0).repeat(2, 1, 1, 1), base_sigma=0.3, steps=40, lr=1e-2, draws=8,
               detach_model=False, sigma_min=0.28, record_every=1)
    assert down.trajectory.min() >= 0.28 and (down.sigma == 0.28).any()
    # base sigmas outside the bounds are projected into them first
    clipped = run(Constant([0.5, 0.5]), X4, base_sigma=[0.1, 0.2, 0.3, 0.4], steps=1, sigma_min=0.15,
                  sigma_max=0.35)
    np.testing.assert_array_equal(clipped.base_sigma, [0.15, 0.2, 0.3, 0.35])
    np.testing.assert_array_equal(clipped.sigma, clipped.base_sigma)


# ------------------------------------------------------------------ input errors
M0 = Constant([0.9, 0.1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-4), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(steps=0), "steps"), (dict(draws=0), "draws"),
    (dict(clamp=(0.5, 0.5)), "clamp"), (dict(clamp=(0.0, 0.9)), "clamp"), (dict(clamp=(0.1, 1.0)), "clamp"),
    (dict(clamp=0.1), "clamp"),
    (dict(base_sigma=0.0), "base_sigma"), (dict(base_sigma=-0.1), "base_sigma"),
    (dict(base_sigma=float("inf")), "base_sigma"), (dict(base_sigma=[0.1, 0.2]), "base_sigma"),
    (dict(sigma_min=0.5, sigma_max=0.2), "sigma_min"), (dict(sigma_min=-1.0), "sigma_min"),
    (dict(sigma_max=float("nan")), "sigma_max"),
    (dict(num_classes=1), "num_classes"), (dict(batch_size=0), "batch_size"),
    (dict(record_every=-1), "record_every"), (dict(ids=[0.5, 1, 2, 3]), "ids"),
    (dict(test_noise=[torch.zeros(1, 2, 2)]), "test_noise"), (dict(n_members=2), "n_members"),
    (dict(device="tpu"), "device"), (dict(seed=0.5), "seed"),
])
def test_bad_arguments_raise_input_errors(kwargs, match):
    kw = {"base_sigma": 0.1, **kwargs}
    with pytest.raises(InputError, match=match):
        run(M0, X4, **kw)


def test_bad_inputs_and_outputs_raise_input_errors():
    with pytest.raises(InputError, match="x"):
        run(M0, X4.clone().fill_(float("nan")), base_sigma=0.1)
    with pytest.raises(InputError, match="x must have shape"):
        run(M0, torch.rand(4), base_sigma=0.1)
    with pytest.raises(InputError, match="x must be"):
        run(M0, [[0.1, 0.2]], base_sigma=0.1)
    with pytest.raises(InputError, match="num_classes"):
        run(M0, X4, base_sigma=0.1, num_classes=3)  # output has 2 columns
    with pytest.raises(InputError, match="at least 2 classes"):
        run(Constant([1.0]), X4, base_sigma=0.1)
    with pytest.raises(InputError, match="NaN"):
        run(Constant([float("nan"), 0.5]), X4, base_sigma=0.1)

    class Flat(nn.Module):
        def forward(self, u):
            return u.flatten()

    with pytest.raises(InputError, match="output must have shape"):
        run(Flat(), X4, base_sigma=0.1)
    # Mode B problems
    z = torch.zeros(1, 2, 2)
    with pytest.raises(InputError, match="test_noise is required"):
        run([M0], X4, base_sigma=0.1)
    with pytest.raises(InputError, match="test-noise tensors"):
        run([M0, M0], X4, base_sigma=0.1, test_noise=[z])
    with pytest.raises(InputError, match="shape"):
        run([M0], X4, base_sigma=0.1, test_noise=[torch.zeros(2, 2)])
    with pytest.raises(InputError, match="finite"):
        run([M0], X4, base_sigma=0.1, test_noise=[z + float("inf")])
    with pytest.raises(InputError, match="n_members is required"):
        run(lambda m: M0, X4, base_sigma=0.1, test_noise=[z])
    with pytest.raises(InputError, match="at least one"):
        run([], X4, base_sigma=0.1, test_noise=[])
    with pytest.raises(InputError, match="n_members"):
        run([M0], X4, base_sigma=0.1, test_noise=[z], n_members=2)
    with pytest.raises(InputError, match="test_noise_scale"):
        run([M0], X4, base_sigma=0.1, test_noise=[z], test_noise_scale=0)
    with pytest.raises(InputError, match="nn.Module"):
        run([M0, "model"], X4, base_sigma=0.1, test_noise=[z, z])
    with pytest.raises(InputError, match="model_or_members"):
        run(3, X4, base_sigma=0.1)


# ------------------------------------------------------------------ result I/O
def test_result_save_load_and_dict(tmp_path):
    r = run(Constant([0.8, 0.2]), X4, base_sigma=[0.1, 0.2, 0.3, 0.4], steps=7, record_every=3)
    path = r.save(tmp_path / "sub" / "sigma.npz")
    back = SigmaResult.load(path)
    for name in ("sigma", "base_sigma", "proxy_radius", "index", "trajectory", "trajectory_steps"):
        np.testing.assert_array_equal(getattr(back, name), getattr(r, name))
    assert (back.steps, back.lr, back.detach_model, back.meta) == (r.steps, r.lr, r.detach_model,
                                                                    json.loads(json.dumps(r.meta)))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["steps"] == 7 and len(d["sigma"]) == 4 and d["trajectory_steps"] == [0, 3, 6]
    # without a trajectory
    r2 = run(Constant([0.8, 0.2]), X4, base_sigma=0.1, steps=2)
    assert SigmaResult.load(r2.save(tmp_path / "b.npz")).trajectory is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(RecordError):
        SigmaResult.load(tmp_path / "bad.npz")
    with pytest.raises(RecordError, match="does not exist"):
        SigmaResult.load(tmp_path / "missing.npz")


def test_empty_input_gives_an_empty_result():
    r = run(M0, torch.zeros((0, 1, 2, 2)), base_sigma=0.1, steps=3)
    assert len(r) == 0 and r.proxy_radius.shape == (0,)


def test_optimising_on_the_members_test_draws_warns_that_certificates_would_reuse_them():
    from certkit.certify.sigma import CertifyingDrawsWarning

    f = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(CertifyingDrawsWarning, match="same draws whose votes a certificate then bounds"):
        optimize_sigma([f], torch.rand(2, 1, 2, 2), base_sigma=0.3, steps=1, test_noise=[torch.randn(1, 2, 2)],
                       device="cpu", progress=False)
