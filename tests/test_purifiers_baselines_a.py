"""Classic purification baselines: Fine-Pruning, ANP, NAD, I-BAU (purifiers/fine_pruning.py, anp.py, nad.py,
ibau.py): ASR drop on the BadNets digits fixtures, the core formula of each method checked independently,
selection on the validation split only, parameter validation, determinism and an untouched input model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import one_thread, same_state, state_of
from torch import nn

import purifiers
from certkit.backdoor.data import ArrayDataset
from certkit.backdoor.models import build_model
from certkit.errors import InputError
from purifiers._common import find_head, split_validation
from purifiers.anp import THRESHOLD_GRID, batchnorm_layers
from purifiers.fine_pruning import accuracy, prune_until
from purifiers.ibau import implicit_hypergradient
from purifiers.nad import attention_map, attention_sites

CPU = torch.device("cpu")


def _report(fx, out):
    return purifiers.evaluate(fx["model"], out, fx["test"], fx["triggered"], device="cpu")


# ------------------------------------------------------------------------------------------ ASR on digits
# Observed numbers are on an idle-ish 2-core CPU, seed 0 (see the comments of each fixture).
@pytest.fixture(scope="module")
def fp_run(backdoored_digits):
    fx = backdoored_digits
    method = purifiers.make("fine-pruning", epochs=FP_EPOCHS, device="cpu")
    out = method.purify(fx["model"], fx["clean"], seed=0)
    return method, out, _report(fx, out)


FP_EPOCHS = 20


def test_fine_pruning_lowers_asr_on_digits(fp_run, backdoored_digits):
    method, out, r = fp_run
    # Observed (seed 0, 20 fine-tuning epochs, defaults otherwise): 34 of the 64 hidden units feeding the head
    # pruned, CA 0.957 -> 0.950, ASR 0.981 -> 0.774 (100 epochs: 0.946 / 0.837; acc_drop 0.3: 40 units,
    # 0.950 / 0.708; pruning the last conv's channels instead behaved alike, 0.954 / 0.753). On this toy the
    # BadNets backdoor does not live in dormant units: FP lowers the ASR only partly. Margins: ASR at least
    # 0.1 lower, CA within 0.03.
    assert r.asr_before > 0.9
    assert r.asr_after < r.asr_before - 0.1
    assert r.ca_after > r.ca_before - 0.03
    assert method.n_pruned_ >= 1
    _, head = find_head(out, 10)
    zero_cols = (head.weight == 0).all(0)
    assert int(zero_cols.sum()) >= method.n_pruned_  # the pruning mask survived fine-tuning


def test_fine_pruning_stop_rule_is_independent_recomputation(backdoored_digits):
    """Rank the head's input units by mean clean activation, prune in 1% steps on the *given* validation set,
    keep the last mask before the 10% relative drop: the purifier prunes exactly that many units."""
    fx = backdoored_digits
    train, val = split_validation(fx["clean"], 0.2, seed=3)
    method = purifiers.make("fine-pruning", epochs=1, device="cpu")
    out = method.purify(fx["model"], train, validation=val, seed=0)
    model = copy.deepcopy(fx["model"]).eval()
    _, head = find_head(model, 10)
    feats = []
    h = head.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].detach()))
    with torch.no_grad():
        model(train.x)
    h.remove()
    order = torch.argsort(feats[0].mean(0), stable=True)
    w0 = head.weight.detach().clone()
    accs = []
    for k in range(head.in_features):
        with torch.no_grad():
            head.weight.copy_(w0)
            head.weight[:, order[:k]] = 0.0
            accs.append(float((model(val.x).argmax(1) == val.y).float().mean()))
    n = head.in_features
    expected, last = 0, 0
    for i in range(1, 101):
        k = min(int(math.floor(i * 0.01 * n + 1e-9)), n - 1)
        if k <= last:
            continue
        last = k
        if accs[k] < 0.9 * accs[0] - 1e-12:
            break
        expected = k
    assert method.n_pruned_ == expected
    _, out_head = find_head(out, 10)
    assert bool((out_head.weight[:, order[:expected]] == 0).all())


def test_prune_until_keeps_the_mask_before_the_threshold():
    acc = {0: 1.0}
    calls = []

    def fn(k):
        calls.append(k)
        return 1.0 - 0.03 * k  # crosses 0.9 after k = 3

    kept, history = prune_until(fn, 100, 0.01, 0.1)
    assert kept == 3 and history[-1] == (4, pytest.approx(0.88)) and calls == [0, 1, 2, 3, 4]
    # 20 units, 1% steps: k = floor(i * 0.2) changes every 5 steps; nothing crosses -> all but one pruned
    kept, history = prune_until(lambda k: acc.get(k, 1.0), 20, 0.01, 0.1)
    assert kept == 19 and [k for k, _ in history] == list(range(20))
    # the first step already crosses: nothing is pruned
    assert prune_until(lambda k: 1.0 if k == 0 else 0.5, 10, 0.1, 0.1)[0] == 0


@pytest.fixture(scope="module")
def anp_run(backdoored_digits_bn):
    fx = backdoored_digits_bn
    method = purifiers.make("anp", **ANP_PARAMS, device="cpu")
    with one_thread():
        out = method.purify(fx["model"], fx["clean"], seed=0)
    return method, out, _report(fx, out)


ANP_PARAMS = dict(n_iters=200, eps=0.6, threshold="validation")


def test_anp_lowers_asr_on_digits_bn_with_a_larger_noise_bound(anp_run):
    method, out, r = anp_run
    # The paper's eps 0.4 does not expose the BadNets neurons of this small BN CNN. Observed with the official
    # unclipped noise (seed 0, validation threshold, 200 it unless stated; CA 0.985, ASR 1.000 before):
    # eps 0.4: 100 it 0.989 / 1.000, 200 it 0.963 / 1.000, 300 it 0.972 / 0.961; eps 0.5: 0.978 / 0.623;
    # eps 0.6 (this test, ~4 s): 0.980 / 0.434 (seeds 1-3: CA 0.978-0.985, ASR 0.05-0.44); eps 0.7: 0.854 / 0.438;
    # eps 0.8: 0.869 / 0.237. Noise clamped to [-eps, eps] (clip_noise=True, the former behaviour) at eps 0.6:
    # ASR 0.38-0.83, CA 0.79-0.985 (seeds 0-3); at eps 0.8: 0.976 / 0.193. Margins: ASR below 0.5, CA within 0.03.
    assert r.asr_before > 0.9
    assert r.asr_after < 0.5
    assert r.ca_after > r.ca_before - 0.03
    assert method.threshold_ in THRESHOLD_GRID


def test_anp_masks_in_unit_interval_and_prune_exactly_gammas_at_or_below_threshold(backdoored_digits_bn):
    fx = backdoored_digits_bn
    method = purifiers.make("anp", n_iters=15, threshold=0.95, device="cpu")
    out = method.purify(fx["model"], fx["clean"], seed=0)
    before, after = state_of(fx["model"]), state_of(out)
    bns = batchnorm_layers(fx["model"])
    assert set(method.masks_) == {n for n, _ in bns}
    pruned = 0
    for name, _ in bns:
        m = method.masks_[name]
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
        g0, g1 = before[f"{name}.weight"], after[f"{name}.weight"]
        assert torch.equal(g1[m <= 0.95], torch.zeros_like(g1[m <= 0.95]))
        assert torch.equal(g1[m > 0.95], g0[m > 0.95])
        pruned += int((m <= 0.95).sum())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(k.endswith(".weight") and k[: -len(".weight")] in method.masks_ for k in changed)
    assert pruned > 0 and method.threshold_ == 0.95


def test_anp_validation_threshold_is_the_largest_within_the_drop(backdoored_digits_bn):
    fx = backdoored_digits_bn
    train, val = split_validation(fx["clean"], 0.2, seed=1)
    method = purifiers.make("anp", n_iters=15, threshold="validation", device="cpu")
    method.purify(fx["model"], train, validation=val, seed=0)
    acc0 = accuracy(fx["model"], val, CPU)
    ok = []
    for thr in THRESHOLD_GRID:
        m = copy.deepcopy(fx["model"])
        mods = dict(m.named_modules())
        with torch.no_grad():
            for name, mask in method.masks_.items():
                mods[name].weight[mask <= thr] = 0.0
        if accuracy(m, val, CPU) >= 0.9 * acc0 - 1e-12:
            ok.append(thr)
    assert method.threshold_ == max(ok)


def test_anp_refuses_batchnorm_without_affine_parameters():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(144, 10))
    data = ArrayDataset(torch.rand(20, 1, 8, 8), torch.arange(20) % 10, 10)
    with pytest.raises(InputError, match="affine"):
        purifiers.make("anp", n_iters=1, device="cpu").purify(model, data)


@pytest.fixture(scope="module")
def nad_run(backdoored_digits):
    fx = backdoored_digits
    method = purifiers.make("nad", **NAD_PARAMS, device="cpu")
    out = method.purify(fx["model"], fx["clean"], seed=0)
    return method, out, _report(fx, out)


NAD_PARAMS: dict = {}


def test_nad_on_digits_keeps_accuracy_but_not_removes_the_backdoor(nad_run):
    _, _, r = nad_run
    # Honest failure on this toy. Observed (seed 0, defaults: 10 + 10 epochs): CA 0.957 -> 0.961,
    # ASR 0.981 -> 0.914; 20 + 20 epochs: 0.950 / 0.971; lr 0.05 diverges. NAD's teacher is the fine-tuned
    # model, and fine-tuning alone keeps this backdoor (purifier-notes.md section 14: FT 100 epochs leaves
    # ASR ~1.0), so distilling its attention cannot remove it. Asserted: CA within 0.03, the ASR does not rise.
    assert r.asr_before > 0.9
    assert r.asr_after <= r.asr_before + 0.02
    assert r.ca_after > r.ca_before - 0.03


def test_nad_attention_map_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 3, 2, 2, generator=g)
    got = attention_map(f, 2.0)
    for i in range(2):
        a = [sum(float(f[i, c, h, w]) ** 2 for c in range(3)) for h in range(2) for w in range(2)]
        norm = math.sqrt(sum(v * v for v in a))
        assert got[i].tolist() == pytest.approx([v / norm for v in a], rel=1e-5)
    a3 = attention_map(f, 3.0)
    assert a3[0, 0].item() == pytest.approx(
        float(f[0, :, 0, 0].abs().pow(3).sum() / f[0].abs().pow(3).sum(0).flatten().norm()), rel=1e-5)


@pytest.mark.parametrize("arch, shape, expected", [
    ("digits-cnn", (1, 8, 8), ["features.1", "features.3", "features.6"]),
    ("digits-bn-cnn", (1, 8, 8), ["features.2", "features.5", "features.9"]),
    ("rab-mnist-cnn", (1, 28, 28), ["features.1", "features.4"]),
    ("preact-resnet18", (3, 32, 32), ["layer2", "layer3", "layer4"]),
    ("preact-resnet18", (1, 8, 8), ["layer1", "layer2", "layer3"]),
])
def test_nad_feature_maps_are_found_by_structure(arch, shape, expected):
    model = build_model(arch, num_classes=10, input_shape=shape)
    sites = attention_sites(model, torch.rand(2, *shape), 3)
    assert [n for n, _ in sites] == expected


@pytest.fixture(scope="module")
def ibau_run(backdoored_digits):
    fx = backdoored_digits
    method = purifiers.make("i-bau", **IBAU_PARAMS, device="cpu")
    with one_thread():
        out = method.purify(fx["model"], fx["clean"], seed=0)
    return method, out, _report(fx, out)


IBAU_PARAMS = dict(portion=1.0, lr=5e-4, batch_size=64)


def test_ibau_lowers_asr_on_digits(ibau_run):
    _, _, r = ibau_run
    # At the official defaults (lr 1e-4, 1% of each batch perturbed) the 251 clean images give 10 tiny Adam
    # steps: CA 0.957 -> 0.944, ASR 0.981 -> 0.992 (no effect). With every sample perturbed (portion 1.0) and
    # batch 64 (20 steps), I-BAU on digits is unstable: at lr 3e-4 the ASR after it was 0.44 with two torch
    # threads and 0.86 with one (the same seed; only the order of float sums differs). At lr 5e-4 (this test,
    # run on one thread so that every machine computes the same): CA 0.957 -> 0.680, ASR 0.98 -> 0.031 (two
    # threads: 0.644 / 0.097); lr 1e-3 collapses CA (0.28). It removes the backdoor at a large CA cost.
    # Margins: ASR below 0.2, CA within 0.35.
    assert r.asr_before > 0.9
    assert r.asr_after < 0.2
    assert r.ca_after > r.ca_before - 0.35


def test_ibau_hypergradient_matches_closed_form_on_a_quadratic():
    """Inner: 0.5 d'Hd - d'B theta (minimiser d* = H^-1 B theta); outer: c'd + 0.5 |theta|^2.
    Total derivative: theta + B' H^-1 c. K fixed-point steps give theta + lr B' sum_{k<K} (I - lr H)^k c."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 3, generator=g, dtype=torch.float64)
    h = q @ q.T + 3 * torch.eye(3, dtype=torch.float64)
    b = torch.randn(3, 2, generator=g, dtype=torch.float64)
    c = torch.randn(3, generator=g, dtype=torch.float64)
    theta = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    delta = torch.linalg.solve(h, b @ theta.detach())

    def inner(d, params):
        return 0.5 * d @ h @ d - d @ b @ params[0]

    def outer(d, params):
        return c @ d + 0.5 * params[0] @ params[0]

    lr = 0.5 / float(torch.linalg.eigvalsh(h).max())
    (grad,) = implicit_hypergradient(inner, outer, delta, [theta], K=5, inner_lr=lr)
    jac = torch.eye(3, dtype=torch.float64) - lr * h
    neumann = sum(torch.linalg.matrix_power(jac, k) @ c for k in range(5))
    assert torch.allclose(grad, theta.detach() + lr * b.T @ neumann, atol=1e-10)
    (grad_inf,) = implicit_hypergradient(inner, outer, delta, [theta], K=2000, inner_lr=lr)
    assert torch.allclose(grad_inf, theta.detach() + b.T @ torch.linalg.solve(h, c), atol=1e-8)
    # finite differences of outer(d*(theta), theta)
    fd = []
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = 1e-6
        f = [float(outer(torch.linalg.solve(h, b @ t), [t])) for t in (theta.detach() + e, theta.detach() - e)]
        fd.append((f[0] - f[1]) / 2e-6)
    assert torch.allclose(grad_inf, torch.tensor(fd, dtype=torch.float64), atol=1e-5)


