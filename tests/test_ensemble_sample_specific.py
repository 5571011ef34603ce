"""Sample-specific noise in Mode B (Cert-SSB; docs/design.md section 3): per-sample training scales fixed per run,
per-point test sigmas that both sample the noise and scale the radius, and the three reported quantities
(radius in test-sigma units, plain joint l2 radius, weighted attack condition)."""

from __future__ import annotations

import json
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from certkit.backdoor.training import train_model
from certkit.certify.ensemble import (
    EnsembleVotes,
    SmoothedEnsemble,
    attack_covered,
    certify_votes,
    joint_l2_radius,
    joint_trigger_norms,
    poison_weighted_sq_sum,
    vote_gap,
    weighted_joint_norms,
)
from certkit.certify.metrics import certified_trigger_robustness
from certkit.errors import CertkitError, InputError, RecordError
from certkit.runs import ensemble_certify, ensemble_train
from certkit.runs.ensemble_train import (
    NOISE_MODES,
    REFERENCE_MODEL,
    SAMPLE_SPECIFIC_ASSUMPTION,
    TRAINING_SIGMAS,
    EnsembleSpec,
    check_scales,
    ensure_training_scales,
    load_training_scales,
    member_name,
    member_train_noise,
    prepare_data,
    train_ensemble,
    train_member,
)
from certkit.runs.rundir import RunDirectory
from certkit.seeding import STREAM_MEMBER_INIT, derive_seed

# tiny settings: digits, 3 members, 1 epoch, a non-dyadic sigma (so "equal scales" is a real float check)
BASE = dict(members=3, epochs=1, poison_rate=0.05, sigma=0.3, seed=3)
SS = dict(BASE, noise="sample-specific", sigma_steps=2)


