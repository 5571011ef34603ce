"""Mode C patch certificates (certkit.certify.patch): votes against plain loops, Levine and Feizi's tie-break,
PatchCleanser's mask set and double masking, bad input, and soundness by brute force: every m x m patch at
every position, with several contents (constant, random, and optimised against the certified classifier),
never changes a prediction certified at side m."""

from __future__ import annotations

import doctest
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import certkit.certify.patch as patch_module
from certkit.certify.patch import (
    STREAM_ABLATION,
    THREAT_MODEL,
    AblatedModel,
    PatchCertificate,
    PatchCleanserCertificate,
    ablation_input_channels,
    ablation_train_transform,
    certify_from_counts,
    derandomized_certify,
    double_masking,
    patch_delta,
    patch_trigger_robustness,
    patchcleanser_certify,
    patchcleanser_masks,
    random_ablation,
)
from certkit.errors import CertkitError, InputError, UnknownNameError
from certkit.seeding import derive_seed


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ helpers
def linear_model(seed: int, in_channels: int, size: tuple[int, int], num_classes: int = 3, *,
                 scale: float = 1.0, bias0: float = 0.0) -> nn.Module:
    """A random linear classifier on the flattened input (every pixel matters), class 0 pushed by ``bias0``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * size[0] * size[1], num_classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
        model[1].bias[0] += bias0
    return model


def conv_model(seed: int, in_channels: int, num_classes: int = 3, *, scale: float = 1.0,
               bias0: float = 0.0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                              nn.Flatten(), nn.Linear(16, num_classes))
    with torch.no_grad():
        model[-1].weight.mul_(scale)
        model[-1].bias[0] += bias0
    return model


def images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def keep_masks(kind: str, band: int, h: int, w: int) -> torch.Tensor:
    """Independent, loop-built keep masks [A, H, W] of all ablations (ablation order as in the module)."""
    starts = range(w) if kind == "column" else [(r, c) for r in range(h) for c in range(w)]
    out = torch.zeros(len(starts), h, w)
    for a, s in enumerate(starts):
        for i in range(h):
            for j in range(w):
                if kind == "column":
                    out[a, i, j] = float((j - s) % w < band)
                else:
                    out[a, i, j] = float((i - s[0]) % h < band and (j - s[1]) % w < band)
    return out


def loop_counts(model: nn.Module, x: torch.Tensor, kind: str, band: int, rule: str, theta: float) -> np.ndarray:
    """Votes by a plain Python loop over ablation positions, one forward per position."""
    wrapped = AblatedModel(model, channels=x.shape[1])
    h, w = x.shape[2:]
    starts = range(w) if kind == "column" else [(r, c) for r in range(h) for c in range(w)]
    counts = None
    with torch.no_grad():
        for s in starts:
            logits = wrapped(wrapped.ablate(x, kind, s, band))
            if rule == "threshold":
                votes = (torch.softmax(logits, dim=1) >= theta).long()
            else:
                votes = nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1])
            counts = votes if counts is None else counts + votes
    return counts.numpy()


def patched(x: torch.Tensor, side: int, contents: torch.Tensor) -> torch.Tensor:
    """``x`` [C, H, W] with a side x side patch at every position, for every content [K, C, side, side]:
    [positions * K, C, H, W]."""
    c, h, w = x.shape
    out = []
    for r in range(h - side + 1):
        for q in range(w - side + 1):
            xs = x.expand(contents.shape[0], c, h, w).clone()
            xs[:, :, r:r + side, q:q + side] = contents
            out.append(xs)
    return torch.cat(out)


def place(x: torch.Tensor, side: int, content: torch.Tensor) -> torch.Tensor:
    """Differentiable: ``x`` [C, H, W] with patch ``content[p]`` [C, side, side] at position p (row-major)."""
    c, h, w = x.shape
    positions = [(r, q) for r in range(h - side + 1) for q in range(w - side + 1)]
    out = []
    for p, (r, q) in enumerate(positions):
        canvas = nn.functional.pad(content[p], (q, w - side - q, r, h - side - r))
        inside = torch.zeros(1, h, w)
        inside[:, r:r + side, q:q + side] = 1.0
        out.append(x * (1 - inside) + canvas)
    return torch.stack(out)


def optimise_patches(x: torch.Tensor, side: int, label: int, scores, steps: int = 8, seed: int = 0) -> torch.Tensor:
    """One patch content per position, optimised by signed gradient steps to lower ``label``'s margin under
    ``scores`` (a differentiable map [B, C, H, W] -> class scores [B, K]); returns [positions, C, side, side]."""
    c, h, w = x.shape
    n_pos = (h - side + 1) * (w - side + 1)
    gen = torch.Generator().manual_seed(seed)
    content = torch.rand(n_pos, c, side, side, generator=gen).requires_grad_(True)
    for _ in range(steps):
        s = scores(place(x, side, content))
        others = s.clone()
        others[:, label] = -math.inf
        loss = (s[:, label] - others.max(dim=1).values).sum()
        (grad,) = torch.autograd.grad(loss, content)
        with torch.no_grad():
            content -= 0.25 * grad.sign()
            content.clamp_(0.0, 1.0)
    return content.detach()


def smoothed_scores(model: nn.Module, kind: str, band: int, rule: str):
    """A differentiable surrogate of the smoothed classifier's votes: mean softmax over all ablations."""
    def scores(xs: torch.Tensor) -> torch.Tensor:
        b, c, h, w = xs.shape
        keep = keep_masks(kind, band, h, w)  # [A, H, W]
        enc = torch.cat([xs, 1 - xs], dim=1)
        z = (enc[:, None] * keep[None, :, None]).reshape(b * keep.shape[0], 2 * c, h, w)
        p = torch.softmax(model(z), dim=1).reshape(b, keep.shape[0], -1)
        return p.mean(dim=1)
    return scores


