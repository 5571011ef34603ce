"""TSBD (Lin et al., NeurIPS 2024): ASR drop on the BadNets digits model, the closed-form zeroing rule,
shortcut exclusion, the two-pass regulated update, selection of n on validation data only, determinism,
parameter checks and input immutability."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import same_state, state_of
from torch import nn

import purifiers
from certkit.backdoor.data import ArrayDataset
from certkit.backdoor.models import Normalize, build_model
from certkit.errors import InputError
from purifiers._common import split_validation
from purifiers.tsbd import (
    OFFICIAL_N_CANDIDATES,
    TwoStageBackdoorDefense,
    neuron_weight_changes,
    regulated_step,
    scored_convs,
    shortcut_convs,
    unlearning_done,
    zero_top_weights_,
)

# Digits budget (CPU): lr_unlearn 1e-2 instead of the official 1e-4 (1 unlearning epoch instead of hundreds),
# 10 fine-tuning epochs of batch 32 (~200 training images: 7 steps per epoch) instead of 20 of 256, two
# candidates, max_val_drop 0.1 (the validation split has 51 images, one image is 0.02). With 5 epochs of
# batch 64 the clean accuracy fell to ~0.86 (too few steps after zeroing).
DIGITS = dict(lr_unlearn=1e-2, n_candidates=(0.05, 0.3), ft_epochs=10, batch_size=32, max_val_drop=0.1)


def _data(shape=(1, 8, 8), n=80, seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.arange(n) % 10, 10)


def _tiny(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,), std=(0.25,))


FAST = dict(n_candidates=(0.1, 0.5), lr_unlearn=0.01, max_unlearn_epochs=50, ft_epochs=1, batch_size=64,
            device="cpu")


@pytest.fixture(scope="module")
def digits_run(backdoored_digits):
    b = backdoored_digits
    before = state_of(b["model"])
    method = purifiers.make("tsbd", device="cpu", **DIGITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = method.purify(b["model"], b["clean"], seed=0)
    report = purifiers.evaluate(b["model"], out, b["test"], b["triggered"], device="cpu")
    return {"method": method, "out": out, "report": report, "before": before}


# ---------------------------------------------------------------------------------------------- digits
def test_lowers_badnets_asr_on_digits_and_keeps_clean_accuracy(backdoored_digits, digits_run):
    r = digits_run["report"]
    # Observed (seed 0): n = 0.3 accepted (val acc 0.92 vs 1.00), CA 0.957 -> 0.946, ASR 0.981 -> 0.082.
    # Margins: ASR below 0.3, CA drop below 0.05.
    assert r.asr_before > 0.9
    assert r.asr_after < 0.3, r
    assert r.ca_after > r.ca_before - 0.05, r
    assert same_state(state_of(backdoored_digits["model"]), digits_run["before"]), "input model was modified"
    out = digits_run["out"]
    assert isinstance(next(out.children()), Normalize) and hasattr(out, "certkit_spec")
    assert not out.training
    assert not any(k.startswith("tsbd") or k.endswith("_") for k in vars(out)), "selection leaked onto the module"


def test_selection_log_matches_an_independent_validation_check(backdoored_digits, digits_run):
    method, out = digits_run["method"], digits_run["out"]
    log = method.selection_log_
    assert method.selected_n_ in DIGITS["n_candidates"] and method.unlearn_epochs_ >= 1
    assert [d["n"] for d in log] == sorted(DIGITS["n_candidates"], reverse=True)[: len(log)]
    _, val = split_validation(backdoored_digits["clean"], TwoStageBackdoorDefense.validation_fraction, 0)
    acc = lambda m: float((m.eval()(val.x).argmax(1) == val.y).float().mean())  # noqa: E731
    assert method.base_val_acc_ == pytest.approx(acc(backdoored_digits["model"]))
    accepted = [d for d in log if d["accepted"]]
    floor = method.base_val_acc_ - DIGITS["max_val_drop"] - 1e-12
    # largest candidate within the allowed drop (evaluated from the largest down), else the most accurate one
    assert all((d["val_acc"] >= floor) == d["accepted"] for d in log)
    chosen = accepted[0] if accepted else max(log, key=lambda d: (d["val_acc"], -d["n"]))
    assert method.selected_n_ == chosen["n"]
    assert acc(out) == pytest.approx(chosen["val_acc"])


def test_selection_depends_on_the_validation_split_only(backdoored_digits):
    """With the real validation split n = 0.9 (zeroing 70% of the weights of 90% of the neurons) is rejected;
    with a "validation" set whose labels the backdoored model always gets wrong (base accuracy 0), the
    largest candidate is accepted at once. Training and test data are the same in both runs, so a method
    selecting on test (or training) data would choose the same n twice."""
    b = backdoored_digits
    train, val = split_validation(b["clean"], 0.2, seed=0)
    kw = dict(DIGITS, n_candidates=(0.05, 0.9), ft_epochs=1, batch_size=64)
    real = purifiers.make("tsbd", device="cpu", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real.purify(b["model"], train, validation=val, seed=0)
    assert real.selection_log_[0]["n"] == 0.9 and not real.selection_log_[0]["accepted"]
    assert real.selected_n_ == 0.05
    with torch.no_grad():
        wrong = (b["model"].eval()(val.x).argmax(1) + 1) % 10
    bogus = ArrayDataset(val.x, wrong, 10)
    other = purifiers.make("tsbd", device="cpu", **kw)
    other.purify(b["model"], train, validation=bogus, seed=0)
    assert other.base_val_acc_ == 0.0
    assert other.selected_n_ == 0.9 and len(other.selection_log_) == 1


# ---------------------------------------------------------------------------------------------- stage 1
class _TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize((0.0,), (1.0,))
        self.a = nn.Conv2d(1, 3, 2, bias=False)
        self.b = nn.Conv2d(3, 2, 1, bias=False)
        self.head = nn.Linear(2, 10)

    def forward(self, x):
        return self.head(self.b(self.a(self.normalize(x))).mean((2, 3)))


def test_zeroing_rule_closed_form():
    torch.manual_seed(0)
    orig = _TwoConv()
    unl = copy.deepcopy(orig)
    rng = np.random.default_rng(1)
    with torch.no_grad():  # distinct changes: no ties
        for conv in (unl.a, unl.b):
            mags = torch.arange(1.0, conv.weight.numel() + 1)[torch.from_numpy(rng.permutation(conv.weight.numel()))]
            signs = torch.from_numpy(rng.choice([-1.0, 1.0], conv.weight.numel())).float()
            conv.weight.add_((mags * signs * 0.01).view_as(conv.weight))
    # independent computation: 5 neurons (3 of a with 4 weights, 2 of b with 3 weights)
    dw = {n: (getattr(unl, n).weight - getattr(orig, n).weight).abs().detach().numpy() for n in ("a", "b")}
    neurons = [(n, k, dw[n][k].sum()) for n in ("a", "b") for k in range(dw[n].shape[0])]
    for n_ratio, m in ((0.4, 0.7), (0.6, 0.5), (1.0, 0.25), (0.1, 1.0)):
        top = sorted(neurons, key=lambda t: -t[2])[: max(1, math.floor(n_ratio * 5))]
        pool = sorted((v for n, k, _ in top for v in dw[n][k].ravel()), reverse=True)
        k_zero = max(1, math.floor(m * len(pool)))
        thr = pool[k_zero - 1]
        expected = {n: getattr(orig, n).weight.detach().clone() for n in ("a", "b")}
        for n, k, _ in top:
            expected[n][k][torch.from_numpy(dw[n][k] >= thr)] = 0.0
        model = copy.deepcopy(orig)
        got = zero_top_weights_(model, neuron_weight_changes(orig, unl), n_ratio, m)
        assert got == (len(top), k_zero)
        for n in ("a", "b"):
            assert torch.equal(getattr(model, n).weight, expected[n]), (n_ratio, m, n)
        assert int(sum((getattr(model, n).weight == 0).sum() for n in ("a", "b"))) == k_zero
        assert torch.equal(model.head.weight, orig.head.weight)


def test_shortcut_convs_are_excluded_on_preact_resnet18():
    torch.manual_seed(0)
    model = build_model("preact-resnet18", num_classes=10, input_shape=(1, 8, 8))
    named = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(shortcut_convs(model)) == sorted(n for n in named if "shortcut" in n) and len(named) == 20
    assert [n for n, _ in scored_convs(model)] == [n for n in named if "shortcut" not in n]
    assert shortcut_convs(_tiny()) == [] and len(scored_convs(_tiny())) == 3
    unl = copy.deepcopy(model)
    with torch.no_grad():
        for p in unl.parameters():
            p.add_(1.0)
    changes = neuron_weight_changes(model, unl)
    assert all("shortcut" not in n for n, _ in changes)
    work = copy.deepcopy(model)
    zero_top_weights_(work, changes, 1.0, 1.0)
    for n, m in work.named_modules():
        if isinstance(m, nn.Conv2d):
            ref = model.get_submodule(n).weight
            assert torch.equal(m.weight, ref) if "shortcut" in n else bool((m.weight == 0).all()), n


def test_model_without_convolutions_is_refused():
    model = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(InputError, match="no nn.Conv2d"):
        purifiers.make("tsbd", **FAST).purify(model, _data(), seed=0)


def test_unlearning_cap_is_a_clear_error(backdoored_digits):
    # a trained model at a step size that cannot move it: neither accurate <= 0 nor collapsed after 2 epochs
    b = backdoored_digits
    with pytest.raises(InputError, match="max_unlearn_epochs=2.*larger lr_unlearn"):
        purifiers.make("tsbd", **dict(FAST, lr_unlearn=1e-9, max_unlearn_epochs=2, unlearn_acc=0.0)).purify(
            b["model"], b["clean"], seed=0)


def test_unlearning_stops_when_the_model_collapses_onto_one_class(backdoored_digits):
    """unlearn_acc 0 cannot be reached by a model that answers one class (its accuracy is that class's share):
    the official rule alone ascends until the loss is NaN (seen on digits at the 10% target, where the collapsed
    class held 11.4% of 201 images); the collapse rule stops at the first epoch with a single predicted class."""
    b = backdoored_digits
    method = purifiers.make("tsbd", **dict(FAST, n=0.1, unlearn_acc=0.0, max_unlearn_epochs=200))
    out = method.purify(b["model"], b["clean"], seed=0)
    assert method.unlearn_stop_ == "collapsed" and method.unlearn_epochs_ < 200
    assert all(torch.isfinite(t).all() for t in out.state_dict().values())
    # the first collapsed epoch, checked against an independent re-run of the same ascent
    unlearned = copy.deepcopy(b["model"])
    opt = torch.optim.SGD(unlearned.parameters(), lr=FAST["lr_unlearn"], momentum=0.9)
    data, _ = split_validation(b["clean"], TwoStageBackdoorDefense.validation_fraction, 0)  # what purify fits on
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for epoch in range(1, method.unlearn_epochs_ + 1):
            unlearned.train()
            for s in range(0, len(data), FAST["batch_size"]):
                loss = F.cross_entropy(unlearned(data.x[s : s + 64]), data.y[s : s + 64])
                opt.zero_grad()
                (-loss).backward()
                opt.step()
            with torch.no_grad():
                pred = unlearned.eval()(data.x).argmax(1)
            assert (len(pred.unique()) == 1) == (epoch == method.unlearn_epochs_), epoch
    assert unlearning_done(pred, data.y, 0.0) == "collapsed"
    assert float((pred == data.y).float().mean()) > 0.0  # the official rule would never have stopped


class _NaNAfterOneStep(nn.Module):
    """A digits CNN plus a parameter whose gradient is NaN while the loss stays finite (``sqrt(b - b)`` at 0):
    after one SGD step that parameter, and then every logit, is NaN."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.bad = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 0.0 * torch.sqrt(self.bad - self.bad)


def test_unlearning_refuses_non_finite_weights_instead_of_calling_them_collapsed():
    """NaN logits all argmax to class 0, which looks like a collapse onto one class: the unlearning checks the
    weights first (one step per epoch, so the NaN appears at the epoch's end)."""
    model = _NaNAfterOneStep(_tiny())
    pred = torch.full((80,), float("nan")).view(8, 10).argmax(1)
    assert unlearning_done(pred, torch.arange(8), 0.1) == "collapsed"  # what the weights check prevents
    with pytest.raises(InputError, match="unlearning diverged at epoch 1 \\(non-finite weights"):
        purifiers.make("tsbd", **dict(FAST, n=0.1, batch_size=256)).purify(model, _data(), seed=0)


# ---------------------------------------------------------------------------------------------- stage 2
def test_two_pass_update_equals_mixed_gradient():
    torch.manual_seed(0)
    model = build_model("digits-bn-cnn", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,), std=(0.25,))
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    r, alpha, lr = 0.05, 0.7, 0.1
    # independent computation on separate copies (as the official deep copy per batch)
    first = copy.deepcopy(model).train()
    g1 = torch.autograd.grad(F.cross_entropy(first(x), y), list(first.parameters()))
    second = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, g in zip(second.parameters(), g1):
            p.add_(r * g / g.norm())
    g2 = torch.autograd.grad(F.cross_entropy(second(x), y), list(second.parameters()))
    expected = [p.detach() - lr * ((1 - alpha) * a + alpha * b) for p, a, b in zip(model.parameters(), g1, g2)]
    model.train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    regulated_step(model, params, x, y, opt, r, alpha, 10)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    # BN running statistics saw the unperturbed forward only (as the first copy)
    for b, e in zip(model.buffers(), first.buffers()):
        torch.testing.assert_close(b, e)