class FakeSigma:
    """Stand-in for certkit.certify.sigma.optimize_sigma: ``fn(n, base_sigma) -> sigma [n]``; counts its calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[dict] = []

    def __call__(self, model, x, *, base_sigma, steps, lr, detach_model=True, seed=0, **kwargs):
        assert isinstance(model, nn.Module) and not model.training
        self.calls.append(
            {
                "n": int(x.shape[0]),
                "base_sigma": base_sigma,
                "steps": steps,
                "lr": lr,
                "detach_model": detach_model,
                "seed": seed,
                **kwargs,
            }
        )
        return types.SimpleNamespace(sigma=np.asarray(self.fn(int(x.shape[0]), base_sigma), dtype=np.float64))


@pytest.fixture
def fake_sigma(monkeypatch):
    """Install a stand-in optimiser where the ensemble runs call ``optimize_sigma``."""

    def install(fn):
        fake = FakeSigma(fn)
        for module in (ensemble_train, ensemble_certify):
            if hasattr(module, "optimize_sigma"):
                monkeypatch.setattr(module, "optimize_sigma", fake)
        return fake

    return install


def _varied(n: int, base: float) -> np.ndarray:
    return base + 0.05 * (np.arange(n) % 4)


def _states(run: RunDirectory, members: int) -> list[dict[str, torch.Tensor]]:
    return [run.load_state_dict(member_name(m)) for m in range(members)]


def _assert_identical(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for m, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"member {m}, tensor {k} differs"


# ----------------------------------------------------------------------------------------------------------
# spec and noise


def test_spec_sample_specific_fields_roundtrip_and_fixed_configs_are_unchanged():
    assert NOISE_MODES == ("fixed", "sample-specific")
    spec = EnsembleSpec(**SS)
    assert spec.sample_specific and spec.sigma_steps == 2 and spec.sigma_lr == 1e-4
    assert spec.sigma_max is None and spec.sigma_detach_model is True
    d = spec.to_dict()
    assert d["sigma_steps"] == 2 and EnsembleSpec.from_dict(json.loads(json.dumps(d))) == spec
    fixed = EnsembleSpec(**BASE)
    assert not any(k.startswith("sigma_") for k in fixed.to_dict())  # old run configs still match
    assert EnsembleSpec.from_dict(fixed.to_dict()) == fixed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise": "sample-specific"}, "needs sigma_steps"),
        ({**SS, "sigma_steps": 0}, "sigma_steps"),
        ({**SS, "sigma_steps": 1.5}, "sigma_steps"),
        ({**SS, "sigma_lr": 0.0}, "sigma_lr"),
        ({**SS, "sigma_lr": float("nan")}, "sigma_lr"),
        ({**SS, "sigma_lr": float("inf")}, "sigma_lr"),
        ({**SS, "sigma_max": 0.2}, "sigma_max"),  # below sigma = 0.3
        ({**SS, "sigma_max": float("inf")}, "sigma_max"),
        ({**SS, "sigma_detach_model": "yes"}, "sigma_detach_model"),
        ({**BASE, "sigma_steps": 10}, "only apply to noise='sample-specific'"),
        ({**BASE, "sigma_max": 1.0}, "only apply"),
    ],
)
def test_spec_rejects_bad_sigma_fields(kwargs, match):
    with pytest.raises(InputError, match=match):
        EnsembleSpec(**kwargs)


def test_member_train_noise_scales_each_row_of_the_same_draw():
    spec = EnsembleSpec(**SS)
    shape = (50, 1, 8, 8)
    rab = member_train_noise(EnsembleSpec(**BASE), 1, shape)
    assert torch.equal(member_train_noise(spec, 1, shape, scales=np.full(50, 0.3)), rab)  # bit for bit
    s = _varied(50, 0.3)
    noise = member_train_noise(spec, 1, shape, scales=s)
    unit = member_train_noise(EnsembleSpec(**{**BASE, "sigma": 1.0}), 1, shape)
    assert torch.equal(noise, unit * torch.tensor(s, dtype=torch.float32).view(-1, 1, 1, 1))
    for bad, match in [
        (np.full(49, 0.3), "49 values"),
        (np.array([0.3] * 49 + [np.nan]), "NaN"),
        (np.array([0.3] * 49 + [np.inf]), "NaN or inf"),
        (np.array([0.3] * 49 + [0.0]), "strictly positive"),
        (np.array([0.3] * 49 + [-0.1]), "strictly positive"),
        (np.full((50, 1), 0.3), "1-D"),
        ("abc", "must be positive numbers"),
    ]:
        with pytest.raises(InputError, match=match):
            member_train_noise(spec, 1, shape, scales=bad)
    assert check_scales(torch.full((3,), 0.5)).dtype == np.float64


# ----------------------------------------------------------------------------------------------------------
# training scales


def test_equal_scales_reproduce_the_fixed_noise_members_bit_for_bit(fake_sigma, tmp_path):
    fake = fake_sigma(lambda n, base: np.full(n, base))
    ss = train_ensemble(EnsembleSpec(**SS), tmp_path / "ss", progress=False)
    rab = train_ensemble(EnsembleSpec(**BASE), tmp_path / "rab", progress=False)
    _assert_identical(_states(ss, 3), _states(rab, 3))
    assert len(fake.calls) == 1 and fake.calls[0]["n"] == 1257 and fake.calls[0]["base_sigma"] == 0.3
    assert ss.has_model(REFERENCE_MODEL) and not rab.has_model(REFERENCE_MODEL)
    assert TRAINING_SIGMAS not in rab.manifest["files"]


def test_members_train_on_their_draw_times_the_run_scales(fake_sigma, tmp_path):
    fake_sigma(_varied)
    spec = EnsembleSpec(**SS)
    run = train_ensemble(spec, tmp_path / "run", progress=False)
    scales = load_training_scales(run)
    np.testing.assert_array_equal(scales, _varied(1257, 0.3))
    data = prepare_data(spec)
    seed = derive_seed(spec.seed, STREAM_MEMBER_INIT, 2)
    torch.manual_seed(seed)
    from certkit.backdoor.models import build_model

    model = build_model(
        "digits-cnn", num_classes=10, input_shape=(1, 8, 8), mean=data.splits.mean, std=data.splits.std
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_model(
            model,
            data.train,
            epochs=1,
            lr=spec.lr,
            batch_size=spec.batch_size,
            seed=seed,
            fixed_noise=member_train_noise(spec, 2, data.train.x.shape, scales=scales),
            device="cpu",
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    _assert_identical([model.state_dict()], [run.load_state_dict(member_name(2))])


def test_training_scales_are_computed_once_reused_on_resume_and_verified(fake_sigma, tmp_path):
    fake = fake_sigma(_varied)
    spec = EnsembleSpec(**SS)
    out = tmp_path / "run"
    # one member first (direct call: computes the scales), then the rest: no second SGA
    rec = train_member(spec, 0, out)
    assert rec["trained"] and len(fake.calls) == 1
    run = train_ensemble(spec, out, progress=False)
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert (call["steps"], call["lr"], call["detach_model"]) == (2, 1e-4, True)
    m = run.manifest
    assert m["steps"]["training_sigmas"]["done"] and TRAINING_SIGMAS in m["files"]
    assert m["steps"][f"train/{REFERENCE_MODEL}"]["done"] and run.verify() == []
    before = _states(run, 3)
    mtime = run.file(TRAINING_SIGMAS).stat().st_mtime_ns
    # a lost member is retrained with the stored scales: same weights, still one SGA
    run.file(f"models/{member_name(1)}.pt").unlink()
    with pytest.warns(RuntimeWarning, match="retraining 1 corrupt"):
        again = train_ensemble(spec, out, progress=False)
    assert len(fake.calls) == 1 and again.file(TRAINING_SIGMAS).stat().st_mtime_ns == mtime
    _assert_identical(_states(again, 3), before)
    np.testing.assert_array_equal(ensure_training_scales(spec, out), load_training_scales(out))

    # tampering: a recorded scales file that fails verification is an error, never silently recomputed
    for corrupt in ("flip", "delete"):
        copy = tmp_path / f"copy-{corrupt}"
        shutil.copytree(out, copy)
        path = copy / TRAINING_SIGMAS
        if corrupt == "flip":
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
        else:
            path.unlink()
        (copy / "models" / f"{member_name(2)}.pt").unlink()
        with pytest.raises(RecordError, match=TRAINING_SIGMAS):
            train_ensemble(spec, copy, progress=False, retrain_corrupt=True)
        with pytest.raises(RecordError, match=TRAINING_SIGMAS):
            load_training_scales(copy)
        with pytest.raises(RecordError, match=TRAINING_SIGMAS):
            train_member(spec, 2, copy)
    assert len(fake.calls) == 1


def test_scales_file_inconsistent_with_the_run_is_refused(fake_sigma, tmp_path):
    fake_sigma(_varied)
    spec = EnsembleSpec(**SS)
    run = train_ensemble(spec, tmp_path / "a", progress=False)
    other = train_ensemble(EnsembleSpec(**{**SS, "sigma_steps": 3}), tmp_path / "b", progress=False)
    # a scales file of another run, re-recorded so that its hash matches: the meta check catches it
    shutil.copy(other.file(TRAINING_SIGMAS), run.file(TRAINING_SIGMAS))
    run.record_file(TRAINING_SIGMAS)
    with pytest.raises(RecordError, match="steps"):
        load_training_scales(run.path)


def test_a_bad_optimiser_result_and_a_missing_reference_are_errors(fake_sigma, tmp_path):
    fake_sigma(lambda n, base: np.full(n, np.nan))
    with pytest.raises(CertkitError, match="unusable sigmas"):
        train_ensemble(EnsembleSpec(**SS), tmp_path / "nan", progress=False)
    fake_sigma(lambda n, base: np.full(n - 1, base))
    with pytest.raises(CertkitError, match="unusable sigmas"):
        train_ensemble(EnsembleSpec(**SS), tmp_path / "short", progress=False)
    with pytest.raises(InputError, match="sample-specific"):
        ensure_training_scales(EnsembleSpec(**BASE), tmp_path / "fixed")


# ----------------------------------------------------------------------------------------------------------
# per-point test sigma


class Recorder(nn.Module):
    """Records its inputs; logits favour class 0 where the first pixel is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        s = x.flatten(1)[:, 0]
        return torch.stack([s, -s], 1)