# ------------------------------------------------------------------------------------------------ ablation
def test_ablate_keeps_the_wrapped_band_or_block_and_nulls_the_rest():
    x = images(2, 2, 4, 5)
    model = AblatedModel(linear_model(0, 4, (4, 5)), channels=2)
    enc = torch.cat([x, 1 - x], dim=1)
    col = model.ablate(x, "column", 4, 2)  # columns 4 and 0 (wraps)
    want = torch.zeros_like(enc)
    want[..., [4, 0]] = enc[..., [4, 0]]
    assert torch.equal(col, want)
    blk = model.ablate(x, "block", (3, 4), 2)  # rows 3, 0 and columns 4, 0
    want = torch.zeros_like(enc)
    for i, j in itertools.product([3, 0], [4, 0]):
        want[..., i, j] = enc[..., i, j]
    assert torch.equal(blk, want)
    assert torch.equal(model.encode(x), enc)
    assert ablation_input_channels(2) == 4
    for a, start in enumerate(itertools.product(range(4), range(5))):
        got = model.ablate(x, "block", start, 3)
        assert torch.equal(got, enc * keep_masks("block", 3, 4, 5)[a])


def test_random_ablation_and_train_transform_are_seeded_single_positions():
    x = images(3, 1, 6, 6)
    model = AblatedModel(linear_model(0, 2, (6, 6)), channels=1)
    t = ablation_train_transform("column", 2, seed=7)
    seen = set()
    for step in range(12):
        z = t(x, step)
        assert torch.equal(z, t(x, step))
        # the whole batch shares one position, one of the W column ablations
        hits = [s for s in range(6) if torch.equal(z, model.ablate(x, "column", s, 2))]
        assert len(hits) == 1
        gen = torch.Generator().manual_seed(derive_seed(7, STREAM_ABLATION, step))
        assert torch.equal(z, random_ablation(x, "column", 2, gen))
        seen.add(hits[0])
    assert len(seen) > 1
    zb = ablation_train_transform("block", 3, seed=1)(x, 0)
    assert any(torch.equal(zb, model.ablate(x, "block", s, 3)) for s in itertools.product(range(6), range(6)))
    assert "column" in repr(t)


