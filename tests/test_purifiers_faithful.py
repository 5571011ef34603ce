"""Faithfulness of NPD, RNP, SAU, ANP and I-BAU to their official code (SCLBD/BackdoorBench, the original
repositories; purifier-notes.md sections 3, 4, 6) and the shared small-budget warning of every purifier:
each test checks one behaviour on a tiny model and tiny data (seconds on a CPU)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import purifiers
from certkit.backdoor.data import ArrayDataset
from purifiers.anp import ascend_noise_, prune_by_threshold
from purifiers.base import MIN_STEPS_PER_EPOCH, SmallBudgetWarning
from purifiers.npd import Polarized
from purifiers.rnp import mask_gammas
from purifiers.sau import shared_loss


def _data(n: int = 40, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.arange(n) % 10, 10)


def _cnn(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(4)] if bn else []
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *norm, nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()


def _polarizer(model: nn.Module):
    return next(m for m in model.modules() if isinstance(m, Polarized)).polarizer


# ---------------------------------------------------------------------------------------------------- NPD
@pytest.mark.parametrize("train_bn", [False, True])
def test_npd_polarizer_bn_statistics_fixed_in_the_main_loop_by_default(train_bn):
    # Official (BackdoorBench defense/npd.py): plug_layer.eval() in the main loop, so only the warm-up (train
    # mode) moves the running statistics. train_bn=True (its Tiny-ImageNet branch) updates them on the clean
    # forward only. 40 samples, batch 10: 4 batches per epoch.
    model, data = _cnn(), _data()
    runs = {}
    for epochs in (1, 2):
        method = purifiers.make("npd", epochs=epochs, warm_epochs=1, batch_size=10, train_bn=train_bn, device="cpu")
        runs[epochs] = _polarizer(method.purify(model, data, seed=0)).bn
    for epochs, bn in runs.items():
        assert int(bn.num_batches_tracked) == 4 + (2 * 4 * epochs if train_bn else 0)
    same = torch.equal(runs[1].running_mean, runs[2].running_mean) and torch.equal(runs[1].running_var,
                                                                                    runs[2].running_var)
    assert same != train_bn


@pytest.mark.filterwarnings("ignore::purifiers.SmallBudgetWarning")
def test_npd_warm_up_is_plain_sgd_on_cross_entropy():
    # Official warm-up: torch.optim.SGD(plug_layer.parameters(), lr=1e-4), no momentum, no weight decay,
    # polarizer (BN included) in train mode. Full batches, 2 warm-up epochs at a large warm_lr; the main loop
    # runs at lr 1e-30 (a no-op), so the returned polarizer is the warm-up's.
    model, data = _cnn(), _data()
    common = dict(epochs=1, lr=1e-30, batch_size=len(data), device="cpu")
    init = purifiers.make("npd", warm_epochs=0, **common).purify(model, data, seed=0)
    warmed = purifiers.make("npd", warm_epochs=2, warm_lr=0.5, **common).purify(model, data, seed=0)

    def reference(momentum: float) -> list[torch.Tensor]:
        net = copy.deepcopy(init)
        pol = _polarizer(net)
        pol.train()
        opt = torch.optim.SGD(pol.parameters(), lr=0.5, momentum=momentum)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(data.x), data.y).backward()
            opt.step()
        return [q.detach() for q in pol.parameters()]

    got = [q.detach() for q in _polarizer(warmed).parameters()]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, reference(0.0)))
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, reference(0.9)))


# ---------------------------------------------------------------------------------------------------- RNP
@pytest.mark.parametrize("training", [False, True])
def test_rnp_mask_scales_gamma_only_so_a_zero_mask_outputs_beta(training):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -2.0, 0.7]))
        bn.bias.copy_(torch.tensor([0.3, -0.4, 1.1]))
        bn.running_mean.copy_(torch.tensor([0.1, 0.2, -0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
    bn.train(training)
    x = torch.randn(5, 3, 4, 4)
    mask = torch.tensor([0.0, 0.5, 1.0])
    stats = (None, None) if training else (bn.running_mean.clone(), bn.running_var.clone())
    expected = F.batch_norm(x, *stats, bn.weight * mask, bn.bias, training, 0.0, bn.eps)
    handles = mask_gammas([("bn", bn)], {"bn": mask})
    try:
        out = bn(x)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 0.3))  # mask 0: the channel outputs beta


# ---------------------------------------------------------------------------------------------------- SAU
def test_sau_shared_loss_sums_over_poison_samples_and_divides_by_the_batch():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 0.0], [-0.5, 0.2, 1.0], [1.0, 1.0, 1.0]],
                          requires_grad=True)
    yhat_ref = torch.tensor([0, 1, 2, 0])
    poison = torch.tensor([True, False, True, False])
    p = F.softmax(logits.detach(), dim=1)[torch.arange(4), yhat_ref]
    closed = (-math.log(1 - float(p[0])) - math.log(1 - float(p[2]))) / 4  # sum over poison / batch size 4
    got = shared_loss(logits, yhat_ref, poison)
    assert float(got.detach()) == pytest.approx(closed, rel=1e-4)
    assert float(got.detach()) != pytest.approx(closed * 2, rel=1e-2)  # not the mean over the 2 poison samples
    got.backward()
    assert torch.equal(logits.grad[~poison], torch.zeros_like(logits.grad[~poison]))
    # p < 0.001 is clamped (official): such a sample adds a constant, no gradient
    tiny = torch.tensor([[-10.0, 10.0, 0.0]], requires_grad=True)
    loss = shared_loss(tiny, torch.tensor([0]), torch.tensor([True]))
    assert float(loss.detach()) == pytest.approx(-0.5 * (math.log(1e-6 + 0.999) + math.log(1 + 1e-6 - 0.001)), rel=1e-5)
    loss.backward()
    assert torch.equal(tiny.grad, torch.zeros_like(tiny.grad))


@pytest.mark.parametrize("clean_pred, forwards", [(1, 3), (0, 1)])
def test_sau_shared_early_stop_uses_each_models_clean_prediction(clean_pred, forwards):
    # Both models predict class 1 whatever the input; the true label is 0. The official rule calls a sample a
    # shared adversarial example when both predictions changed from the models' own clean predictions (to the
    # same label): with clean predictions 1 nothing is shared and PGD runs all 3 steps; with clean predictions
    # 0 everything is shared at once. (The former true-label rule stopped at once in both cases.)
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.fill_(1e-3)
        lin.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    h = nn.Sequential(nn.Flatten(), lin).eval()
    ref = copy.deepcopy(h)
    calls = []
    lin.register_forward_hook(lambda *_: calls.append(1))
    method = purifiers.make("sau", pgd_steps=3, device="cpu")
    x, y = torch.rand(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    clean = torch.full((2,), clean_pred)
    x_adv = method._shared_pgd(h, ref, x, y, clean, clean, method._validate())
    assert len(calls) == forwards
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6


# ---------------------------------------------------------------------------------------------------- ANP
def test_anp_prunes_a_neuron_whose_mask_equals_the_threshold():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    masks = {"1": torch.tensor([0.2, 0.3, 0.1])}
    assert prune_by_threshold(model, masks, 0.2) == 2  # official: mask <= threshold
    assert model[1].weight.tolist() == [0.0, 2.0, 0.0]
    assert model[1].bias.tolist() == [0.0, 0.0, 0.0]  # beta kept (its initial zeros)


def test_anp_noise_ascent_is_unclipped_by_default_and_clip_noise_bounds_it():
    eps = 0.4
    for clip, expected in ((False, [0.7, -0.7, -0.3]), (True, [0.4, -0.4, -0.3])):
        xi = torch.tensor([0.3, -0.3, 0.1], requires_grad=True)
        c = torch.tensor([1.0, -1.0, -1.0])
        ascend_noise_([xi], lambda xi=xi, c=c: (xi * c).sum(), eps, 1, clip)  # gradient sign = sign(c)
        assert torch.allclose(xi.detach(), torch.tensor(expected))
    assert purifiers.make("anp").clip_noise is False


def test_anp_clip_noise_option_reaches_the_masks():
    model, data = _cnn(bn=True), _data()
    masks = {}
    for clip in (False, True):
        method = purifiers.make("anp", n_iters=3, batch_size=10, eps=0.4, clip_noise=clip, device="cpu")
        method.purify(model, data, seed=0)
        masks[clip] = method.masks_
    assert any(not torch.equal(masks[False][k], masks[True][k]) for k in masks[False])


# -------------------------------------------------------------------------------------------------- I-BAU
def test_ibau_keeps_the_model_in_eval_mode_so_bn_statistics_never_change():
    model, data = _cnn(bn=True), _data()
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    out = purifiers.make("i-bau", n_rounds=1, K=1, batch_size=10, portion=1.0, lr=1e-2, device="cpu").purify(
        model, data, seed=0)
    after = out.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in bn_before.items())
    assert not torch.equal(model[0].weight, out[0].weight)  # the weights were trained


def test_ibau_records_the_unprojected_perturbation_norm_of_each_round():
    """delta_norms_ is the search's norm before the projection: the same whatever the radius in round 1 (the
    model has not been trained yet), and the radius does not cap it."""
    model, data = _cnn(), _data()
    norms = {}
    for radius in (0.01, 100.0):
        method = purifiers.make("i-bau", n_rounds=2, K=1, batch_size=10, portion=1.0, delta_norm=radius,
                                device="cpu")
        method.purify(model, data, seed=0)
        assert len(method.delta_norms_) == 2 and all(math.isfinite(v) for v in method.delta_norms_)
        norms[radius] = method.delta_norms_
    assert norms[0.01][0] == pytest.approx(norms[100.0][0]) and norms[0.01][0] > 0.01


# ------------------------------------------------------------------------------------------ small budgets
def test_small_budget_warns_and_is_recorded():
    model, data = _cnn(), _data(n=20)
    method = purifiers.make("ft", epochs=1, batch_size=128, device="cpu")
    with pytest.warns(SmallBudgetWarning, match="batch_size 128 >= clean samples 20: one step per epoch") as rec:
        method.purify(model, data, seed=0)
    assert "--param batch_size" in str(rec[0].message)
    assert method.budget_ == {"n_clean": 20, "batch_size": 128, "steps_per_epoch": 1,
                              "warning": str(rec[0].message)}
    method = purifiers.make("ft", epochs=1, batch_size=8, device="cpu")
    with pytest.warns(SmallBudgetWarning, match="batch_size 8 with 20 clean samples: 3 optimiser steps"):
        method.purify(model, data, seed=0)
    assert method.budget_["steps_per_epoch"] == 3


def test_enough_steps_or_no_epochs_means_no_warning():
    data = _data(n=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallBudgetWarning)
        method = purifiers.make("ft", epochs=1, batch_size=20 // MIN_STEPS_PER_EPOCH, device="cpu")
        method.purify(_cnn(), data, seed=0)
        assert method.budget_["steps_per_epoch"] == MIN_STEPS_PER_EPOCH and method.budget_["warning"] is None
        anp = purifiers.make("anp", n_iters=1, batch_size=128, device="cpu")  # an iteration budget
        anp.purify(_cnn(bn=True), data, seed=0)
        assert anp.budget_ is None
        clp = purifiers.make("clp", device="cpu")  # data-free
        clp.purify(_cnn(bn=True), data, seed=0)
        assert clp.budget_ is None