def _unit_noise(sigma: float, shape=(1, 4, 4)):
    def noise(m: int) -> torch.Tensor:
        return sigma * torch.randn(shape, generator=torch.Generator().manual_seed(1000 + m))

    return noise


def test_point_i_sees_noise_of_std_sigma_i_across_members():
    members, base = 4000, 0.5
    rec = Recorder()
    ens = SmoothedEnsemble(
        lambda m: rec, 2, base, _unit_noise(base), n_members=members, device="cpu", progress=False
    )
    x = torch.zeros(3, 1, 4, 4)
    sig = np.array([0.1, 0.5, 1.3])
    v = ens.votes(x, sigma=sig)
    noise = torch.stack(rec.seen).double()  # [members, 3, 1, 4, 4] (x = 0)
    for i, s in enumerate(sig):
        flat = noise[:, i].flatten()
        assert abs(float(flat.std()) / s - 1) < 0.02 and abs(float(flat.mean())) < 0.02 * s
    # member m's noise at point i is sigma_i * z_m with z_m its own fixed draw
    for m in (0, 17):
        torch.testing.assert_close(noise[m, 0], (_unit_noise(base)(m) * 0.2).double(), rtol=1e-6, atol=0)
    assert torch.equal(noise[:, 1].float(), torch.stack([_unit_noise(base)(m) for m in range(members)]))
    np.testing.assert_array_equal(v.sigma, sig)
    assert v.meta["per_point_sigma"] and v.meta["sigma"] == base