# ------------------------------------------------------------------------------------------------ votes
@pytest.mark.parametrize("kind", ["column", "block"])
@pytest.mark.parametrize("rule", ["threshold", "argmax"])
@pytest.mark.parametrize("seed", [0, 1])
def test_vote_counts_equal_a_plain_loop_over_ablations(kind, rule, seed):
    x = images(3, 2, 6, 5, seed=seed)
    for model in (linear_model(seed, 4, (6, 5), 4, scale=3.0), conv_model(seed, 4, 4, scale=5.0)):
        cert = derandomized_certify(model, x, kind=kind, band=2, rule=rule, theta=0.3, batch_size=7,
                                    patch_sizes=[1, 2])
        want = loop_counts(model, x, kind, 2, rule, 0.3)
        np.testing.assert_array_equal(cert.counts, want)
        pred, side, ok = certify_from_counts(want, kind=kind, band=2, max_side=5, patch_sizes=[1, 2])
        np.testing.assert_array_equal(cert.prediction, pred)
        np.testing.assert_array_equal(cert.certified_side, side)
        np.testing.assert_array_equal(cert.certified, ok)
        # the stable order: most votes, the smaller index on ties
        assert all(want[i, pred[i]] == want[i].max() and (want[i, :pred[i]] < want[i].max()).all()
                   for i in range(3))
        if rule == "argmax":
            assert (cert.counts.sum(axis=1) == cert.meta["num_ablations"]).all()


def test_passes_are_batched_not_per_point():
    calls: list[int] = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = linear_model(0, 2, (4, 6))

        def forward(self, z):
            calls.append(z.shape[0])
            return self.inner(z)

    x = images(5, 1, 4, 6)
    derandomized_certify(Counting(), x, kind="column", band=2, batch_size=8, rule="argmax")
    assert sum(calls) == 5 * 6 and max(calls) <= 8 and len(calls) == math.ceil(30 / 8)
    calls.clear()
    derandomized_certify(Counting(), x, kind="block", band=2, batch_size=1000)
    assert calls == [5 * 24]
    calls.clear()

    class CountingPlain(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = linear_model(0, 1, (8, 8))

        def forward(self, z):
            calls.append(z.shape[0])
            return self.inner(z)

    cert = patchcleanser_certify(CountingPlain(), images(4, 1, 8, 8), patch_size=2, k=3, batch_size=50)
    # k = 3 masks per axis: k^2 (k^2 + 1) / 2 = 45 two-mask passes per image
    assert cert.meta["num_passes"] == 45 == 9 * 10 // 2
    assert sum(calls) == 4 * 45 and max(calls) <= 50


def test_model_mode_and_device_are_restored():
    model = linear_model(0, 2, (6, 6))
    model.train()
    derandomized_certify(model, images(2, 1, 6, 6), band=1)
    assert model.training
    plain = linear_model(0, 1, (6, 6))
    plain.train()
    patchcleanser_certify(plain, images(2, 1, 6, 6), patch_size=2, k=2)
    assert plain.training


def test_certkit_model_with_normalize_first_layer():
    from certkit.backdoor.models import build_model

    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=3, input_shape=(ablation_input_channels(1), 8, 8))
    cert = derandomized_certify(model, images(2, 1, 8, 8), [0, 1], band=2, patch_sizes=2)
    assert cert.counts.shape == (2, 3) and cert.meta["num_ablations"] == 8
    wrong = build_model("digits-cnn", num_classes=3, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"expects 1 input channel.*ablation_input_channels\(1\) = 2"):
        derandomized_certify(wrong, images(2, 1, 8, 8), band=2)
    with pytest.raises(InputError, match="built for 8x8"):
        derandomized_certify(model, images(2, 1, 6, 6), band=2)


