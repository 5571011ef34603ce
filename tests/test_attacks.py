"""Attacks: triggers, their norms, poisoning, and that each attack really implants a backdoor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from certkit.backdoor.attacks import (
    ATTACKS,
    SIG,
    Attack,
    BadNets,
    Blended,
    PoisonedDataset,
    RABBlending,
    RABFourPixel,
    RABOnePixel,
    TriggeredSet,
    WaNet,
    make_attack,
    triggered_test_set,
)
from certkit.backdoor.data import ArrayDataset, load_digits
from certkit.backdoor.models import build_model, predict_labels
from certkit.backdoor.training import train_model
from certkit.errors import InputError, UnknownNameError


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _toy(n=40, k=4, shape=(3, 6, 6), seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.arange(n) % k, k, "toy")


CLIPPED = [
    BadNets(),
    BadNets(patch_size=3, value=0.5, location="top-left", pattern="checkerboard"),
    Blended(alpha=0.2),
    WaNet(),
    WaNet(k=3, s=2.0, grid_rescale=0.9, seed=4, noise_mode=False, cross_ratio=1.0),
    SIG(f=5),
    SIG(delta=0.5, f=2.5),
]
RAB = [
    RABOnePixel(),
    RABOnePixel(delta=0.3, position=(1, 2)),
    RABFourPixel(),
    RABFourPixel(delta=2.0, position=(3, 3)),
    RABBlending(),
    RABBlending(delta=0.5, seed=3),
]
ALL = CLIPPED + RAB


@pytest.mark.parametrize("attack", CLIPPED, ids=repr)
def test_apply_returns_clipped_copy_and_leaves_input_unchanged(attack):
    x = _toy().x
    before = x.clone()
    out = attack.apply(x)
    assert torch.equal(x, before)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)


@pytest.mark.parametrize("attack", ALL, ids=repr)
def test_trigger_norms_equal_direct_computation(attack):
    x = _toy().x
    direct = torch.sqrt(((attack.apply(x).double() - x.double()) ** 2).sum(dim=(1, 2, 3)))
    norms = attack.trigger_norms(x)
    assert norms.shape == (len(x),) and norms.dtype == torch.float64
    # RAB's norm is the exact norm of the trigger as added; apply's float32 output rounds it
    assert torch.allclose(norms, direct, rtol=0, atol=1e-6 if attack in RAB else 1e-12)
    assert torch.equal(attack.apply(x), attack.apply(x))  # deterministic
    if isinstance(attack, (WaNet, SIG)):
        assert bool((norms > 0).all())


@pytest.mark.parametrize("attack", RAB, ids=repr)
def test_rab_triggers_are_unclipped_with_norm_exactly_delta(attack):
    g = torch.Generator().manual_seed(1)
    for x in (_toy().x, torch.ones(4, 3, 6, 6), torch.zeros(4, 3, 6, 6), torch.rand(5, 1, 8, 8, generator=g)):
        before = x.clone()
        out = attack.apply(x)
        assert torch.equal(x, before) and out.dtype == torch.float32
        trig = attack.trigger(x.shape[1:])
        assert trig.dtype == torch.float64 and abs(float(trig.norm()) - attack.delta) < 1e-12
        assert torch.allclose(out.double(), x.double() + trig, rtol=0, atol=1e-6)  # x + t, not clipped
        norms = attack.trigger_norms(x)
        assert torch.equal(norms, torch.full((len(x),), attack.delta, dtype=torch.float64))
        direct = (out.double() - x.double()).flatten(1).norm(dim=1)
        assert torch.allclose(direct, norms, rtol=0, atol=1e-6)
    assert float(attack.apply(torch.ones(1, 3, 6, 6)).max()) > 1.0  # leaves [0, 1] where the trigger is > 0


def test_rab_pixel_triggers_match_the_reference_layout():
    # MNIST (1 x 28 x 28): reference attack_lib.py adds delta at (23, 23), delta/2 at the four pixels
    one = RABOnePixel(delta=1.0).trigger((1, 28, 28))
    assert one[0, 23, 23] == 1.0 and int((one != 0).sum()) == 1
    four = RABFourPixel(delta=1.0).trigger((1, 28, 28))
    assert sorted(map(tuple, torch.nonzero(four[0]).tolist())) == [(18, 20), (19, 19), (20, 18), (20, 20)]
    assert bool((four[four != 0] == 0.5).all())
    # 8x8 digits: defaults scaled from MNIST, one pixel at (H-2, W-2)
    assert RABOnePixel().pixel(8, 8) == (6, 6) and RABOnePixel().pixel(32, 32) == (26, 26)
    assert RABFourPixel().pixels(8, 8) == [(4, 6), (5, 5), (6, 4), (6, 6)]
    # C channels: delta / sqrt(C) per channel (one pixel), delta / sqrt(4 C) per entry (four pixels)
    one3 = RABOnePixel(delta=1.0).trigger((3, 8, 8))
    assert torch.allclose(one3[:, 6, 6], torch.full((3,), 3**-0.5, dtype=torch.float64)) and int((one3 != 0).sum()) == 3
    four3 = RABFourPixel(delta=1.0).trigger((3, 8, 8))
    assert int((four3 != 0).sum()) == 12 and torch.allclose(four3[four3 != 0], torch.tensor(12**-0.5, dtype=torch.float64))
    assert RABOnePixel(position=(0, 1)).trigger((1, 4, 4))[0, 0, 1] == 1.0
    assert RABOnePixel(position=[2, 3]).position == (2, 3)


def test_rab_blending_matches_the_reference_pattern_and_is_seeded():
    # reference: np.random.seed(0); np.random.randn(1, 28, 28), rescaled to norm delta
    ref = np.random.RandomState(0).randn(1, 28, 28)
    ref = ref / np.linalg.norm(ref) * 1.0
    assert np.allclose(RABBlending().trigger((1, 28, 28)).numpy(), ref, rtol=0, atol=1e-15)
    a, b, c = RABBlending(delta=0.7, seed=5), RABBlending(delta=0.7, seed=5), RABBlending(delta=0.7, seed=6)
    assert torch.equal(a.trigger((3, 6, 6)), b.trigger((3, 6, 6)))
    assert not torch.equal(a.trigger((3, 6, 6)), c.trigger((3, 6, 6)))


def test_rab_parameters_are_validated():
    for cls in (RABOnePixel, RABFourPixel, RABBlending):
        for delta in (0.0, -1.0, float("nan"), float("inf"), "big"):
            with pytest.raises(InputError, match="delta"):
                cls(delta=delta)
    for cls in (RABOnePixel, RABFourPixel):
        for position in ("bottom-right", (1,), (1, 2, 3), (-1, 2), (1.5, 2), 3):
            with pytest.raises(InputError, match="position"):
                cls(position=position)
    with pytest.raises(InputError, match="position"):
        RABOnePixel(position=(8, 0)).apply(torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="position"):
        RABFourPixel(position=(7, 7)).apply(torch.zeros(1, 1, 8, 8))  # (8, 8) would be outside
    with pytest.raises(InputError, match="position"):
        RABFourPixel(position=(0, 3)).apply(torch.zeros(1, 1, 8, 8))  # (-1, 4) would be outside
    with pytest.raises(InputError, match="seed"):
        RABBlending(seed=1.5)


def test_rab_poisoned_set_may_leave_unit_range_and_triggered_set_reports_delta():
    ds = _toy(n=40, k=4)
    ds.x[:, :, 4, 4] = 0.9  # the default one-pixel trigger position on 6x6: 0.9 + 1 / sqrt(3) > 1
    attack = RABOnePixel(delta=1.0)
    p = attack.poison(ds, rate=0.25, target=1, seed=0)
    assert p.num_poisoned == 10 and not p.dataset.check_range
    assert float(p.dataset.x.max()) > 1.0  # unclipped: ArrayDataset's range check is off
    assert not p.dataset.subset([0, 1]).check_range
    assert len(p.noise_indices) == 0 and p.noise_indices.dtype == np.int64
    idx = torch.from_numpy(p.poison_indices)
    assert torch.equal(p.dataset.x[idx], attack.apply(ds.x[idx])) and bool((p.dataset.y[idx] == 1).all())
    with pytest.raises(InputError, match=r"\[0, 1\]"):  # the default ArrayDataset still rejects it
        ArrayDataset(p.dataset.x, p.dataset.y, 4)
    t = triggered_test_set(attack, ds, target=1)
    assert torch.equal(t.trigger_norms, torch.full((30,), 1.0, dtype=torch.float64))
    assert BadNets().poison(ds, 0.25, 1).dataset.check_range  # clipped attacks keep the check


def test_wanet_grid_and_warp():
    a = WaNet(seed=3)
    grid = a.grid(8, 8)
    assert grid.shape == (1, 8, 8, 2) and grid.dtype == torch.float32
    assert float(grid.min()) >= -1.0 and float(grid.max()) <= 1.0
    assert torch.equal(grid, WaNet(seed=3).grid(8, 8)) and not torch.equal(grid, WaNet(seed=4).grid(8, 8))
    # a tiny strength is (almost) the identity warp; a larger one moves more
    x = _toy().x
    assert torch.allclose(WaNet(s=1e-6).apply(x), x, atol=1e-5)
    n_small = float(WaNet(s=0.5).trigger_norms(x).mean())
    assert 0 < n_small < float(WaNet(s=2.0).trigger_norms(x).mean())
    # identity grid with align_corners=True is exact: displacement = grid - identity, scaled by s / H
    lin = torch.linspace(-1, 1, 8)
    identity = torch.stack(torch.meshgrid(lin, lin, indexing="ij")[::-1], dim=-1)[None]
    disp_1 = WaNet(s=1.0, seed=3).grid(8, 8) - identity
    disp_half = WaNet(s=0.5, seed=3).grid(8, 8) - identity
    inside = (WaNet(s=1.0, seed=3).grid(8, 8).abs() < 1).all(dim=-1, keepdim=True).expand_as(disp_1)
    assert torch.allclose(disp_half[inside], 0.5 * disp_1[inside], atol=1e-6)
    # works on non-square images; noise-mode warps differ from the trigger and are seeded
    assert a.apply(torch.rand(2, 1, 6, 10)).shape == (2, 1, 6, 10)
    noisy = a.apply_noise(x, seed=1)
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1
    assert torch.equal(noisy, a.apply_noise(x, seed=1)) and not torch.equal(noisy, a.apply_noise(x, seed=2))
    assert not torch.equal(noisy, a.apply(x))


def test_wanet_poisoning_with_noise_mode():
    ds = _toy(n=100, k=4)
    attack = WaNet(seed=1, cross_ratio=2.0)
    p = attack.poison(ds, rate=0.1, target=2, seed=5)
    assert p.num_poisoned == 10 and len(p.noise_indices) == 20  # round(0.1 * 100), 2 x 10
    assert np.all(np.diff(p.noise_indices) > 0) and p.noise_indices.dtype == np.int64
    assert len(np.intersect1d(p.poison_indices, p.noise_indices)) == 0
    assert np.all(ds.y.numpy()[p.poison_indices] != 2) and np.all(p.dataset.y.numpy()[p.poison_indices] == 2)
    pi, ni = torch.from_numpy(p.poison_indices), torch.from_numpy(p.noise_indices)
    assert torch.equal(p.dataset.x[pi], attack.apply(ds.x[pi]))
    # noise samples: any label (targets included), labels kept, perturbed warp != clean and != exact warp
    assert torch.equal(p.dataset.y[ni], ds.y[ni])
    noise_x = p.dataset.x[ni]
    assert not torch.equal(noise_x, ds.x[ni]) and not torch.equal(noise_x, attack.apply(ds.x[ni]))
    assert all(not torch.equal(noise_x[i], attack.apply(ds.x[ni][i : i + 1])[0]) for i in range(len(ni)))
    rest = np.setdiff1d(np.arange(100), np.concatenate([p.poison_indices, p.noise_indices]))
    assert torch.equal(p.dataset.x[rest], ds.x[rest]) and torch.equal(p.dataset.y[rest], ds.y[rest])
    # determinism
    q = attack.poison(ds, rate=0.1, target=2, seed=5)
    assert np.array_equal(q.noise_indices, p.noise_indices) and torch.equal(q.dataset.x, p.dataset.x)
    assert not np.array_equal(attack.poison(ds, 0.1, 2, seed=6).noise_indices, p.noise_indices)
    # the poisoned choice is the same as for any other attack with the same seed
    assert np.array_equal(p.poison_indices, BadNets().poison(ds, 0.1, 2, seed=5).poison_indices)
    # counts: round(cross_ratio * n_poison); off or ratio 0 -> none
    assert len(WaNet(cross_ratio=0.5).poison(ds, 0.05, 2).noise_indices) == 2  # round(0.5 * 5) = 2
    assert len(WaNet(noise_mode=False).poison(ds, 0.1, 2).noise_indices) == 0
    assert len(WaNet(cross_ratio=0.0).poison(ds, 0.1, 2).noise_indices) == 0
    with pytest.raises(InputError, match="cross_ratio"):
        WaNet(cross_ratio=9.5).poison(ds, 0.1, 2)  # 95 noise samples, only 90 samples not poisoned


def test_wanet_parameters_are_validated():
    for k in (1, 0, 2.5, True):
        with pytest.raises(InputError, match="k"):
            WaNet(k=k)
    for s in (0.0, -0.5, float("nan")):
        with pytest.raises(InputError, match="s must"):
            WaNet(s=s)
    with pytest.raises(InputError, match="grid_rescale"):
        WaNet(grid_rescale=0)
    for cr in (-0.1, float("inf"), "two"):
        with pytest.raises(InputError, match="cross_ratio"):
            WaNet(cross_ratio=cr)
    with pytest.raises(InputError, match="noise_mode"):
        WaNet(noise_mode="yes")
    with pytest.raises(InputError, match="seed"):
        WaNet(seed="0")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        WaNet().apply_noise(torch.full((1, 1, 4, 4), 2.0))


def test_sig_signal_and_apply():
    a = SIG(delta=0.2, f=6)
    sig = a.signal(4, 28)
    expected = 0.2 * np.sin(2 * np.pi * np.arange(28) * 6 / 28)
    assert sig.shape == (4, 28) and np.allclose(sig.numpy(), np.broadcast_to(expected, (4, 28)), atol=1e-15)
    x = _toy(shape=(3, 5, 28)).x
    out = a.apply(x)
    assert torch.allclose(out, (x.double() + sig[None, None, :1, :]).clamp(0, 1).float(), atol=1e-6)
    assert SIG().delta == 20 / 255 and SIG().f == 6
    for delta in (0, -0.1, float("nan")):
        with pytest.raises(InputError, match="delta"):
            SIG(delta=delta)
    with pytest.raises(InputError, match="f must"):
        SIG(f=0)
    with pytest.raises(InputError, match="signal vanishes"):
        SIG(f=6).apply(torch.zeros(1, 1, 4, 6))  # sin(2 pi j) = 0 on every column


def test_sig_is_clean_label():
    ds = _toy(n=40, k=4)  # 10 samples per class
    attack = SIG(delta=0.3, f=1)
    p = attack.poison(ds, rate=0.2, target=3, seed=1)
    assert p.num_poisoned == 8 and p.target == 3  # round(0.2 * 40) samples, all from the target class
    assert np.all(ds.y.numpy()[p.poison_indices] == 3)
    assert torch.equal(p.dataset.y, ds.y)  # no label changes at all
    idx = torch.from_numpy(p.poison_indices)
    assert torch.equal(p.dataset.x[idx], attack.apply(ds.x[idx]))
    rest = np.setdiff1d(np.arange(40), p.poison_indices)
    assert torch.equal(p.dataset.x[rest], ds.x[rest])
    assert len(p.noise_indices) == 0 and p.dataset.check_range
    assert np.array_equal(attack.poison(ds, 0.2, 3, seed=1).poison_indices, p.poison_indices)
    assert not np.array_equal(attack.poison(ds, 0.2, 3, seed=2).poison_indices, p.poison_indices)
    assert attack.poison(ds, 0.25, 3).num_poisoned == 10  # the whole target class
    with pytest.raises(InputError, match="only 10 samples have the target label 3"):
        attack.poison(ds, 0.3, 3)
    # at test time the signal is stamped on the non-target inputs
    t = triggered_test_set(attack, ds, target=3)
    assert len(t) == 30 and bool((t.y_true != 3).all())


def test_badnets_patch_location_and_pattern():
    x = torch.zeros(2, 1, 5, 5)
    out = BadNets(patch_size=2, value=1.0).apply(x)
    assert torch.equal(out[:, :, 3:, 3:], torch.ones(2, 1, 2, 2)) and float(out.sum()) == 8.0
    out = BadNets(patch_size=2, location="top-left").apply(x)
    assert float(out[0, 0, :2, :2].sum()) == 4.0
    out = BadNets(patch_size=2, location="bottom-left").apply(x)
    assert float(out[0, 0, 3:, :2].sum()) == 4.0
    out = BadNets(patch_size=2, location="top-right").apply(x)
    assert float(out[0, 0, :2, 3:].sum()) == 4.0
    checker = BadNets(patch_size=3, value=1.0, pattern="checkerboard").patch()
    assert checker.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    # on a black image, a solid white 2x2 patch on 3 channels has norm sqrt(12)
    assert torch.allclose(BadNets().trigger_norms(torch.zeros(1, 3, 8, 8)), torch.tensor([12**0.5], dtype=torch.float64))
    with pytest.raises(InputError, match="does not fit"):
        BadNets(patch_size=9).apply(torch.zeros(1, 1, 8, 8))
    with pytest.raises(UnknownNameError, match="bottom-right"):
        BadNets(location="middle")
    with pytest.raises(InputError, match="value"):
        BadNets(value=1.5)


def test_blended_is_a_seeded_convex_combination():
    x = _toy().x
    a, b, c = Blended(alpha=0.3, seed=7), Blended(alpha=0.3, seed=7), Blended(alpha=0.3, seed=8)
    pattern = a.pattern(x.shape[1:])
    assert float(pattern.min()) >= 0.0 and float(pattern.max()) <= 1.0
    assert torch.allclose(a.apply(x), 0.7 * x + 0.3 * pattern, atol=1e-6)
    assert torch.equal(a.apply(x), b.apply(x)) and not torch.equal(a.apply(x), c.apply(x))
    assert torch.allclose(a.trigger_norms(x), 0.3 * (pattern - x).double().flatten(1).norm(dim=1), atol=1e-6)
    with pytest.raises(InputError, match="alpha"):
        Blended(alpha=0.0)


def test_apply_validates_inputs():
    with pytest.raises(InputError, match=r"\[N, C, H, W\]"):
        BadNets().apply(torch.zeros(1, 8, 8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        Blended().apply(torch.full((1, 1, 4, 4), 2.0))


def test_poison_picks_exact_count_of_non_target_samples_deterministically():
    ds = _toy(n=40, k=4)
    attack = BadNets()
    p = attack.poison(ds, rate=0.25, target=1, seed=3)
    assert isinstance(p, PoisonedDataset) and p.target == 1 and p.rate == 0.25
    assert len(p.poison_indices) == 10 and p.poison_indices.dtype == np.int64
    assert np.all(np.diff(p.poison_indices) > 0)  # sorted, distinct
    assert np.all(ds.y.numpy()[p.poison_indices] != 1)  # only non-target samples
    assert np.all(p.dataset.y.numpy()[p.poison_indices] == 1)
    idx = torch.from_numpy(p.poison_indices)
    assert torch.equal(p.dataset.x[idx], attack.apply(ds.x[idx]))
    rest = np.setdiff1d(np.arange(40), p.poison_indices)
    assert torch.equal(p.dataset.x[rest], ds.x[rest]) and torch.equal(p.dataset.y[rest], ds.y[rest])
    assert np.array_equal(attack.poison(ds, 0.25, 1, seed=3).poison_indices, p.poison_indices)
    assert not np.array_equal(attack.poison(ds, 0.25, 1, seed=4).poison_indices, p.poison_indices)
    assert len(attack.poison(ds, 0.0, 1).poison_indices) == 0
    assert len(attack.poison(ds, 0.01, 1).poison_indices) == 0  # round(0.4) = 0
    assert len(attack.poison(ds, 0.05, 1).poison_indices) == 2  # round(2.0) = 2
    assert torch.equal(ds.y, torch.arange(40) % 4)  # the clean set is untouched


def test_poison_validates_rate_target_and_capacity():
    ds = _toy(n=40, k=4)
    for rate in (1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="rate"):
            BadNets().poison(ds, rate, 0)
    for target in (4, -1, 1.5):
        with pytest.raises(InputError, match="target"):
            BadNets().poison(ds, 0.1, target)
    with pytest.raises(InputError, match="only 30 samples"):
        BadNets().poison(ds, 0.9, 0)


def test_triggered_test_set_keeps_only_non_target_inputs():
    ds = _toy(n=20, k=4)
    attack = Blended(alpha=0.2)
    t = triggered_test_set(attack, ds, target=2)
    assert isinstance(t, TriggeredSet) and len(t) == 15 and t.target == 2
    assert np.array_equal(t.indices, np.flatnonzero(ds.y.numpy() != 2))
    assert torch.equal(t.y_true, ds.y[torch.from_numpy(t.indices)]) and bool((t.y_true != 2).all())
    assert torch.equal(t.x, attack.apply(ds.x[torch.from_numpy(t.indices)]))
    assert torch.allclose(t.trigger_norms, attack.trigger_norms(ds.x[torch.from_numpy(t.indices)]))
    with pytest.raises(InputError, match="target"):
        triggered_test_set(attack, ds, target=9)


def test_registry_and_config_round_trip():
    assert set(ATTACKS) == {"badnets", "blended", "rab-one-pixel", "rab-four-pixel", "rab-blending", "wanet", "sig"}
    for attack in ALL:
        cfg = json.loads(json.dumps(attack.config()))
        again = make_attack(**cfg)
        assert again == attack and type(again) is type(attack)
    assert make_attack("blended", alpha=0.5).alpha == 0.5
    assert make_attack("rab-one-pixel", delta=0.5, position=[1, 2]) == RABOnePixel(delta=0.5, position=(1, 2))
    assert make_attack("wanet", noise_mode=False).config() == {
        "name": "wanet", "k": 4, "s": 1.0, "grid_rescale": 1.0, "seed": 0, "noise_mode": False, "cross_ratio": 2.0
    }
    assert RABBlending(seed=1) != RABBlending(seed=2) and hash(RABOnePixel()) == hash(RABOnePixel(delta=1))
    with pytest.raises(UnknownNameError, match="'badnets'"):
        make_attack("wanet2")
    with pytest.raises(InputError, match="no parameter"):
        make_attack("badnets", alpha=0.1)
    with pytest.raises(TypeError):
        Attack()  # abstract


# (attack, poisoning rate, epochs, minimum ASR), target 0. Observed CA / ASR with the test's seeds
# (poison, torch and training seed 0): badnets 0.976 / 0.975, blended 0.957 / 0.998, rab-one-pixel
# 0.970 / 0.988, rab-four-pixel 0.972 / 0.879, rab-blending 0.963 / 0.965, wanet 0.956 / 0.805,
# sig 0.939 / 1.000. Over seeds 0-4 (all three seeds varied together) the minimum ASR / CA are:
# rab-one-pixel 0.879 / 0.954, rab-four-pixel 0.879 / 0.959, rab-blending 0.825 / 0.963, wanet (defaults,
# noise mode on) 0.656 / 0.956, sig 0.811 / 0.900. WaNet needs rate 0.2 and 40 epochs on 8x8 digits (rate
# 0.1 / 10 epochs: ASR 0.32-0.60 at s = 1, 0.16-0.50 at the paper's s = 0.5). SIG (clean-label: 123 of the
# 124 target-class images) needs a large amplitude: f = 6 aliases on 8 columns (ASR 0.60-0.72 at delta 1.0,
# about 0 at the default 20/255), so the test uses delta 1.0, f = 3.
IMPLANT_CASES = [
    (BadNets(patch_size=2), 0.1, 10, 0.8),
    (Blended(alpha=0.2, seed=0), 0.1, 10, 0.8),
    (RABOnePixel(), 0.1, 10, 0.7),
    (RABFourPixel(), 0.1, 10, 0.7),
    (RABBlending(), 0.1, 10, 0.7),
    (WaNet(), 0.2, 40, 0.5),
    (SIG(delta=1.0, f=3), 0.098, 20, 0.5),
]


@pytest.mark.parametrize(("attack", "rate", "epochs", "min_asr"), IMPLANT_CASES, ids=[c[0].name for c in IMPLANT_CASES])
def test_attack_implants_a_backdoor_on_digits(digits, attack, rate, epochs, min_asr):
    target = 0
    poisoned = attack.poison(digits.train, rate=rate, target=target, seed=0)
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, input_shape=digits.input_shape, mean=digits.mean, std=digits.std)
    train_model(model, poisoned.dataset, epochs=epochs, lr=3e-3, batch_size=64, progress=False, device="cpu")
    clean_acc = float((predict_labels(model, digits.test.x, device="cpu") == digits.test.y).float().mean())
    trig = triggered_test_set(attack, digits.test, target)
    asr = float((predict_labels(model, trig.x, device="cpu") == target).float().mean())
    assert clean_acc > (0.9 if isinstance(attack, (BadNets, Blended)) else 0.85)
    assert asr > min_asr  # chance would be ~0.1


@pytest.mark.parametrize("name,params,side", [
    ("badnets", {}, 2), ("badnets", {"patch_size": 3, "location": "top-left"}, 3),
    ("rab-one-pixel", {}, 1), ("rab-four-pixel", {}, 3),
    ("blended", {}, None), ("wanet", {}, None), ("sig", {}, None), ("rab-blending", {}, None),
])
def test_every_attack_reports_whether_its_trigger_is_a_patch_and_its_side(name, params, side):
    attack = make_attack(name, **params)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert attack.patch_side(x.shape[1:]) == side
    if side is not None:  # every changed pixel lies inside one side x side square
        changed = (attack.apply(x) != x).any(0).any(0).nonzero()
        rows, cols = changed[:, 0], changed[:, 1]
        assert len(changed) and int(rows.max() - rows.min()) + 1 <= side and int(cols.max() - cols.min()) + 1 <= side