# ------------------------------------------------------------------------------------------ generic checks
CHEAP = {
    "fine-pruning": dict(epochs=1, step=0.1),
    "anp": dict(n_iters=3, batch_size=32),
    "nad": dict(te_epochs=1, epochs=1, batch_size=64),
    "i-bau": dict(n_rounds=1, K=1, portion=1.0),
}


@pytest.mark.parametrize("name", list(CHEAP))
def test_determinism_and_input_untouched(name, backdoored_digits, backdoored_digits_bn):
    fx = backdoored_digits_bn if name == "anp" else backdoored_digits
    before = state_of(fx["model"])
    rng = torch.get_rng_state()
    m1, m2, m3 = (purifiers.make(name, device="cpu", **CHEAP[name]) for _ in range(3))
    a = m1.purify(fx["model"], fx["clean"], seed=1)
    b = m2.purify(fx["model"], fx["clean"], seed=1)
    c = m3.purify(fx["model"], fx["clean"], seed=2)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was touched"
    assert same_state(state_of(fx["model"]), before), "the input model was modified"
    assert same_state(state_of(a), state_of(b))
    if name == "anp":  # the same neurons may be pruned; the learned masks differ
        assert not all(torch.equal(m1.masks_[k], m3.masks_[k]) for k in m1.masks_)
        assert all(torch.equal(m1.masks_[k], m2.masks_[k]) for k in m1.masks_)
    else:
        assert not same_state(state_of(a), state_of(c))
    assert not a.training and next(a.parameters()).device.type == "cpu"