# ------------------------------------------------------------------------------------------------ tie-break
def test_levine_tie_break_on_hand_made_counts():
    # column, band 2: Delta(m) = m + 1; gap 6 = 2 Delta(2)
    pred, side, ok = certify_from_counts([[9, 3, 0], [3, 9, 0], [5, 5, 0], [2, 7, 7], [9, 3, 3]],
                                         kind="column", band=2, max_side=8, patch_sizes=[1, 2, 3])
    assert pred.tolist() == [0, 1, 0, 1, 0]
    assert side.tolist() == [2, 1, 0, 0, 2]  # c < c' certifies the tie at gap == 2 Delta, c > c' does not
    assert ok.tolist() == [[True, True, False], [True, False, False], [False] * 3, [False] * 3,
                           [True, True, False]]
    # block, band 1: Delta(m) = m^2; gap 8 = 2 Delta(2)
    _, side, _ = certify_from_counts([[8, 0], [0, 8], [9, 0], [0, 9]], kind="block", band=1, max_side=8)
    assert side.tolist() == [2, 1, 2, 2]
    # one class: a virtual runner-up with no votes and a larger index
    _, side, _ = certify_from_counts([[6]], kind="column", band=1, max_side=6)
    assert side.tolist() == [3]
    assert (patch_delta("column", 4, 5), patch_delta("block", 4, 5)) == (8, 64)
    with pytest.raises(InputError, match="counts"):
        certify_from_counts([[1.5, 2.0]], kind="column", band=1, max_side=4)
    with pytest.raises(InputError, match="counts"):
        certify_from_counts([[-1, 2]], kind="column", band=1, max_side=4)
    with pytest.raises(InputError, match="counts"):
        certify_from_counts([[1, 2], [3]], kind="column", band=1, max_side=4)


# ------------------------------------------------------------------------------------------------ soundness
DERANDOMIZED_CASES = [  # (kind, band, rule, model builder): chosen so that some, not all, points certify
    ("column", 2, "argmax", lambda: linear_model(0, 2, (8, 8), scale=3.0, bias0=1.0)),
    ("column", 2, "threshold", lambda: linear_model(0, 2, (8, 8), scale=3.0, bias0=2.0)),
    ("column", 1, "argmax", lambda: conv_model(0, 2, scale=10.0, bias0=1.0)),
    ("block", 2, "argmax", lambda: linear_model(0, 2, (8, 8), scale=10.0, bias0=1.0)),
    ("block", 2, "threshold", lambda: linear_model(0, 2, (8, 8), scale=10.0, bias0=1.0)),
]


@pytest.mark.parametrize("kind,band,rule,build", DERANDOMIZED_CASES,
                         ids=[f"{k}-{b}-{r}-{i}" for i, (k, b, r, _) in enumerate(DERANDOMIZED_CASES)])