def test_per_point_sigma_equal_to_the_base_gives_the_same_votes():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(5)]
    noise = [0.3 * torch.randn(1, 4, 4) for _ in range(5)]
    ens = SmoothedEnsemble(members, 3, 0.3, noise, device="cpu", progress=False, batch_size=2)
    x = torch.rand(7, 1, 4, 4)
    a, b = ens.votes(x), ens.votes(x, sigma=np.full(7, 0.3))
    assert np.array_equal(a.predictions, b.predictions) and np.array_equal(a.soft_sum, b.soft_sum)
    assert a.sigma is None and np.array_equal(b.sigma, np.full(7, 0.3))
    np.testing.assert_array_equal(ens.votes(x, sigma=0.3).sigma, np.full(7, 0.3))  # a number is repeated


class Halfspace(nn.Module):
    """f(x) = class 0 iff w.x + b > 0, with ||w|| = 1: the distance to the boundary is |w.x + b|."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w.flatten(), b

    def forward(self, x):
        s = (x.flatten(1) @ self.w + self.b) * 100
        return torch.stack([s, -s], 1)


def test_certify_scales_the_radius_by_the_sigma_that_sampled_the_noise():
    members, base = 2000, 0.25
    w = torch.zeros(16)
    w[0] = 1.0
    model = Halfspace(w, 0.0)
    ens = SmoothedEnsemble(
        lambda m: model, 2, base, _unit_noise(base), n_members=members, device="cpu", progress=False
    )
    d = 0.5
    x = torch.zeros(3, 1, 4, 4)
    x[:, 0, 0, 0] = d  # distance d to the boundary, class 0
    sig = np.array([0.25, 0.5, 1.0])
    votes = ens.votes(x, sigma=sig)
    res = ens.certify(x, torch.zeros(3, dtype=torch.long), alpha=1e-3, sigma=sig, votes=votes)
    np.testing.assert_array_equal(res.sigma, sig)
    assert (res.prediction == 0).all() and (res.radius < d).all()  # never beyond the exact radius
    assert res.radius[0] > 0.6 * d  # and not vacuous
    gap = vote_gap(votes, alpha=1e-3)
    np.testing.assert_array_equal(res.radius, sig * gap / 2)
    np.testing.assert_array_equal(certify_votes(votes, alpha=1e-3).radius, res.radius)  # sigma from the votes
    # observed top-class frequency matches Phi(d / sigma_i): the noise really had std sigma_i
    freq = votes.counts()[:, 0] / members
    np.testing.assert_allclose(freq, stats.norm.cdf(d / sig), atol=0.03)
    # Cert-SSB's released evaluator: sample at the base sigma, scale the radius by sigma_i. Unsound here ...
    at_base = ens.votes(x)
    p_low = certify_votes(at_base, alpha=1e-3).p_lower
    assert sig[2] * stats.norm.ppf(p_low[2]) > d
    # ... so certkit refuses it, with votes collected either way
    with pytest.raises(InputError, match="sampled at sigma=0.25"):
        certify_votes(at_base, sigma=sig, alpha=1e-3)
    with pytest.raises(InputError, match="differs from the per-point sigma"):
        certify_votes(votes, sigma=np.full(3, base), alpha=1e-3)
    with pytest.raises(InputError, match="sampled at sigma"):
        ens.certify(x, votes=at_base, sigma=sig)


def test_votes_keep_their_sigma_through_save_and_load(tmp_path):
    v = EnsembleVotes(
        predictions=np.array([[0, 1], [0, 1]]),
        soft_sum=np.array([[2.0, 0.0], [0.0, 2.0]]),
        num_classes=2,
        meta={"sigma": 0.5},
        sigma=np.array([0.4, 0.9]),
    )
    back = EnsembleVotes.load(v.save(tmp_path / "v.npz"))
    np.testing.assert_array_equal(back.sigma, [0.4, 0.9])
    np.testing.assert_array_equal(certify_votes(back, alpha=0.5).sigma, [0.4, 0.9])
    plain = EnsembleVotes(predictions=np.array([[0]]), soft_sum=np.array([[1.0, 0.0]]), num_classes=2)
    assert EnsembleVotes.load(plain.save(tmp_path / "p.npz")).sigma is None


# ----------------------------------------------------------------------------------------------------------
# the three quantities


def test_joint_l2_radius_never_exceeds_the_test_sigma_radius():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = rng.integers(1, 20)
        gap = np.where(rng.random(n) < 0.2, 0.0, rng.exponential(2.0, n))
        sig = rng.uniform(0.05, 2.0, n)
        scales = rng.uniform(0.05, 2.0, rng.integers(1, 50))
        joint = joint_l2_radius(gap, sig, scales)
        assert (joint <= sig * gap / 2).all() and (joint >= 0).all()
        assert (joint[gap == 0] == 0).all()
    # equality when every training scale is at least the test sigma
    np.testing.assert_array_equal(joint_l2_radius([1.0, 2.0], [0.3, 0.5], np.full(10, 0.7)), [0.15, 0.5])
    np.testing.assert_array_equal(joint_l2_radius([2.0], 0.5, [0.1, 0.9]), [0.1])


def test_weighted_condition_reduces_to_the_joint_norm_test_with_equal_scales():
    rng = np.random.default_rng(1)
    sigma = 0.37
    n_train = 300
    delta_sq = np.where(rng.random(n_train) < 0.1, rng.uniform(0, 0.5, n_train), 0.0)
    w = poison_weighted_sq_sum(delta_sq, np.full(n_train, sigma))
    assert w == pytest.approx(delta_sq.sum() / sigma**2, rel=1e-12)
    assert poison_weighted_sq_sum(delta_sq, sigma) == pytest.approx(w, rel=1e-12)
    gap = rng.uniform(0, 40, 5000)
    t = rng.uniform(0, 3, 5000)
    joint = joint_trigger_norms(float(delta_sq.sum()), t)
    np.testing.assert_allclose(weighted_joint_norms(w, sigma, t), joint, rtol=1e-12)
    rab = joint < sigma * gap / 2
    clear = np.abs(joint - sigma * gap / 2) > 1e-9  # away from float ties
    assert np.array_equal(attack_covered(gap, sigma, w, t)[clear], rab[clear])
    assert rab.any() and (~rab).any()
    # and (c) <=> the attack's size in test-sigma units is below radius (a), for any per-point sigma
    sig = rng.uniform(0.1, 1.0, 5000)
    size = weighted_joint_norms(w, sig, t)
    clear = np.abs(size - sig * gap / 2) > 1e-9
    assert np.array_equal(attack_covered(gap, sig, w, t)[clear], (size < sig * gap / 2)[clear])


def _smoothed_linear_margin(dir_u, dir_v, s, sigma, margin0, delta, t):
    """Exact smoothed top-class probability of the joint linear rule a*u + b*v + c > 0 under
    u ~ N(Delta, s^2), v ~ N(t, sigma^2), with (a, b) the attack's worst-case direction."""
    norm = np.hypot(dir_u * s, dir_v * sigma)
    return stats.norm.cdf((margin0 - (dir_u * delta + dir_v * t)) / norm)


