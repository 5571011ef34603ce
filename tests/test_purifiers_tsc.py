"""TSC (Two-stage Symmetry Connectivity): permutation specs and matching, Bezier curves, BN re-estimation,
and the purifier itself on the BadNets digits model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import same_state, state_of
from torch import nn
from torch.func import functional_call

import purifiers
from certkit.backdoor.data import ArrayDataset
from certkit.backdoor.models import Normalize, build_model
from certkit.errors import InputError
from purifiers._common import find_head
from purifiers._curves import bezier_point, fit_bezier_curve, parameters_of, update_bn
from purifiers._permutation import (
    apply_permutations,
    group_correlation,
    match_permutations,
    permutation_spec,
    random_permutations,
)
from purifiers.tsc import nt_xent

SHAPES = {
    "digits-cnn": (1, 8, 8),
    "digits-bn-cnn": (1, 8, 8),
    "rab-mnist-cnn": (1, 16, 16),
    "preact-resnet18": (1, 8, 8),
}


def _model(arch: str, seed: int = 0) -> nn.Module:
    """A random model whose BatchNorm layers have non-trivial affine parameters and running statistics."""
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=10, input_shape=SHAPES[arch], mean=(0.5,), std=(0.25,))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _x(arch: str, n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPES[arch], generator=torch.Generator().manual_seed(seed))


def _spec(model: nn.Module, x: torch.Tensor):
    return permutation_spec(model, x, find_head(model, 10)[0])


# ---------------------------------------------------------------------------------------------- permutations
@pytest.mark.parametrize("arch", list(SHAPES))
def test_permutations_leave_the_function_unchanged(arch):
    model, x = _model(arch), _x(arch, 16 if arch == "preact-resnet18" else 40)
    spec = _spec(model, x)
    with torch.no_grad():
        ref = model(x)
    permuted = apply_permutations(copy.deepcopy(model), spec, random_permutations(spec, torch.Generator().manual_seed(3)))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, permuted.state_dict()[k])]
    assert changed, "a random permutation changed no weight"
    for maximize in (False, True):  # the computed min-/max-correlation matchings too
        matched = copy.deepcopy(permuted)
        match_permutations(model, matched, spec, x, maximize=maximize)
        with torch.no_grad():
            assert torch.allclose(matched(x), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(permuted(x), ref, atol=1e-5, rtol=1e-5)


def test_preact_spec_shares_one_permutation_per_residual_stream():
    model = _model("preact-resnet18")
    spec = _spec(model, _x("preact-resnet18", 4))
    streams = [g for g in spec if g.name.startswith("stream:")]
    assert [g.size for g in streams] == [64, 128, 256, 512]
    assert len(spec) == 4 + 8  # 4 streams + one internal (conv1 -> bn2 -> conv2) channel per block
    assert set(streams[0].producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert set(streams[1].producers) == {"layer2.0.shortcut.0", "layer2.0.conv2", "layer2.1.conv2"}
    assert ("layer2.0.shortcut.0", 1) in streams[0].consumers and ("linear", 1) in streams[3].consumers


def test_flatten_consumer_is_permuted_in_blocks_of_h_times_w():
    model = _model("digits-cnn")
    spec = _spec(model, _x("digits-cnn", 4))
    last_conv = [g for g in spec if any(b > 1 for _, b in g.consumers)]
    assert len(last_conv) == 1 and last_conv[0].consumers == [("classifier.1", 4)]  # 8x8 -> 2x2 after pooling


def test_unsupported_architecture_is_refused_naming_it():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = nn.Sequential(Normalize(0.5, 0.25), nn.Conv2d(1, 4, 3, padding=1), Residual(), nn.Flatten(),
                          nn.Linear(4 * 64, 10))
    with pytest.raises(InputError, match="does not support .*Residual"):
        permutation_spec(model, torch.rand(2, 1, 8, 8), "4")
    with pytest.raises(InputError, match="does not support"):
        purifiers.make("tsc", device="cpu", **purifiers.fast_params("tsc")).purify(
            model, ArrayDataset(torch.rand(20, 1, 8, 8), torch.arange(20) % 10, 10))


@pytest.mark.parametrize("arch", ["digits-bn-cnn", "preact-resnet18"])
def test_max_correlation_alignment_recovers_the_inverse_permutation(arch):
    model, x = _model(arch), _x(arch, 24 if arch == "preact-resnet18" else 60)
    spec = _spec(model, x)
    p = random_permutations(spec, torch.Generator().manual_seed(5))
    permuted = apply_permutations(copy.deepcopy(model), spec, p)
    q = match_permutations(model, permuted, spec, x, maximize=True)
    for pk, qk in zip(p, q):
        assert torch.equal(pk[qk], torch.arange(len(pk)))  # composition is the identity
    assert same_state(state_of(permuted), state_of(model))


def test_one_pass_matching_equals_the_sequential_official_loop():
    model, x = _model("digits-bn-cnn"), _x("digits-bn-cnn", 60)
    spec = _spec(model, x)
    other = _model("digits-bn-cnn", seed=7)  # an independent network: non-trivial matchings
    for maximize in (False, True):
        a, b = copy.deepcopy(other), copy.deepcopy(other)
        pa = match_permutations(model, a, spec, x, maximize=maximize)
        pb = match_permutations(model, b, spec, x, maximize=maximize, sequential=True)
        assert all(torch.equal(u, v) for u, v in zip(pa, pb))


def test_correlation_is_pearson_over_channels_with_positions_as_samples():
    model, x = _model("digits-cnn"), _x("digits-cnn", 30)
    other = _model("digits-cnn", seed=2)
    g = _spec(model, x)[0]  # first conv: 16 channels, 8x8 positions
    corr = group_correlation(model, other, g, x, eps=0.0)
    conv_a, conv_b = model.features[0], other.features[0]
    with torch.no_grad():
        a = conv_a(model.normalize(x)).permute(0, 2, 3, 1).reshape(-1, 16).double().numpy()
        b = conv_b(other.normalize(x)).permute(0, 2, 3, 1).reshape(-1, 16).double().numpy()
    expected = np.corrcoef(a, b, rowvar=False)[:16, 16:]
    np.testing.assert_allclose(corr.numpy(), expected, atol=1e-8)


def test_min_correlation_matching_lowers_the_total_correlation():
    model, x = _model("digits-bn-cnn"), _x("digits-bn-cnn", 60)
    spec = _spec(model, x)
    other = copy.deepcopy(model)
    corrs = [group_correlation(model, other, g, x) for g in spec]
    perms = match_permutations(model, other, spec, x, maximize=False)
    gen = torch.Generator().manual_seed(0)
    for g, c, perm in zip(spec, corrs, perms):
        identity_total = float(torch.diagonal(c).sum())
        assert identity_total > 0.5 * g.size  # a copy correlates ~1 with itself (less for near-constant channels)
        total = float(c[torch.arange(g.size), perm].sum())
        assert total < identity_total and total < 0  # anti-correlated pairs are chosen
        randoms = [float(c[torch.arange(g.size), torch.randperm(g.size, generator=gen)].sum()) for _ in range(50)]
        assert total <= min(randoms) + 1e-9  # the Hungarian optimum beats random matchings
        after = group_correlation(model, other, g, x)  # measured on the permuted copy: same total
        assert float(torch.diagonal(after).sum()) == pytest.approx(total, abs=1e-6)


# ---------------------------------------------------------------------------------------------- curves
def test_bezier_curve_reproduces_its_endpoints_exactly():
    a, b = parameters_of(_model("digits-bn-cnn", 0)), parameters_of(_model("digits-bn-cnn", 1))
    mid = {k: torch.randn_like(v) for k, v in a.items()}
    at0, at1, half = bezier_point(a, mid, b, 0.0), bezier_point(a, mid, b, 1.0), bezier_point(a, mid, b, 0.5)
    assert all(torch.equal(at0[k], a[k]) and torch.equal(at1[k], b[k]) for k in a)
    assert all(torch.allclose(half[k], 0.25 * a[k] + 0.5 * mid[k] + 0.25 * b[k]) for k in a)
    model, x = _model("digits-bn-cnn", 0), _x("digits-bn-cnn", 8)
    with torch.no_grad():
        assert torch.equal(functional_call(model, at0, (x,)), model(x))


def test_curve_fit_trains_only_the_middle_point():
    model, x = _model("digits-cnn", 0), _x("digits-cnn", 32)
    data = ArrayDataset(x, torch.arange(32) % 10, 10)
    a, b = parameters_of(model), parameters_of(_model("digits-cnn", 1))
    a0, b0 = {k: v.clone() for k, v in a.items()}, {k: v.clone() for k, v in b.items()}

    def loss(forward, xb, yb, gen):
        return nn.functional.cross_entropy(forward(xb), yb)

    mid = fit_bezier_curve(copy.deepcopy(model), a, b, data, loss, epochs=2, lr=0.05, momentum=0.9,
                           weight_decay=0.0, curve_wd=0.0, batch_size=16, generator=torch.Generator().manual_seed(0),
                           device=torch.device("cpu"))
    assert all(torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k]) for k in a)
    assert any(not torch.allclose(mid[k], 0.5 * (a[k] + b[k])) for k in a)


def test_bn_reestimation_matches_the_data_mean_of_each_layer_input():
    model, x = _model("digits-bn-cnn"), _x("digits-bn-cnn", 50)
    data = ArrayDataset(x, torch.arange(50) % 10, 10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # several batches (16, 16, 16, 2): the first BN's input does not depend on batch composition
    update_bn(model, data, batch_size=16, device=torch.device("cpu"))
    with torch.no_grad():
        first_in = model.features[0](model.normalize(x))
    assert torch.allclose(bns[0].running_mean, first_in.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not model.training
    # one batch: every BN's running mean / variance equals its input's mean / unbiased variance over the data
    probe = copy.deepcopy(model).train()
    inputs: list[torch.Tensor] = []
    for m in probe.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        probe(x)
    update_bn(model, data, batch_size=64, device=torch.device("cpu"))
    for bn, inp in zip(bns, inputs):
        assert torch.allclose(bn.running_mean, inp.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(bn.running_var, inp.var(dim=(0, 2, 3), unbiased=True), atol=1e-4, rtol=1e-4)


def test_nt_xent_closed_form():
    n, tau = 4, 0.5
    z = torch.eye(n, 8)  # orthonormal embeddings, views identical: positive sim 1/tau, negatives 0
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * n - 2))
    assert float(nt_xent(z, z, tau)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- purifier
@pytest.mark.parametrize("param, value", [
    ("rounds", 0), ("t", 1.5), ("curve_epochs", 0), ("curve_lr", 0.0), ("batch_size", 0), ("momentum", 1.0),
    ("weight_decay", -1.0), ("curve_wd", -1.0), ("ft_epochs", -1), ("ft_lr", 0.0), ("loss", "mse"),
    ("temperature", 0.0), ("device", "tpu"),
])
def test_bad_parameters_are_input_errors_naming_them(param, value):
    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    data = ArrayDataset(torch.rand(20, 1, 8, 8), torch.arange(20) % 10, 10)
    with pytest.raises(InputError, match=param):
        purifiers.make("tsc", **{param: value}).purify(model, data)


def test_tags_and_defaults():
    tags = purifiers.available()["tsc"]
    assert tags["needs_labels"] and tags["changes"] == "weights" and not tags["uses_validation"]
    p = purifiers.make("tsc").get_params()
    assert (p["rounds"], p["t"], p["curve_epochs"], p["curve_lr"], p["batch_size"]) == (3, 0.4, 200, 0.02, 256)
    assert (p["curve_wd"], p["weight_decay"], p["ft_epochs"], p["ft_lr"], p["loss"]) == (1e-4, 5e-4, 10, 1e-4, "ce")


# Budget for the ASR test: 2 rounds x 2 curves x 20 curve epochs at batch 64 (251 clean images: 4 steps per
# epoch), 2 fine-tuning epochs between the rounds.
DIGITS_BUDGET = dict(rounds=2, curve_epochs=20, ft_epochs=2, batch_size=64, curve_lr=0.05)


@pytest.fixture(scope="module")
def purified_digits(backdoored_digits):
    d = backdoored_digits
    before = state_of(d["model"])
    out = purifiers.make("tsc", device="cpu", **DIGITS_BUDGET).purify(d["model"], d["clean"], seed=0)
    return d, before, out


def test_tsc_lowers_badnets_asr_on_digits(purified_digits):
    d, before, out = purified_digits
    assert same_state(state_of(d["model"]), before), "the input model was modified"
    assert isinstance(next(out.children()), Normalize) and out.certkit_spec == d["model"].certkit_spec
    assert not out.training
    r = purifiers.evaluate(d["model"], out, d["test"], d["triggered"], device="cpu")
    # Observed (seed 0): CA 0.957 -> 0.935, ASR 0.981 -> 0.233 (1 round of 20 curve epochs: ASR 0.54, CA
    # 0.943); margins: CA drop <= 5 points, ASR below 0.7 (it was ~1.0).
    assert r.asr_before > 0.9
    assert r.asr_after < 0.7
    assert r.ca_after >= r.ca_before - 0.05


def test_determinism_and_seed_dependence(backdoored_digits_bn):
    d = backdoored_digits_bn
    kw = dict(rounds=2, curve_epochs=2, ft_epochs=1, batch_size=64, device="cpu")
    rng_before = torch.get_rng_state()
    a = purifiers.make("tsc", **kw).purify(d["model"], d["clean"], seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG was touched"
    b = purifiers.make("tsc", **kw).purify(d["model"], d["clean"], seed=1)
    c = purifiers.make("tsc", **kw).purify(d["model"], d["clean"], seed=2)
    assert same_state(state_of(a), state_of(b))
    assert not same_state(state_of(a), state_of(c))


def test_simclr_curves_never_read_the_labels(backdoored_digits_bn):
    d = backdoored_digits_bn
    clean = d["clean"]
    shuffled = ArrayDataset(clean.x, clean.y[torch.randperm(len(clean), generator=torch.Generator().manual_seed(0))],
                            clean.num_classes)
    kw = dict(rounds=2, curve_epochs=2, ft_epochs=3, batch_size=64, loss="simclr", device="cpu")
    a = purifiers.make("tsc", **kw).purify(d["model"], clean, seed=0)
    b = purifiers.make("tsc", **kw).purify(d["model"], shuffled, seed=0)
    assert same_state(state_of(a), state_of(b))
    logits = a(d["test"].x[:8])
    assert logits.shape == (8, 10) and bool(torch.isfinite(logits).all())