def test_derandomized_certificate_survives_every_patch(kind, band, rule, build):
    model = build()
    x = images(24, 1, 8, 8, seed=3)
    cert = derandomized_certify(model, x, kind=kind, band=band, rule=rule)
    sides = cert.certified_side
    assert (sides > 0).sum() >= 3, f"too few certified points to test: {sides.tolist()}"
    assert (sides < 8).all()
    # the points with the largest certified sides, and distinct sides, up to 4 points
    order = sorted(np.flatnonzero(sides > 0), key=lambda i: (-sides[i], i))
    chosen, used = [], set()
    for i in order:
        if sides[i] not in used or len(chosen) < 2:
            chosen.append(i)
            used.add(sides[i])
        if len(chosen) == 4:
            break
    scores = smoothed_scores(model, kind, band, rule)
    gen = torch.Generator().manual_seed(1)
    moved = 0
    for i, m in [(j, side) for j in chosen for side in sorted({1, int(sides[j])})]:
        label = int(cert.prediction[i])
        fixed = torch.stack([torch.zeros(1, m, m), torch.ones(1, m, m), torch.rand(1, m, m, generator=gen),
                             torch.rand(1, m, m, generator=gen).round()])
        xs = patched(x[i], m, fixed)
        attacked = place(x[i], m, optimise_patches(x[i], m, label, scores, seed=int(i))).detach()
        xs = torch.cat([xs, attacked])
        again = derandomized_certify(model, xs, kind=kind, band=band, rule=rule, batch_size=4096)
        assert (again.prediction == label).all(), f"point {i}, certified side {m}: a patch changed the prediction"
        gap = cert.counts[i, label] - np.delete(cert.counts[i], label).max()
        new_gap = again.counts[:, label] - np.delete(again.counts, label, axis=1).max(axis=1)
        assert (gap - new_gap <= 2 * patch_delta(kind, band, m)).all()
        moved += int((again.counts != cert.counts[i]).any(axis=1).sum())
    assert moved > 0  # the patches do move votes: the check is not vacuous


def test_derandomized_attack_flips_some_uncertified_point():
    """The brute force has teeth: at sides beyond the certificate, it finds patches that flip predictions."""
    model = linear_model(0, 2, (8, 8), scale=3.0, bias0=1.0)
    x = images(24, 1, 8, 8, seed=3)
    cert = derandomized_certify(model, x, kind="column", band=2, rule="argmax")
    scores = smoothed_scores(model, "column", 2, "argmax")
    flipped = 0
    for i in np.flatnonzero(cert.certified_side < 3)[:6]:
        m = int(cert.certified_side[i]) + 2
        xs = place(x[i], m, optimise_patches(x[i], m, int(cert.prediction[i]), scores, seed=int(i))).detach()
        again = derandomized_certify(model, xs, kind="column", band=2, rule="argmax", batch_size=4096)
        flipped += int((again.prediction != cert.prediction[i]).any())
    assert flipped > 0


# (H, W, patch side, k, class-0 bias, whether the patches flip the undefended model on certified points:
# on 7x9 the masks are large next to a 2x2 patch, so the points that certify have margins no 2x2 patch beats)
PC_CASES = [(8, 8, 2, 3, 1.5, True), (8, 8, 3, 2, 1.0, True), (7, 9, 2, 3, 2.5, False)]


@pytest.mark.parametrize("h,w,p,k,bias0,flips", PC_CASES)
def test_patchcleanser_certificate_survives_every_patch(h, w, p, k, bias0, flips):
    model = linear_model(0, 1, (h, w), scale=3.0, bias0=bias0)
    x = images(20, 1, h, w, seed=5)
    cert = patchcleanser_certify(model, x, patch_size=p, k=k)
    certified = np.flatnonzero(cert.certified_side == p)
    assert 2 <= certified.size < 20, cert.certified_side.tolist()
    gen = torch.Generator().manual_seed(2)
    masks = patchcleanser_masks((h, w), p, k)

    def one_mask_scores(xs: torch.Tensor) -> torch.Tensor:  # mean softmax over the one-mask inputs
        z = torch.where(masks[None, :, None], torch.tensor(0.0), xs[:, None]).flatten(0, 1)
        return torch.softmax(model(z), dim=1).reshape(xs.shape[0], masks.shape[0], -1).mean(dim=1)

    moved = changed = 0
    for i in certified[:10]:
        label = int(cert.prediction[i])
        fixed = torch.stack([torch.zeros(1, p, p), torch.ones(1, p, p), torch.rand(1, p, p, generator=gen),
                             torch.rand(1, p, p, generator=gen).round()])
        attacked = [place(x[i], p, optimise_patches(x[i], p, label, scores, steps=12, seed=int(i))).detach()
                    for scores in (model, one_mask_scores)]
        xs = torch.cat([patched(x[i], p, fixed), *attacked])
        again = patchcleanser_certify(model, xs, patch_size=p, k=k, batch_size=4096)
        assert (again.prediction == label).all(), f"point {i}: a {p}x{p} patch changed PatchCleanser's output"
        changed += int((again.mask_predictions != label).any(axis=(1, 2)).sum())
        with torch.no_grad():
            moved += int((model(xs).argmax(dim=1) != label).sum())
    # not vacuous: the patches do change some two-mask predictions (and flip the undefended model)
    assert changed > 0
    assert moved > 0 or not flips