def test_weighted_condition_is_the_exact_certificate_and_the_naive_joint_norms_are_not():
    # joint space: one poisoned training feature u (scale s_j) and the test feature v (scale sigma_i).
    # A linear rule whose smoothed probability is pA = Phi(gap / 2) has gap/2 = c / ||(a s, b sigma)||.
    sigma_i, half_gap = 1.0, 1.0
    gap = 2 * half_gap

    # (1) the weighted condition covers an attack that the plain joint l2 radius (b) does not
    scales = np.array([2.0] + [0.1] * 99)  # the poisoned point has a large scale, the others small ones
    delta_sq = np.zeros(100)
    delta_sq[0] = 1.0**2
    t = 0.5
    w = poison_weighted_sq_sum(delta_sq, scales)  # 0.25
    assert attack_covered(gap, sigma_i, w, t)[0]
    assert not joint_trigger_norms(delta_sq.sum(), [t])[0] < joint_l2_radius(gap, sigma_i, scales)[0]
    # ... and rightly: even the worst-case linear rule keeps its prediction under this attack
    s, delta = 2.0, 1.0
    a, b = delta / s**2, t / sigma_i**2  # worst-case direction (whitened attack)
    c = half_gap * np.hypot(a * s, b * sigma_i)
    assert _smoothed_linear_margin(a, b, s, sigma_i, c, delta, t) > 0.5

    # (2) the naive joint norm against radius (a) "covers" an attack on small-scale points; (c) does not
    scales = np.full(100, 0.1)
    delta_sq = np.zeros(100)
    delta_sq[0] = 0.3**2
    t = 0.1
    w = poison_weighted_sq_sum(delta_sq, scales)  # 9
    naive = joint_trigger_norms(delta_sq.sum(), [t])[0] < sigma_i * gap / 2
    assert naive and not attack_covered(gap, sigma_i, w, t)[0]
    # ... and rightly: a linear rule with exactly this gap is flipped by the attack
    s, delta = 0.1, 0.3
    a, b = delta / s**2, t / sigma_i**2
    c = half_gap * np.hypot(a * s, b * sigma_i)
    assert _smoothed_linear_margin(a, b, s, sigma_i, c, 0.0, 0.0) == pytest.approx(stats.norm.cdf(half_gap))
    assert _smoothed_linear_margin(a, b, s, sigma_i, c, delta, t) < 0.5

    # (3) soundness of (b): whatever the scales, plain joint norm below (b) implies (c)
    rng = np.random.default_rng(2)
    for _ in range(2000):
        scales = rng.uniform(0.05, 2.0, 20)
        d2 = np.where(rng.random(20) < 0.3, rng.uniform(0, 0.2, 20), 0.0)
        t, sig, g = rng.uniform(0, 1), rng.uniform(0.05, 2.0), rng.uniform(0, 10)
        if joint_trigger_norms(d2.sum(), [t])[0] < joint_l2_radius(g, sig, scales)[0]:
            assert attack_covered(g, sig, poison_weighted_sq_sum(d2, scales), t)[0]