BAD = [
    ("fine-pruning", "step", 0.0), ("fine-pruning", "step", 1.5), ("fine-pruning", "acc_drop", 1.0),
    ("fine-pruning", "epochs", 0), ("fine-pruning", "lr", -1.0), ("fine-pruning", "momentum", 1.0),
    ("fine-pruning", "batch_size", 2.5), ("fine-pruning", "weight_decay", float("nan")),
    ("anp", "eps", -0.1), ("anp", "noise_steps", 0), ("anp", "alpha", 1.5), ("anp", "lr", 0),
    ("anp", "n_iters", True), ("anp", "threshold", "test"), ("anp", "threshold", 1.2), ("anp", "acc_drop", -1),
    ("anp", "batch_size", 0), ("anp", "device", "tpu"),
    ("nad", "betas", ()), ("nad", "betas", (1.0, -2.0)), ("nad", "betas", "abc"), ("nad", "p", 0.0),
    ("nad", "te_epochs", 0), ("nad", "epochs", -1), ("nad", "lr", float("inf")),
    ("i-bau", "n_rounds", 0), ("i-bau", "K", 0), ("i-bau", "fp_lr", 0.0), ("i-bau", "inner_lr_delta", -1),
    ("i-bau", "delta_reg", -1e-3), ("i-bau", "delta_norm", 0), ("i-bau", "lr", "x"), ("i-bau", "portion", 1.1),
]


@pytest.mark.parametrize("name, param, value", BAD)
def test_bad_parameters_raise_input_error_naming_them(name, param, value):
    model = build_model("digits-bn-cnn", num_classes=10, input_shape=(1, 8, 8))
    data = ArrayDataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 10, 10)
    with pytest.raises(InputError, match=param if param != "device" else "device|tpu"):
        purifiers.make(name, **{param: value}).purify(model, data)


def test_tags():
    tags = purifiers.available()
    assert tags["fine-pruning"]["uses_validation"] and tags["fine-pruning"]["changes"] == "pruning"
    assert tags["anp"]["needs_batchnorm"] and tags["anp"]["changes"] == "pruning"
    assert tags["nad"]["changes"] == "weights" and tags["i-bau"]["changes"] == "weights"
