"""Classic purification baselines RNP, CLP, FT-SAM and the re-activation (retuning) check: effect on the
BadNets digits models, closed-form checks (UCLC rule, ASAM perturbation and step, RNP pruning), the
structural conv/BN pairing of pre-activation blocks, determinism, input immutability, parameter errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import same_state, state_of
from torch import nn

import purifiers
from certkit.backdoor.data import ArrayDataset, load_digits
from certkit.backdoor.models import Normalize, build_model
from certkit.errors import InputError
from purifiers.clp import channel_lipschitz, conv_bn_pairs
from purifiers.ft_sam import asam_perturbation
from purifiers.reactivation import reactivate, reactivation_asr


def _data(shape=(1, 8, 8), n=40, seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.arange(n) % 10, 10)


def _report(setup, purified):
    return purifiers.evaluate(setup["model"], purified, setup["test"], setup["triggered"], device="cpu")


# ------------------------------------------------------------------------------------------------ RNP
@pytest.fixture(scope="module")
def rnp_default(backdoored_digits_bn):
    setup = backdoored_digits_bn
    before = state_of(setup["model"])
    method = purifiers.make("rnp", device="cpu")
    purified = method.purify(setup["model"], setup["clean"], seed=0)
    assert same_state(state_of(setup["model"]), before)
    return method, purified, _report(setup, purified)


def test_rnp_on_digits_default_threshold_collapses_the_toy(rnp_default):
    # RNP does not work on this toy. The unlearning stage (<= 20 epochs, stop below 20% running accuracy;
    # observed 9 epochs) leaves a model that predicts one class with CE ~ 90, and the recovery masks of the
    # last BN layer (the one feeding the 2-layer MLP head) all go to ~0: with the official fixed threshold
    # 0.7 the whole last conv block is pruned. Observed (seed 0): CA 0.985 -> 0.102, ASR 1.000 -> 0.000,
    # 38 neurons pruned, ~3 s on an idle 2-core CPU. The ASR "drop" is an accuracy collapse, which is why
    # certkit offers threshold="validation" (next test).
    method, _, r = rnp_default
    assert r.ca_before > 0.95 and r.asr_before > 0.95
    assert r.asr_after < 0.1
    assert r.ca_after < 0.5
    assert method.threshold_ == 0.7 and method.num_pruned_ >= 32


def test_rnp_masks_in_unit_interval_and_pruning_zeroes_exactly_the_masked_neurons(backdoored_digits_bn,
                                                                                  rnp_default):
    method, purified, _ = rnp_default
    original = dict(backdoored_digits_bn["model"].named_modules())
    pruned = dict(purified.named_modules())
    bn_names = [n for n, m in original.items() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(method.masks_) == sorted(bn_names)
    total = 0
    for name, mask in method.masks_.items():
        assert mask.shape == (original[name].num_features,)
        assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
        sel = mask <= method.threshold_
        total += int(sel.sum())
        assert torch.equal(pruned[name].weight[sel], torch.zeros(int(sel.sum())))
        assert torch.equal(pruned[name].weight[~sel], original[name].weight[~sel])
        assert torch.equal(pruned[name].bias, original[name].bias)  # beta kept, as in the official code
    assert total == method.num_pruned_
    a, b = state_of(backdoored_digits_bn["model"]), state_of(purified)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.endswith(".weight") and k.rsplit(".", 1)[0] in method.masks_ for k in changed)
    assert isinstance(next(purified.children()), Normalize)


def test_rnp_validation_threshold_refuses_to_prune_when_every_threshold_costs_accuracy(backdoored_digits_bn):
    # Data-honest selection: every grid threshold prunes the collapsed last BN layer, so the validation
    # accuracy (20% stratified split of the clean data) falls to ~0.08 < 0.9 x base at every threshold;
    # nothing is pruned and the model is returned unchanged (observed: CA 0.985, ASR 1.000 unchanged).
    setup = backdoored_digits_bn
    method = purifiers.make("rnp", threshold="validation", device="cpu")
    purified = method.purify(setup["model"], setup["clean"], seed=0)
    assert sorted(method.validation_curve_) == list(purifiers.rnp.THRESHOLD_GRID)
    base = purifiers.rnp._accuracy(setup["model"], _split_val(setup["clean"]), torch.device("cpu"))
    acceptable = [t for t, acc in method.validation_curve_.items() if acc >= 0.9 * base]
    assert method.threshold_ == (max(acceptable) if acceptable else -1.0)
    if not acceptable:
        assert method.num_pruned_ == 0 and same_state(state_of(purified), state_of(setup["model"]))


def _split_val(clean):
    from purifiers._common import split_validation

    return split_validation(clean, purifiers.make("rnp").validation_fraction, 0)[1]


def test_rnp_prunes_selected_threshold_on_an_explicit_validation_split():
    torch.manual_seed(0)
    model = build_model("digits-bn-cnn", num_classes=10, input_shape=(1, 8, 8))
    method = purifiers.make("rnp", threshold="validation", device="cpu", **purifiers.fast_params("rnp"))
    val = _data(n=30, seed=5)
    out = method.purify(model, _data(n=60), validation=val, seed=0)
    t = method.threshold_
    if t >= 0:
        expected = sum(int((m <= t).sum()) for m in method.masks_.values())
        assert method.num_pruned_ == expected
        assert math.isclose(method.validation_curve_[t], purifiers.rnp._accuracy(out, val, torch.device("cpu")))


# ------------------------------------------------------------------------------------------------ CLP
def _conv_bn_net(channels=16, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Conv2d(1, channels, 3, padding=1, bias=False),
                        nn.BatchNorm2d(channels), nn.ReLU(), nn.Flatten(), nn.Linear(channels * 64, 10))
    with torch.no_grad():
        net[2].weight.uniform_(0.8, 1.2)
        net[2].bias.uniform_(-0.1, 0.1)
        net[2].running_var.uniform_(0.8, 1.2)
    return net.eval()


def test_uclc_matches_an_independent_svd():
    net = _conv_bn_net()
    conv, bn = net[1], net[2]
    w = conv.weight.detach().numpy().astype(np.float64)
    expected = [np.linalg.svd(w[k].reshape(w.shape[1], -1), compute_uv=False).max()
                * abs(bn.weight[k].item() / math.sqrt(bn.running_var[k].item() + bn.eps))
                for k in range(w.shape[0])]
    np.testing.assert_allclose(channel_lipschitz(conv, bn).numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("how", ["weight", "bn_scale"])
def test_clp_zeroes_exactly_the_outlier_channel(how):
    net = _conv_bn_net()
    with torch.no_grad():
        if how == "weight":
            net[1].weight[5] *= 20.0
        else:
            net[2].running_var[5] = 1e-4  # |gamma / sigma| explodes
    before = state_of(net)
    method = purifiers.make("clp", device="cpu")
    out = method.purify(net, _data(), seed=0)
    assert same_state(state_of(net), before)
    assert method.pruned_ == {"2": [5]}
    keep = torch.arange(16) != 5
    assert float(out[2].weight.detach()[5]) == 0.0 and float(out[2].bias.detach()[5]) == 0.0
    assert torch.equal(out[2].weight[keep], net[2].weight[keep])
    assert torch.equal(out[2].bias[keep], net[2].bias[keep])
    assert torch.equal(out[1].weight, net[1].weight)
    # a huge u prunes nothing
    assert same_state(state_of(purifiers.make("clp", u=100.0).purify(net, _data())), before)


def test_clp_pairs_preact_blocks_structurally():
    model = build_model("preact-resnet18", num_classes=10, input_shape=(1, 8, 8))
    pairs = conv_bn_pairs(model)
    expected = [("conv1", "layer1.0.bn1")]
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    for i, blk in enumerate(blocks):
        expected.append((f"{blk}.conv1", f"{blk}.bn2"))  # bn2 normalises conv1's output
        if i + 1 < len(blocks):  # conv2 (and shortcut) -> the NEXT block's bn1; the last conv2 has no BN
            expected.append((f"{blk}.conv2", f"{blocks[i + 1]}.bn1"))
            if blk.endswith(".0") and not blk.startswith("layer1"):
                expected.append((f"{blk}.shortcut.0", f"{blocks[i + 1]}.bn1"))
    assert sorted(pairs) == sorted(expected)
    assert ("layer1.0.conv2", "layer1.0.bn1") not in pairs  # the official registration-order pairing
    # planted outlier in a pre-activation block: conv2 of layer2.0 -> channel 7 of layer2.1.bn1
    with torch.no_grad():
        model.get_submodule("layer2.0.conv2").weight[7] *= 50.0
    method = purifiers.make("clp", device="cpu")
    out = method.purify(model, _data(), seed=0)
    assert 7 in method.pruned_.get("layer2.1.bn1", [])
    assert float(out.get_submodule("layer2.1.bn1").weight.detach()[7]) == 0.0


def test_clp_on_digits_does_not_fire(backdoored_digits_bn):
    # Honest result on the 8x8 toy (purifier-notes.md section 14 saw the same): with u = 3 CLP prunes one
    # channel of the last BN layer (observed: features.8 channel 28), which does not carry the backdoor.
    # Observed: CA 0.985 -> 0.983, ASR 1.000 -> 1.000, ~0.1 s.
    setup = backdoored_digits_bn
    method = purifiers.make("clp", device="cpu")
    out = method.purify(setup["model"], setup["clean"], seed=0)
    r = _report(setup, out)
    assert sum(len(v) for v in method.pruned_.values()) <= 2
    assert abs(r.ca_after - r.ca_before) < 0.02
    assert r.asr_after > 0.9


def test_clp_needs_conv_bn_pairs():
    net = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32),
                        nn.Linear(32, 10))
    with pytest.raises(InputError, match="no BatchNorm2d layer normalising a Conv2d"):
        purifiers.make("clp").purify(net, _data())


# ------------------------------------------------------------------------------------------------ FT-SAM
def test_asam_perturbation_closed_form():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    grads = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    rho = 2.0
    w = np.concatenate([p.numpy().ravel() for p in params]).astype(np.float64)
    gr = np.concatenate([q.numpy().ravel() for q in grads]).astype(np.float64)
    e_adaptive = rho * w ** 2 * gr / np.linalg.norm(np.abs(w) * gr)
    e_plain = rho * gr / np.linalg.norm(gr)
    for adaptive, expected in ((True, e_adaptive), (False, e_plain)):
        got = np.concatenate([e.numpy().ravel() for e in asam_perturbation(params, grads, rho, adaptive)])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    # ASAM's ball: ||T^-1 e|| = rho
    assert math.isclose(np.linalg.norm(e_adaptive / np.abs(w)), rho, rel_tol=1e-9)


def test_ft_sam_step_equals_the_two_pass_update():
    torch.manual_seed(0)
    net = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Flatten(), nn.Linear(64, 10))
    data = _data(n=20)
    lr, rho = 0.1, 0.5
    out = purifiers.make("ft-sam", rho=rho, epochs=1, lr=lr, momentum=0.0, weight_decay=0.0, batch_size=20,
                         device="cpu").purify(net, data, seed=0)
    w, b = net[2].weight.detach().clone(), net[2].bias.detach().clone()

    def grads(w_, b_):
        w_, b_ = w_.clone().requires_grad_(True), b_.clone().requires_grad_(True)
        z = (data.x.flatten(1) - 0.5) / 0.25
        F.cross_entropy(z @ w_.T + b_, data.y, label_smoothing=0.1).backward()
        return w_.grad, b_.grad

    gw, gb = grads(w, b)
    norm = torch.sqrt(((w.abs() * gw) ** 2).sum() + ((b.abs() * gb) ** 2).sum())
    ew, eb = rho * w ** 2 * gw / norm, rho * b ** 2 * gb / norm
    gw2, gb2 = grads(w + ew, b + eb)
    torch.testing.assert_close(out[2].weight, w - lr * gw2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2].bias, b - lr * gb2, rtol=1e-5, atol=1e-6)


def test_ft_sam_on_digits_lowers_asr_and_keeps_accuracy(backdoored_digits_bn):
    # 10 epochs at batch 32 (70 two-pass steps) instead of 100 at batch 256 (1 step/epoch on 251 images);
    # rho 2 as in the paper. Observed (seed 0): CA 0.985 -> 0.980, ASR 1.000 -> 0.195 (plain FT with the
    # same budget: ASR 1.000 -> 1.000); 20 epochs: ASR 0.121. ~10 s on an idle 2-core CPU. On the BN-less
    # digits CNN rho 2 is too large at this budget (CA 0.957 -> 0.49).
    setup = backdoored_digits_bn
    before = state_of(setup["model"])
    out = purifiers.make("ft-sam", epochs=10, batch_size=32, device="cpu").purify(setup["model"], setup["clean"],
                                                                                  seed=0)
    assert same_state(state_of(setup["model"]), before)
    r = _report(setup, out)
    assert r.asr_after < 0.5
    assert r.ca_after >= r.ca_before - 0.03


# ------------------------------------------------------------------------------------------------ shared
@pytest.mark.parametrize("name", ["rnp", "ft-sam"])
def test_determinism(name):
    torch.manual_seed(0)
    model = build_model("digits-bn-cnn", num_classes=10, input_shape=(1, 8, 8))
    data = _data(n=60)

    def run(seed):  # batch 16: several batches per epoch, so the seeded batch order matters
        method = purifiers.make(name, device="cpu", **{**purifiers.fast_params(name), "batch_size": 16})
        out = method.purify(model, data, seed=seed)
        return method, state_of(out)

    (m0, a), (mb, b), (m1, c) = run(0), run(0), run(1)
    assert same_state(a, b)
    if name == "rnp":  # the pruned set may coincide; the learned masks differ
        assert all(torch.equal(m0.masks_[k], mb.masks_[k]) for k in m0.masks_)
        assert any(not torch.equal(m0.masks_[k], m1.masks_[k]) for k in m0.masks_)
    else:
        assert not same_state(a, c)


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = build_model("digits-bn-cnn", num_classes=10, input_shape=(1, 8, 8))
    torch.manual_seed(123)
    for name in ("rnp", "ft-sam"):
        purifiers.make(name, device="cpu", **purifiers.fast_params(name)).purify(model, _data(), seed=3)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("rnp", {"unlearn_lr": 0}, "unlearn_lr"),
        ("rnp", {"unlearn_epochs": 0}, "unlearn_epochs"),
        ("rnp", {"clean_threshold": 1.5}, "clean_threshold"),
        ("rnp", {"max_grad_norm": -1}, "max_grad_norm"),
        ("rnp", {"mask_lr": float("nan")}, "mask_lr"),
        ("rnp", {"mask_epochs": 1.5}, "mask_epochs"),
        ("rnp", {"alpha": 0}, "alpha"),
        ("rnp", {"threshold": 1.2}, "threshold"),
        ("rnp", {"threshold": "test"}, "threshold"),
        ("rnp", {"max_relative_drop": -0.1}, "max_relative_drop"),
        ("rnp", {"batch_size": 0}, "batch_size"),
        ("rnp", {"momentum": 1.0}, "momentum"),
        ("rnp", {"weight_decay": -1}, "weight_decay"),
        ("rnp", {"device": "tpu"}, "device|tpu"),
        ("clp", {"u": -1.0}, "u must"),
        ("clp", {"u": float("inf")}, "u must"),
        ("ft-sam", {"rho": 0}, "rho"),
        ("ft-sam", {"adaptive": "yes"}, "adaptive"),
        ("ft-sam", {"label_smoothing": 1.0}, "label_smoothing"),
        ("ft-sam", {"epochs": 0}, "epochs"),
        ("ft-sam", {"lr": -1}, "lr"),
        ("ft-sam", {"momentum": 2}, "momentum"),
        ("ft-sam", {"weight_decay": float("nan")}, "weight_decay"),
        ("ft-sam", {"batch_size": True}, "batch_size"),
    ],
)
def test_bad_parameters_name_the_parameter(name, params, match):
    model = build_model("digits-bn-cnn", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match=match):
        purifiers.make(name, **params).purify(model, _data(), seed=0)


def test_tags_and_defaults():
    tags = purifiers.available()
    assert tags["rnp"]["changes"] == "pruning" and tags["rnp"]["needs_batchnorm"]
    assert tags["rnp"]["clean_fraction"] == 0.01
    assert tags["clp"]["data_free"] and not tags["clp"]["needs_labels"] and tags["clp"]["needs_batchnorm"]
    assert tags["ft-sam"]["changes"] == "weights"
    assert purifiers.make("rnp").get_params()["threshold"] == 0.7
    assert purifiers.make("clp").get_params()["u"] == 3.0
    p = purifiers.make("ft-sam").get_params()
    assert (p["rho"], p["label_smoothing"], p["epochs"], p["batch_size"], p["lr"]) == (2.0, 0.1, 100, 256, 0.01)


def test_ft_sam_diverges_clearly():
    model = build_model("digits-bn-cnn", num_classes=10, input_shape=(1, 8, 8))
    before = state_of(model)
    with pytest.raises(InputError, match="diverged|non-finite"):
        purifiers.make("ft-sam", lr=1e30, epochs=2, device="cpu").purify(model, _data(), seed=0)
    assert same_state(state_of(model), before)


# ------------------------------------------------------------------------------------------------ re-activation
@pytest.fixture(scope="module")
def poisoned_set(backdoored_digits):
    # a PoisonedDataset (with poison_indices): the attacker's retuning data
    return backdoored_digits["attack"].poison(load_digits().train, 0.1, target=0, seed=1)


def test_reactivation_brings_the_backdoor_back_after_fst(backdoored_digits, poisoned_set):
    # FST (20 epochs, batch 32, as in tests/test_purifiers.py) then the retuning check (5 poisoned samples,
    # 5 epochs, lr 0.01). Observed (seed 0): FST CA 0.957 -> 0.893, ASR 0.981 -> 0.091; after re-activation
    # ASR 1.000 for seeds 0-2 (superficial safety, as Min et al. report). ~3 s on an idle 2-core CPU.
    setup = backdoored_digits
    fst = purifiers.make("fst", epochs=20, batch_size=32, device="cpu").purify(setup["model"], setup["clean"],
                                                                              seed=0)
    r = _report(setup, fst)
    assert r.asr_after < 0.3
    before = state_of(fst)
    asr = reactivation_asr(fst, poisoned_set, setup["triggered"], seed=0, device="cpu")
    assert same_state(state_of(fst), before)
    assert asr >= r.asr_after + 0.5


def test_reactivate_uses_only_poisoned_samples_and_is_seeded(backdoored_digits, poisoned_set):
    model = backdoored_digits["model"]
    before = state_of(model)
    a = reactivate(model, poisoned_set, seed=0, device="cpu")
    b = reactivate(model, poisoned_set, seed=0, device="cpu")
    c = reactivate(model, poisoned_set, seed=1, device="cpu")
    assert same_state(state_of(model), before) and a is not model
    assert same_state(state_of(a), state_of(b))
    assert len(a.reactivation_indices_) == 5
    assert set(a.reactivation_indices_) <= set(poisoned_set.poison_indices.tolist())
    assert not np.array_equal(a.reactivation_indices_, c.reactivation_indices_)
    assert bool((poisoned_set.dataset.y[torch.from_numpy(a.reactivation_indices_)] == 0).all())
    assert not a.training
    # an ArrayDataset with explicit indices draws from those only
    d = reactivate(model, poisoned_set.dataset, indices=poisoned_set.poison_indices[:7], n_samples=7,
                   device="cpu")
    assert sorted(d.reactivation_indices_.tolist()) == poisoned_set.poison_indices[:7].tolist()


def test_reactivate_errors(backdoored_digits, poisoned_set):
    model = backdoored_digits["model"]
    with pytest.raises(InputError, match="n_samples"):
        reactivate(model, poisoned_set, n_samples=10_000)
    with pytest.raises(InputError, match="PoisonedDataset"):
        reactivate(model, [1, 2, 3])
    with pytest.raises(InputError, match="epochs"):
        reactivate(model, poisoned_set, epochs=0)
    with pytest.raises(InputError, match="indices"):
        reactivate(model, poisoned_set.dataset, indices=[10_000_000])
    with pytest.raises(InputError, match="TriggeredSet"):
        reactivation_asr(model, poisoned_set, backdoored_digits["test"])