def test_bad_input():
    v = EnsembleVotes(
        predictions=np.array([[0, 1]]), soft_sum=np.array([[1.0, 0.0], [0.0, 1.0]]), num_classes=2
    )
    for bad, match in [
        (np.array([0.5, np.nan]), "NaN"),
        (np.array([0.5, np.inf]), "NaN or inf"),
        (np.array([0.5, 0.0]), "strictly positive"),
        (np.array([0.5, -1.0]), "strictly positive"),
        (np.array([0.5, 0.5, 0.5]), "3 values but there are 2 points"),
        (np.full((2, 1), 0.5), "1-D"),
        (True, "positive number"),
    ]:
        with pytest.raises(InputError, match=match):
            certify_votes(v, sigma=bad)
        with pytest.raises(InputError, match=match):
            EnsembleVotes(predictions=v.predictions, soft_sum=v.soft_sum, num_classes=2, sigma=bad)
    with pytest.raises(InputError, match="sigma is required"):
        certify_votes(v)
    ens = SmoothedEnsemble([Recorder()], 2, 0.5, [torch.zeros(1, 4, 4)], device="cpu", progress=False)
    for bad, match in [
        ([0.5], "1 values but there are 2"),
        ([0.5, float("nan")], "NaN"),
        ([0.5, 0.0], "positive"),
        ([0.5, -0.5], "positive"),
    ]:
        with pytest.raises(InputError, match=match):
            ens.votes(torch.zeros(2, 1, 4, 4), sigma=bad)
    with pytest.raises(InputError, match="sigma_i"):
        joint_l2_radius([1.0, 1.0], [0.5, 0.0], [0.5])
    with pytest.raises(InputError, match="train_scales"):
        joint_l2_radius([1.0], 0.5, [0.5, np.nan])
    with pytest.raises(InputError, match="train_scales"):
        joint_l2_radius([1.0], 0.5, [])
    with pytest.raises(InputError, match="gap"):
        joint_l2_radius([-1.0], 0.5, [0.5])
    with pytest.raises(InputError, match="gap"):
        attack_covered([np.nan], 0.5, 0.0, [0.1])
    with pytest.raises(InputError, match="delta_sq_over_s_sq_sum"):
        attack_covered([1.0], 0.5, -1.0, [0.1])
    with pytest.raises(InputError, match="delta_sq_over_s_sq_sum"):
        attack_covered([1.0], 0.5, float("inf"), [0.1])
    with pytest.raises(InputError, match="3 values but gap has 2"):
        attack_covered([1.0, 2.0], 0.5, 0.0, [0.1, 0.1, 0.1])
    with pytest.raises(InputError, match="sigma_i has 3 values"):
        attack_covered([1.0, 2.0], [0.5, 0.5, 0.5], 0.0, 0.1)
    with pytest.raises(InputError, match="test_trigger_norms"):
        attack_covered([1.0], 0.5, 0.0, [-0.1])
    with pytest.raises(InputError, match="train_scales"):
        poison_weighted_sq_sum([1.0, 0.0], [0.5, 0.0])
    with pytest.raises(InputError, match="train_scales has 3 values"):
        poison_weighted_sq_sum([1.0, 0.0], [0.5, 0.5, 0.5])