# ------------------------------------------------------------------------------------------------ PatchCleanser
@pytest.mark.parametrize("h,w,p,k", [(8, 8, 2, 3), (8, 8, 2, 4), (8, 8, 2, 6), (8, 8, 4, 5), (10, 7, 3, 2),
                                     (6, 6, 1, 6), (9, 9, 5, 3), (32, 32, 5, 6)])
def test_mask_set_covers_every_patch_and_matches_the_formulas(h, w, p, k):
    masks = patchcleanser_masks((h, w), p, k)
    per_axis = []
    for length in (h, w):
        stride = math.ceil((length - p + 1) / k)
        side = p + stride - 1
        pos = list(range(0, length - side + 1, stride))
        if pos[-1] != length - side:
            pos.append(length - side)
        assert len(pos) <= k
        per_axis.append((pos, side))
    (rows, sh), (cols, sw) = per_axis
    assert masks.shape == (len(rows) * len(cols), h, w)
    assert (masks.flatten(1).sum(dim=1) == sh * sw).all()
    for i, j in itertools.product(range(h - p + 1), range(w - p + 1)):
        assert masks[:, i:i + p, j:j + p].flatten(1).all(dim=1).any(), f"patch at ({i}, {j}) is not covered"
    if len(rows) == len(cols) == k:
        m = masks.shape[0]
        assert m * (m + 1) // 2 == k * k * (k * k + 1) // 2


def test_mask_set_exact_small_case():
    masks = patchcleanser_masks(8, 2, 4)  # stride ceil(7/4) = 2, side 3, positions 0, 2, 4 and 5
    tops = sorted({(int(m.nonzero()[0, 0]), int(m.nonzero()[0, 1])) for m in masks})
    assert tops == sorted(itertools.product([0, 2, 4, 5], repeat=2))


def test_patchcleanser_map_and_rule_match_a_plain_loop():
    masks = patchcleanser_masks(8, 2, 3)
    m = masks.shape[0]
    cases = set()
    for seed in (0, 1, 2):
        model = linear_model(seed, 1, (8, 8), scale=2.0)
        x = images(6, 1, 8, 8, seed=seed)
        cert = patchcleanser_certify(model, x, patch_size=2, k=3, batch_size=11, fill=0.5)
        with torch.no_grad():
            for i, j in itertools.product(range(m), range(m)):
                xs = torch.where(masks[i] | masks[j], torch.tensor(0.5), x)
                np.testing.assert_array_equal(cert.mask_predictions[:, i, j], model(xs).argmax(dim=1).numpy())
        for n in range(6):  # Algorithm 1 of Xiang et al., point by point
            grid = cert.mask_predictions[n]
            one = [int(grid[i, i]) for i in range(m)]
            majority = max(sorted(set(one)), key=one.count)  # the smaller label wins ties
            if len(set(one)) == 1:
                want, case = one[0], "unanimous"
            else:
                want = next((one[i] for i in range(m) if one[i] != majority and (grid[i] == one[i]).all()),
                            majority)
                case = "majority" if want == majority else "disagreer"
            cases.add(case)
            assert cert.prediction[n] == want
            assert cert.certified_side[n] == (2 if (grid == want).all() else 0)
            assert cert.counts[n].tolist() == [one.count(c) for c in range(3)]
    assert cases == {"unanimous", "disagreer", "majority"}  # every branch of double masking was exercised


