"""Attacks: triggers, their norms, poisoning, and that each attack really implants a backdoor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from certkit.attacks import (
    ATTACKS,
    Attack,
    BadNets,
    Blended,
    PoisonedDataset,
    TriggeredSet,
    make_attack,
    triggered_test_set,
)
from certkit.data import ArrayDataset, load_digits
from certkit.errors import InputError, UnknownNameError
from certkit.models import build_model, predict_labels
from certkit.training import train_model


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _toy(n=40, k=4, shape=(3, 6, 6), seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.arange(n) % k, k, "toy")


ALL = [BadNets(), BadNets(patch_size=3, value=0.5, location="top-left", pattern="checkerboard"), Blended(alpha=0.2)]


@pytest.mark.parametrize("attack", ALL, ids=repr)
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
    assert norms.shape == (len(x),)
    assert torch.allclose(norms, direct, rtol=0, atol=1e-12)


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
    assert set(ATTACKS) >= {"badnets", "blended"}
    for attack in ALL:
        cfg = json.loads(json.dumps(attack.config()))
        again = make_attack(**cfg)
        assert again == attack and type(again) is type(attack)
    assert make_attack("blended", alpha=0.5).alpha == 0.5
    with pytest.raises(UnknownNameError, match="'badnets'"):
        make_attack("wanet2")
    with pytest.raises(InputError, match="no parameter"):
        make_attack("badnets", alpha=0.1)
    with pytest.raises(TypeError):
        Attack()  # abstract


@pytest.mark.parametrize(
    "attack", [BadNets(patch_size=2), Blended(alpha=0.2, seed=0)], ids=["badnets", "blended"]
)
def test_attack_implants_a_backdoor_on_digits(digits, attack):
    target = 0
    poisoned = attack.poison(digits.train, rate=0.1, target=target, seed=0)
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, input_shape=digits.input_shape, mean=digits.mean, std=digits.std)
    train_model(model, poisoned.dataset, epochs=10, lr=3e-3, batch_size=64, progress=False, device="cpu")
    clean_acc = float((predict_labels(model, digits.test.x, device="cpu") == digits.test.y).float().mean())
    trig = triggered_test_set(attack, digits.test, target)
    asr = float((predict_labels(model, trig.x, device="cpu") == target).float().mean())
    assert clean_acc > 0.9
    assert asr > 0.8  # chance would be ~0.1