# ----------------------------------------------------------------------------------------------------------
# a whole run with the real optimiser


def test_certify_a_sample_specific_run_end_to_end(tmp_path):
    pytest.importorskip("certkit.certify.sigma")
    from certkit.runs.ensemble_certify import (
        TEST_SIGMAS,
        TRIGGERED_SIGMAS,
        EnsembleCertifyConfig,
        certify_ensemble_run,
        ensemble_report_table,
    )

    spec = EnsembleSpec(**{**SS, "sigma_steps": 3})
    run = train_ensemble(spec, tmp_path / "run", progress=False)
    scales = load_training_scales(run)
    assert scales.shape == (1257,) and (scales >= spec.sigma).all()  # detached SGA never decreases sigma
    logs: list[str] = []
    cfg = EnsembleCertifyConfig(alpha=0.05, max_points=40, bound="hoeffding", selection_correction=False)
    summary = certify_ensemble_run(run, cfg, device="cpu", progress=False, log=logs.append)
    assert summary["training_assumption"] == SAMPLE_SPECIFIC_ASSUMPTION
    assert "conditional on these scales" in summary["training_assumption"]
    row = summary["ensemble"]
    assert row["noise"] == "sample-specific" and row["training_scales"]["min"] == float(scales.min())
    # no certified column depends on the data-chosen training scales: those figures are conditional columns
    assert row["certified_trigger_robustness"] is None
    assert row["acr_joint_l2_conditional_on_scales"] <= row["acr"] + 1e-15
    assert not any("joint" in k and "conditional" not in k for k in row if k.startswith(("certified", "acr")))
    files = run.reload()["files"]
    assert TEST_SIGMAS in files and TRIGGERED_SIGMAS in files
    # input-dependent sigmas: the storage update ran over the clean points and its store is saved; the
    # triggered queries are answered by a store built before (without) their clean twins
    assert "store.npz" in files and row["storage"]["counts"]["n_stored"] <= 40
    assert "store_triggered_first.npz" in files and row["storage"]["kind"] == "transductive, order-dependent"
    assert row["asr_bound_test_time"]["method"] == "markov"  # members' noise is shared by all points
    from certkit.certify.storage import CertifiedStore

    assert CertifiedStore.load(run.file("store.npz")).check_invariant()
    points = pd.read_csv(run.file("points.csv"))
    clean, trig = points[points.set == "clean"], points[points.set == "triggered"]
    assert len(clean) == 40 and (clean.sigma >= spec.sigma).all()
    np.testing.assert_allclose(points.radius, points.sigma * points.gap / 2, rtol=1e-15)
    joint = points.joint_l2_radius.dropna()
    assert (joint <= points.radius[joint.index]).all()
    assert clean.joint_l2_radius.isna().sum() >= row["storage"]["counts"]["n_aligned"]  # none on adjusted rows
    # a triggered query's sigma is optimised on x + t itself, never borrowed from its clean twin
    own = np.load(run.file(TRIGGERED_SIGMAS))["sigma"]
    assert len(own) == 486 and set(trig.sigma.round(12)) <= set(own.round(12))
    by_index = dict(zip(clean["index"], clean.sigma))
    n_test = summary["dataset"]["n_test"]
    assert [by_index[i - n_test] for i in trig["index"]] != trig.sigma.tolist()
    # CTR is the weighted condition, i.e. the attack in test-sigma units below the radius
    covered = attack_covered(
        trig.gap.to_numpy(),
        trig.sigma.to_numpy(),
        row["weighted_poison_sum"],
        np.sqrt(np.maximum(trig.trigger_norm**2 - trig.sigma**2 * row["weighted_poison_sum"], 0)),
    )
    assert covered.tolist() == trig.attack_covered.astype(bool).tolist()
    conditional = row["certified_trigger_robustness_conditional_on_scales"]
    assert conditional == pytest.approx(float(np.mean(trig.correct.astype(bool) & trig.attack_covered.astype(bool))))
    from certkit.certify.results import CertificationResult

    assert conditional == certified_trigger_robustness(CertificationResult.from_frame(trig), target=spec.target)
    assert "joint l2 ACR" in ensemble_report_table(summary)
    # the votes carry the sigmas they were sampled with
    v = EnsembleVotes.load(run.file("votes/clean.npz"))
    np.testing.assert_array_equal(v.sigma, clean.sigma.to_numpy())

    # certifying again reuses the test sigmas and the votes; a modified sigma file is recomputed (warning)
    logs.clear()
    certify_ensemble_run(run, cfg, device="cpu", progress=False, log=logs.append)
    assert any("reusing the 540 stored clean test sigmas" in m for m in logs)
    assert sum("reusing saved votes" in m for m in logs) == 2
    before = np.load(run.file(TEST_SIGMAS))["sigma"]
    raw = bytearray(run.file(TEST_SIGMAS).read_bytes())
    raw[-10] ^= 0xFF
    run.file(TEST_SIGMAS).write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="recomputing the test sigmas"):
        certify_ensemble_run(run, cfg, device="cpu", progress=False, log=logs.append)
    np.testing.assert_array_equal(np.load(run.file(TEST_SIGMAS))["sigma"], before)
    assert run.reload() and run.verify() == []