def test_double_masking_cases():
    agree = np.ones((3, 3), dtype=int)
    disagreer = np.array([[0, 0, 0], [0, 1, 2], [0, 2, 1]])  # mask 0 disagrees and is consistent
    majority = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 1]])  # mask 0 disagrees, not consistent
    tie = np.array([[0, 1], [1, 1]])  # one-mask labels 0 and 1: majority 0 (smaller index)
    pred, cert, votes = double_masking(np.stack([agree, disagreer, majority]), 3)
    assert pred.tolist() == [1, 0, 1] and cert.tolist() == [True, False, False]
    assert votes.tolist() == [[0, 3, 0], [1, 2, 0], [1, 2, 0]]
    assert double_masking(tie[None])[0].tolist() == [1]  # mask 1 disagrees with the majority 0, consistent
    with pytest.raises(InputError, match="symmetric"):
        double_masking(np.array([[[0, 1], [0, 0]]]))
    with pytest.raises(InputError, match="num_classes"):
        double_masking(agree[None], 1)


# ------------------------------------------------------------------------------------------------ results
def test_result_methods_and_patch_trigger_robustness():
    model = linear_model(0, 2, (8, 8), scale=3.0, bias0=1.0)
    x = images(10, 1, 8, 8, seed=3)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    cert = derandomized_certify(model, x, y, band=2, rule="argmax", patch_sizes=[1, 2])
    assert cert.meta["unit"] == "patch side (pixels)" and cert.meta["threat_model"] == THREAT_MODEL
    assert cert.meta["kind"] == "column" and cert.meta["band"] == 2 and cert.meta["theta"] is None
    frame = cert.to_frame()
    assert list(frame.columns[:5]) == ["index", "label", "prediction", "certified_side", "correct"]
    assert {"certified_m1", "certified_m2", "votes_0", "votes_2"} <= set(frame.columns)
    back = PatchCertificate.from_dict(json.loads(json.dumps(cert.to_dict())))
    assert back.to_dict() == cert.to_dict()
    ca = cert.certified_accuracy([0, 1, 2, 3])
    want = [np.mean(cert.correct & (cert.certified_side >= m)) for m in range(4)]
    np.testing.assert_allclose(ca, want)
    assert cert.certified_accuracy(0) == cert.accuracy()
    keep = y != 0
    ctr = patch_trigger_robustness(cert, 2, target=0)
    assert ctr == pytest.approx(np.mean((cert.correct & (cert.certified_side >= 2))[keep]))
    assert math.isnan(patch_trigger_robustness(cert.__class__(label=[0], prediction=[0], certified_side=[3],
                                                              counts=[[1]]), 1, target=0))
    unlabelled = derandomized_certify(model, x, band=2)
    assert (unlabelled.label == -1).all() and not unlabelled.correct.any()
    with pytest.raises(InputError, match="true labels"):
        patch_trigger_robustness(unlabelled, 2)
    with pytest.raises(InputError, match="trigger_side"):
        patch_trigger_robustness(cert, 0)
    pc = patchcleanser_certify(linear_model(0, 1, (8, 8)), x, y, patch_size=2, k=3)
    assert isinstance(pc, PatchCleanserCertificate) and pc.mask_predictions.shape == (10, 9, 9)
    assert set(pc.certified_side.tolist()) <= {0, 2} and pc.meta["threat_model"] == THREAT_MODEL
    back = PatchCleanserCertificate.from_dict(json.loads(json.dumps(pc.to_dict())))
    np.testing.assert_array_equal(back.mask_predictions, pc.mask_predictions)
    assert patch_trigger_robustness(pc, 3, target=0) == 0.0  # certified for side 2 only


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    x = images(2, 1, 6, 8)
    model = linear_model(0, 2, (6, 8))
    cases = [
        (dict(band=0), r"band must be a positive integer, got 0"),
        (dict(band=-2), r"band must be a positive integer"),
        (dict(band=9), r"band=9 is wider than the image \(8 columns\)"),
        (dict(band=7, kind="block"), r"band=7 does not fit the 6x8 image"),
        (dict(band=2, patch_sizes=[0]), r"patch_sizes must be a positive integer, got 0"),
        (dict(band=2, patch_sizes=[7]), r"patch_sizes=7 is larger than the 6x8 image"),
        (dict(band=2, theta=0.0), r"theta must be a finite number > 0"),
        (dict(band=2, theta=1.5), r"theta must be a finite number"),
        (dict(band=2, batch_size=0), r"batch_size"),
        (dict(band=2.0), r"band must be a positive integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            derandomized_certify(model, x, **kwargs)
    with pytest.raises(UnknownNameError, match="kind"):
        derandomized_certify(model, x, band=2, kind="row")
    with pytest.raises(UnknownNameError, match="rule"):
        derandomized_certify(model, x, band=2, rule="vote")
    with pytest.raises(InputError, match=r"expects 2 input channel.*ablation_input_channels\(3\) = 6"):
        derandomized_certify(conv_model(0, 2), images(2, 3, 6, 8), band=2)
    with pytest.raises(InputError, match=r"Linear\(48, \.\.\.\).*96 features"):
        derandomized_certify(linear_model(0, 1, (6, 8)), x, band=2)
    with pytest.raises(InputError, match="odd number"):
        AblatedModel(nn.Conv2d(3, 4, 3))
    with pytest.raises(InputError, match="channels=C"):
        AblatedModel(linear_model(0, 2, (6, 8)))
    with pytest.raises(InputError, match=r"images \[N, C, H, W\]"):
        derandomized_certify(model, torch.rand(2, 48), band=2)
    with pytest.raises(InputError, match="NaN or inf"):
        derandomized_certify(model, torch.full((1, 1, 6, 8), float("nan")), band=2)
    with pytest.raises(InputError, match="y has labels outside"):
        derandomized_certify(model, x, [0, 3], band=2)
    wrapped = AblatedModel(model, channels=1)
    with pytest.raises(InputError, match="start=8 is outside"):
        wrapped.ablate(x, "column", 8, 2)
    with pytest.raises(InputError, match=r"start must be \(row, column\)"):
        wrapped.ablate(x, "block", 3, 2)
    with pytest.raises(InputError, match="band=9"):
        random_ablation(x, "column", 9, torch.Generator())
    with pytest.raises(InputError, match="seed"):
        ablation_train_transform("column", 2, seed=-1)
    plain = linear_model(0, 1, (6, 8))
    pc_cases = [
        (dict(patch_size=0), r"patch_size must be a positive integer, got 0"),
        (dict(patch_size=7), r"patch_size=7 is larger than the 6x8 image"),
        (dict(patch_size=2, k=0), r"k must be a positive integer, got 0"),
        (dict(patch_size=2, k=1), r"k=1 masks per axis cannot cover the image usefully"),
        (dict(patch_size=4, k=4), r"k=4 masks per axis cannot be placed on a height of 6 pixels.*k <= 3"),
        (dict(patch_size=2, k=2, fill=float("nan")), r"fill must be a finite number"),
    ]
    for kwargs, message in pc_cases:
        with pytest.raises(InputError, match=message):
            patchcleanser_certify(plain, x, **kwargs)
    with pytest.raises(InputError, match="first layer expects 1"):
        patchcleanser_certify(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), images(1, 3, 6, 8), patch_size=2, k=2)
    with pytest.raises(InputError, match="image_size"):
        patchcleanser_masks((6, 8, 1), 2, 2)
    with pytest.raises(CertkitError):
        patchcleanser_masks(6, 2, 99)


def test_docstring_examples_run():
    result = doctest.testmod(patch_module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 20