# ---------------------------------------------------------------------------------------------- API
def test_determinism_rng_and_fixed_n():
    model, data = _tiny(), _data()
    rng_before = torch.get_rng_state()
    a = purifiers.make("tsbd", **FAST).purify(model, data, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before), "global RNG was touched"
    b = purifiers.make("tsbd", **FAST).purify(model, data, seed=3)
    c = purifiers.make("tsbd", **FAST).purify(model, data, seed=4)
    assert same_state(state_of(a), state_of(b))
    assert not same_state(state_of(a), state_of(c))
    method = purifiers.make("tsbd", **FAST)
    sel = method.purify(model, data, seed=3)
    fixed = purifiers.make("tsbd", **dict(FAST, n=method.selected_n_))
    assert same_state(state_of(fixed.purify(model, data, seed=3)), state_of(sel))
    assert fixed.selected_n_ == method.selected_n_ and len(fixed.selection_log_) == 1


def test_no_acceptable_candidate_warns_and_keeps_the_most_accurate(monkeypatch):
    import purifiers.tsbd as mod

    model, data = _tiny(), _data()
    train, val = split_validation(data, 0.2, seed=0)
    real = mod._accuracy
    scripted = iter([1.0, 0.5, 0.7, 0.7])  # base, then n = 0.9, 0.5, 0.1 (evaluated from the largest down)

    def fake(m, d, dev, bs):
        return next(scripted) if d is val else real(m, d, dev, bs)

    monkeypatch.setattr(mod, "_accuracy", fake)
    method = purifiers.make("tsbd", **dict(FAST, n_candidates=(0.1, 0.5, 0.9), max_val_drop=0.2))
    with pytest.warns(UserWarning, match="no candidate n"):
        method.purify(model, train, validation=val, seed=0)
    assert [d["n"] for d in method.selection_log_] == [0.9, 0.5, 0.1]
    assert not any(d["accepted"] for d in method.selection_log_)
    assert method.selected_n_ == 0.1  # highest validation accuracy, ties to the smaller n
    scripted = iter([1.0, 0.5, 0.85])  # 0.85 >= 1.0 - 0.2: n = 0.5 accepted, 0.1 never tried
    method.purify(model, train, validation=val, seed=0)
    assert method.selected_n_ == 0.5 and [d["accepted"] for d in method.selection_log_] == [False, True]


