"""purifiers: FT and FST on a BadNets-backdoored digits CNN, input immutability, determinism, head
discovery by structure, registry errors, parameter validation, and the before/after report (DER)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import same_state, state_of
from torch import nn

import purifiers
from certkit.backdoor.data import ArrayDataset
from certkit.backdoor.metrics import defense_effectiveness_rating
from certkit.backdoor.models import Normalize, build_model
from certkit.errors import InputError, UnknownNameError
from purifiers._common import find_head

TARGET = 0
# The defender gets a random clean 20% of the *training* set (251 of 1257 images, ~25 per class), never
# test data. BackdoorBench uses 5% and FST 2% of CIFAR-10 (2,500 / 1,000 images); on digits those fractions
# would be 63 / 25 images (2-6 per class), with which FST's head re-initialisation collapses clean accuracy
# (purifier-notes.md section 14: 72 images -> 20% CA). 20% keeps the per-class count workable.
CLEAN_FRACTION = 0.2
# FST on this toy: 20 epochs at batch 32 (8 steps/epoch, 160 SGD steps) instead of the paper's 10 epochs at
# batch 128 (2 steps/epoch here): with only 20 steps, CA after FST varied 0.62-0.92 across seeds. Observed
# with this setting, seeds 0-3: CA 0.957 -> 0.89-0.94, ASR 0.98 -> 0.03-0.09.
FST_PARAMS = dict(epochs=20, batch_size=32, device="cpu")


_state, _same = state_of, same_state


@pytest.fixture(scope="module")
def setup(backdoored_digits):
    return backdoored_digits


@pytest.fixture(scope="module")
def fst_result(setup):
    before = _state(setup["model"])
    purified = purifiers.make("fst", **FST_PARAMS).purify(setup["model"], setup["clean"], seed=0)
    report = purifiers.evaluate(setup["model"], purified, setup["test"], setup["triggered"], device="cpu")
    return before, purified, report


@pytest.fixture(scope="module")
def ft_result(setup):
    before = _state(setup["model"])
    purified = purifiers.make("ft", device="cpu").purify(setup["model"], setup["clean"], seed=0)
    report = purifiers.evaluate(setup["model"], purified, setup["test"], setup["triggered"], device="cpu")
    return before, purified, report


def test_backdoor_is_planted(setup, fst_result):
    report = fst_result[2]
    assert report.ca_before > 0.9  # observed 0.957
    assert report.asr_before > 0.9  # observed 0.981


def test_fst_removes_backdoor_and_keeps_accuracy(fst_result):
    _, purified, r = fst_result
    # observed (seed 0): CA 0.957 -> 0.893, ASR 0.981 -> 0.091, RA 0.02 -> ~0.6, DER ~0.91
    assert r.asr_before - r.asr_after > 0.3
    assert r.ca_after >= r.ca_before - 0.1
    assert r.der > 0.7


def test_fst_keeps_head_norm_and_normalize_first(setup, fst_result):
    _, purified, _ = fst_result
    _, head0 = find_head(setup["model"], 10)
    _, head1 = find_head(purified, 10)
    assert math.isclose(float(head1.weight.detach().norm()), float(head0.weight.detach().norm()), rel_tol=1e-5)
    assert isinstance(next(purified.children()), Normalize)
    assert purified.certkit_spec == setup["model"].certkit_spec


def test_ft_keeps_accuracy_and_does_not_raise_asr(setup, ft_result):
    # FT is known to be weak at low poisoning rates (Min et al. 2023); on digits, 10 epochs on the clean
    # 20% barely moves the backdoor (observed: CA 0.957 -> 0.954, ASR 0.981 -> 0.959). So we assert only
    # that it does not raise ASR, keeps CA, and actually changes the weights.
    before, purified, r = ft_result
    assert r.asr_after <= r.asr_before + 0.02
    assert r.ca_after >= r.ca_before - 0.03
    assert not _same(_state(purified), before)
    assert isinstance(next(purified.children()), Normalize)


@pytest.mark.parametrize("which", ["ft_result", "fst_result"])
def test_input_model_unchanged(setup, which, request):
    before, purified, _ = request.getfixturevalue(which)
    assert purified is not setup["model"]
    assert _same(_state(setup["model"]), before)


@pytest.mark.parametrize("name", ["ft", "fst"])
def test_same_seed_identical_weights(setup, name):
    clean = setup["clean"].subset(range(100))
    p = purifiers.make(name, epochs=2, batch_size=32, device="cpu")
    a = p.purify(setup["model"], clean, seed=3)
    b = p.purify(setup["model"], clean, seed=3)
    c = p.purify(setup["model"], clean, seed=4)
    assert _same(_state(a), _state(b))
    assert not _same(_state(a), _state(c))


def test_head_found_by_structure():
    torch.manual_seed(0)
    digits = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    rab = build_model("rab-mnist-cnn", num_classes=10, input_shape=(1, 28, 28))
    for model, fan_in in ((digits, 64), (rab, 512)):
        name, head = find_head(model)
        assert head is model.classifier[-1] and head.in_features == fan_in and head.out_features == 10
        assert find_head(model, 10)[1] is head

    class Odd(nn.Module):  # head is not the last Linear, nor named like one
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 8)
            self.zz_out = nn.Linear(8, 5)
            self.aux = nn.Linear(8, 3)

        def forward(self, x):
            h = self.body(x.flatten(1))
            return self.zz_out(h)

    odd = Odd()
    assert find_head(odd, 5) == ("zz_out", odd.zz_out)
    with pytest.raises(InputError, match="7 outputs"):
        find_head(odd, 7)
    with pytest.raises(InputError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_fst_runs_on_rab_mnist_cnn():
    torch.manual_seed(0)
    model = build_model("rab-mnist-cnn", num_classes=10, input_shape=(1, 28, 28))
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10, 10)
    before = _state(model)
    out = purifiers.make("fst", epochs=1, batch_size=20, device="cpu").purify(model, data, seed=0)
    assert _same(_state(model), before)
    w0, w1 = model.classifier[-1].weight, out.classifier[-1].weight
    assert math.isclose(float(w1.detach().norm()), float(w0.detach().norm()), rel_tol=1e-5)
    assert out(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_registry():
    avail = purifiers.available()
    assert {"ft", "fst"} <= set(avail)
    assert avail["fst"]["clean_fraction"] == 0.02 and avail["fst"]["needs_labels"] is True
    assert avail["ft"]["clean_fraction"] == 0.05 and avail["ft"]["changes"] == "weights"
    assert isinstance(purifiers.make("fst"), purifiers.FeatureShiftTuning)
    assert purifiers.make("fst").get_params()["alpha"] == 0.2
    assert purifiers.make("ft", epochs=3).clone().epochs == 3
    with pytest.raises(UnknownNameError, match="nope.*fst, ft"):
        purifiers.make("nope")


@pytest.mark.parametrize(
    "name, params, bad",
    [
        ("fst", {"alpha": -1.0}, "alpha"),
        ("fst", {"alpha": float("nan")}, "alpha"),
        ("fst", {"lr": 0}, "lr"),
        ("fst", {"epochs": 0}, "epochs"),
        ("fst", {"batch_size": 1.5}, "batch_size"),
        ("fst", {"momentum": 1.5}, "momentum"),
        ("ft", {"weight_decay": -1}, "weight_decay"),
        ("ft", {"epochs": True}, "epochs"),
        ("ft", {"device": "tpu"}, "device"),
    ],
)
def test_bad_params(setup, name, params, bad):
    with pytest.raises(InputError, match=bad):
        purifiers.make(name, **params).purify(setup["model"], setup["clean"], seed=0)


def test_bad_inputs(setup):
    p = purifiers.make("fst", epochs=1)
    with pytest.raises(InputError, match="seed"):
        p.purify(setup["model"], setup["clean"], seed=-1)
    with pytest.raises(InputError, match="clean_data"):
        p.purify(setup["model"], (setup["clean"].x, setup["clean"].y))
    with pytest.raises(InputError, match="clean_data is empty"):
        p.purify(setup["model"], setup["clean"].subset([]))
    with pytest.raises(InputError, match="model"):
        p.purify("not a model", setup["clean"])


def test_report_der_and_frame(setup, fst_result):
    r = fst_result[2]
    expected = (max(0.0, r.asr_before - r.asr_after) - max(0.0, r.ca_before - r.ca_after) + 1) / 2
    assert r.der == pytest.approx(expected)
    assert r.der == defense_effectiveness_rating(r.ca_before, r.asr_before, r.ca_after, r.asr_after)
    assert r.n_clean == len(setup["test"]) and r.n_triggered == len(setup["triggered"]) and r.target == TARGET
    d = r.to_dict()
    assert d["runtime_s"] is None and set(d) >= {"ca_before", "asr_after", "ra_after", "der"}
    frame = r.to_frame()
    assert len(frame) == 1 and frame.loc[0, "der"] == r.der
    # same model before and after: DER 0.5 (no change)
    same = purifiers.evaluate(setup["model"], setup["model"], setup["test"], setup["triggered"], runtime_s=1.5)
    assert same.der == 0.5 and same.runtime_s == 1.5
    with pytest.raises(InputError, match="triggered"):
        purifiers.evaluate(setup["model"], setup["model"], setup["test"], setup["test"])


def test_evaluate_accepts_an_attack_and_target(setup, ft_result):
    from certkit.backdoor.attacks import BadNets

    _, purified, report = ft_result
    again = purifiers.evaluate(setup["model"], purified, setup["test"], BadNets(), TARGET, device="cpu")
    assert again.asr_after == report.asr_after and again.ca_after == report.ca_after
    with pytest.raises(InputError, match="target class is required"):
        purifiers.evaluate(setup["model"], purified, setup["test"], BadNets(), device="cpu")