@pytest.mark.parametrize("param, value", [
    ("n", 0.0), ("n", 1.5), ("n_candidates", ()), ("n_candidates", (0.1, 2.0)), ("n_candidates", "0.1"),
    ("max_val_drop", -0.1), ("m", 0.0), ("m", 1.1), ("lr_unlearn", 0.0), ("max_unlearn_epochs", 0),
    ("unlearn_acc", 1.5), ("lr", -1.0), ("momentum", 1.0), ("ft_epochs", 0), ("r", -0.1), ("alpha", 1.2),
    ("batch_size", 0), ("device", "tpu"),
])
def test_bad_parameters_name_themselves(param, value):
    with pytest.raises(InputError, match=param):
        purifiers.make("tsbd", **{param: value}).purify(_tiny(), _data(), seed=0)


def test_defaults_and_tags():
    m = purifiers.make("tsbd")
    assert m.n is None and tuple(m.n_candidates) == OFFICIAL_N_CANDIDATES
    assert (m.lr_unlearn, m.m, m.r, m.alpha, m.lr, m.ft_epochs, m.batch_size) == (1e-4, 0.7, 0.05, 0.7, 0.01, 20, 256)
    assert purifiers.available()["tsbd"]["uses_validation"] is True
    assert "device" not in TwoStageBackdoorDefense.fast_params
