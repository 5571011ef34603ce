"""Mode C: deterministic patch certificates (column / block de-randomized smoothing and PatchCleanser).

A certificate at ``x`` for patch side ``m`` states that *every* patch of side ``<= m`` (any square of
``m x m`` pixels, placed anywhere inside the image, with any content) leaves the certified classifier's
prediction at ``x`` unchanged. Nothing is sampled: there is no ``alpha`` and no simultaneous correction.
Certified at a triggered input ``x + t`` with its true label, the certificate proves that a BadNets-style
patch trigger of side ``<= m`` fails there, whatever the poisoning of the training set
(reference/patch-certificates.md section 0; :func:`patch_trigger_robustness` is the CTR of Mode C).

**De-randomized smoothing** (Levine and Feizi, "(De)Randomized Smoothing for Certifiable Defense against
Patch Attacks", NeurIPS 2020). The base model sees an *ablated* input: one band of ``band`` consecutive
columns (``kind="column"``), or one ``band x band`` block (``kind="block"``), wrapping around the image
edges; every other pixel is *null*. To tell a null pixel from a black one, an image ``x`` in ``[0, 1]`` with
``C`` channels is encoded as the ``2C`` channels ``(x, 1 - x)`` (first the ``C`` channels of ``x``, then
the ``C`` channels of ``1 - x``) and a null pixel is ``0`` in all of them. The base model must therefore
take ``2C`` input channels (:func:`ablation_input_channels`); :class:`AblatedModel` checks this.
The smoothed classifier runs *all* ``W`` column ablations (``H * W`` block ablations) and counts votes:
``rule="threshold"`` gives a vote to every class whose softmax is ``>= theta`` in a pass (several classes
may vote in one pass; ``theta = 0.2`` as in the paper), ``rule="argmax"`` to the top logit only.
The prediction ``c`` is the class with most votes, the smaller index winning ties, and ``c'`` the
runner-up in the same stable order. A patch of side ``m`` meets at most ``Delta = m + band - 1`` column
bands (``(m + band - 1)**2`` blocks); each such pass can remove one vote from ``c`` and add one to ``c'``,
so ``x`` is certified for side ``m`` iff ``n_c - n_c' > 2 Delta``, or ``n_c - n_c' == 2 Delta`` and
``c < c'`` (:func:`certify_from_counts`). ``Delta`` is not capped at the number of passes: a larger
``Delta`` only makes the test stricter, and the cap never changes the outcome.

**PatchCleanser** (Xiang, Mahloujifar and Mittal, "PatchCleanser: Certifiably Robust Defense against
Adversarial Patches for Any Image Classifier", USENIX Security 2022). Any classifier; a set of
rectangular masks such that every ``p x p`` patch lies entirely inside at least one mask
(:func:`patchcleanser_masks`: per axis of length ``L``, stride ``s = ceil((L - p + 1) / k)``, mask side
``p + s - 1``, positions ``0, s, 2s, ...`` plus the last position ``L - (p + s - 1)`` when the stride
does not land on it; ``k = 1``, one mask over the whole image, and ``k > L - p + 1``, more masks than patch
positions, are refused). Double masking (:func:`double_masking`) predicts from the one-mask and two-mask
predictions, and ``x`` is certified iff every two-mask prediction (the one-mask predictions, the diagonal,
included) equals the predicted label. Masked pixels are set to ``fill`` (default ``0.0``) in pixel units, *before* the model's
own first layer (certkit models normalise inside the model): any fixed value is sound, since the masked
pixels then no longer depend on the patch.

Implementation notes (certkit's own code, written from the papers' formulas; no code of the authors'
repositories is reused, and UMD's licence of the original de-randomized smoothing code forbids it):

* All ablations (masks) of all points of a batch run as batched forwards of ``batch_size`` rows; rows are
  built on the device from the encoded inputs and the ablation index, never in a per-point Python loop.
* The model is put in eval mode (and on ``device``) for the passes and restored afterwards.
* The certificate is a statement about the classifier as evaluated. In exact arithmetic an ablated input
  that the patch does not touch is bit-for-bit the same as without the patch; on a GPU a vote whose softmax
  lies within float rounding of ``theta`` (or a logit tie) could in principle differ between two batch
  compositions. This is the usual caveat of deterministic certificates computed in floating point.
* A patch of side ``<= p`` lies inside some ``p x p`` window of the image, so a PatchCleanser certificate
  for ``p`` also covers every smaller side: ``certified_side`` is ``p`` when certified, else 0 (a lower
  bound: larger sides were not tested).
* :class:`AblationTransform` draws one band (block) position per training batch from a ``torch.Generator``
  seeded with ``derive_seed(seed, STREAM_ABLATION, step)``, so training is reproducible and independent of
  the order in which batches are drawn (:data:`certkit.seeding.STREAM_ABLATION`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from certkit._validation import (
    check_choice,
    check_finite_tensor,
    check_float,
    check_labels,
    check_model_input,
    check_positive_int,
    check_seed,
    expected_input_shape,
)
from certkit.devices import module_device, resolve_device
from certkit.errors import InputError
from certkit.seeding import STREAM_ABLATION, STREAM_CUTOUT, derive_seed

__all__ = [
    "KINDS",
    "RULES",
    "STREAM_ABLATION",
    "CutoutTransform",
    "THREAT_MODEL",
    "AblatedModel",
    "AblationTransform",
    "PatchCertificate",
    "PatchCleanserCertificate",
    "ablation_input_channels",
    "ablation_train_transform",
    "certify_from_counts",
    "derandomized_certify",
    "double_masking",
    "patch_delta",
    "patch_trigger_robustness",
    "patchcleanser_certify",
    "patchcleanser_masks",
    "random_ablation",
]

#: ablation shapes of de-randomized smoothing
KINDS = ("column", "block")
#: vote rules of de-randomized smoothing
RULES = ("threshold", "argmax")
#: seed stream tag of the training-time ablation positions (see the module docstring)
#: the threat model every patch certificate of this module states in its ``meta``
THREAT_MODEL = "any patch of side <= m, anywhere, any content; deterministic, no alpha"
UNIT = "patch side (pixels)"


# ---------------------------------------------------------------------------------------------- checks
def _check_images(x: Any, name: str = "x") -> torch.Tensor:
    """A finite floating tensor of images ``[N, C, H, W]`` with ``N >= 1``."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of images [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} must be images [N, C, H, W], got shape {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{name} holds no images or no channels (shape {list(x.shape)})")
    return check_finite_tensor(x, name)


def _check_band(kind: str, band: Any, height: int, width: int) -> int:
    band = check_positive_int(band, "band")
    if kind == "column" and band > width:
        raise InputError(f"band={band} is wider than the image ({width} columns): a column band keeps "
                         f"1 to {width} columns")
    if kind == "block" and band > min(height, width):
        raise InputError(f"band={band} does not fit the {height}x{width} image: a block keeps band x band "
                         f"pixels, band from 1 to {min(height, width)}")
    return band


def _check_side(side: Any, height: int, width: int, name: str) -> int:
    side = check_positive_int(side, name)
    if side > min(height, width):
        raise InputError(f"{name}={side} is larger than the {height}x{width} image: a patch side goes from 1 "
                         f"to {min(height, width)}")
    return side


def _check_sides(patch_sizes: Any, height: int, width: int) -> tuple[int, ...]:
    if isinstance(patch_sizes, (int, np.integer)) and not isinstance(patch_sizes, bool):
        patch_sizes = (patch_sizes,)
    try:
        sides = tuple(patch_sizes)
    except TypeError as exc:
        raise InputError(f"patch_sizes must be a patch side or a sequence of them, got {patch_sizes!r}") from exc
    return tuple(_check_side(m, height, width, "patch_sizes") for m in sides)


def _first_layer(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return module
    return None


def _check_ablation_model(model: nn.Module, channels: int, size: tuple[int, int] | None = None) -> None:
    """The base model must take the ``2 * channels`` encoded channels (and the image size, where known)."""
    want = 2 * channels
    shape = expected_input_shape(model)
    fix = (f"build the base model with ablation_input_channels({channels}) = {want} input channels "
           f"(the (x, 1 - x) encoding)")
    if shape is not None:
        if shape[0] != want:
            raise InputError(f"the base model's first layer expects {shape[0]} input channel(s), but ablation "
                             f"encodes {channels}-channel images as {want} channels: {fix}")
        if size is not None and len(shape) == 3 and tuple(shape[1:]) != tuple(size):
            raise InputError(f"x has images of size {size[0]}x{size[1]} but the base model was built for "
                             f"{shape[1]}x{shape[2]}")
        return
    layer = _first_layer(model)
    if isinstance(layer, nn.Linear) and size is not None and layer.in_features != want * size[0] * size[1]:
        raise InputError(f"the base model's first layer is Linear({layer.in_features}, ...), but encoded "
                         f"{channels}x{size[0]}x{size[1]} images have {want * size[0] * size[1]} features: {fix}")


# ---------------------------------------------------------------------------------------------- ablation
def ablation_input_channels(channels: int) -> int:
    """Input channels of the base model of de-randomized smoothing for ``channels``-channel images: ``2C``.

    >>> ablation_input_channels(3)
    6
    """
    return 2 * check_positive_int(channels, "channels")


def _encode(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, 1.0 - x], dim=1)


def _num_ablations(kind: str, height: int, width: int) -> int:
    return width if kind == "column" else height * width


def _keep_masks(kind: str, band: int, height: int, width: int, index: torch.Tensor) -> torch.Tensor:
    """Bool ``[len(index), H, W]``: True where ablation number ``index`` keeps the pixel. Column ablation
    ``a`` keeps columns ``a, a+1, ..., a+band-1`` (mod W); block ablation ``a`` keeps the block whose top-left
    corner is ``(a // W, a % W)`` (rows and columns mod H, W)."""
    cols = torch.arange(width, device=index.device)
    if kind == "column":
        col_in = (cols[None, :] - index[:, None]) % width < band
        return col_in[:, None, :].expand(-1, height, -1)
    rows = torch.arange(height, device=index.device)
    row_in = (rows[None, :] - (index // width)[:, None]) % height < band
    col_in = (cols[None, :] - (index % width)[:, None]) % width < band
    return row_in[:, :, None] & col_in[:, None, :]


def _ablation_index(kind: str, start: Any, height: int, width: int) -> int:
    if kind == "column":
        col = check_positive_int(start, "start", minimum=0)
        if col >= width:
            raise InputError(f"start={col} is outside the image's columns 0..{width - 1}")
        return col
    if not isinstance(start, (tuple, list)) or len(start) != 2:
        raise InputError(f"start must be (row, column) for kind='block', got {start!r}")
    row, col = (check_positive_int(v, "start", minimum=0) for v in start)
    if row >= height or col >= width:
        raise InputError(f"start={tuple(start)} is outside the {height}x{width} image")
    return row * width + col


def _ablate(x: torch.Tensor, kind: str, index: int, band: int) -> torch.Tensor:
    keep = _keep_masks(kind, band, x.shape[2], x.shape[3], torch.tensor([index], device=x.device))[0]
    return _encode(x) * keep.to(x.dtype)


class AblatedModel(nn.Module):
    """A base classifier for de-randomized smoothing (Levine and Feizi, NeurIPS 2020): its first layer takes
    the ``2C`` channels ``(x, 1 - x)`` of ``C``-channel images in ``[0, 1]``.

    Args:
        model: any image classifier ``[N, 2C, H, W] -> [N, num_classes]`` (e.g. a certkit model built with
            ``input_shape=(ablation_input_channels(C), H, W)``).
        channels: ``C``, the channels of the *images*; inferred from the first ``Conv2d`` when omitted.

    :meth:`forward` takes already ablated, encoded inputs (from :meth:`ablate` or :func:`random_ablation`).

    >>> base = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> wrapped = AblatedModel(base)
    >>> wrapped.channels
    1
    >>> wrapped(wrapped.ablate(torch.rand(4, 1, 6, 6), "column", 0, 2)).shape
    torch.Size([4, 3])
    >>> AblatedModel(base, channels=3)
    Traceback (most recent call last):
    ...
    certkit.errors.InputError: the base model's first layer expects 2 input channel(s), but ablation encodes 3-channel images as 6 channels: build the base model with ablation_input_channels(3) = 6 input channels (the (x, 1 - x) encoding)
    """

    def __init__(self, model: nn.Module, channels: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if channels is None:
            shape = expected_input_shape(model)
            if shape is None:
                raise InputError("cannot tell the image channels from the model (no Conv2d first layer): pass "
                                 "channels=C, the channels of the images before the (x, 1 - x) encoding")
            if shape[0] % 2:
                raise InputError(f"the base model's first layer expects {shape[0]} input channel(s), an odd "
                                 f"number: ablation encodes C-channel images as 2C channels (x, 1 - x)")
            channels = shape[0] // 2
        channels = check_positive_int(channels, "channels")
        _check_ablation_model(model, channels)
        self.model = model
        self.channels = channels

    def check_images(self, x: Any, name: str = "x") -> torch.Tensor:
        """``x`` as images ``[N, C, H, W]`` that this model can ablate (channels and size); raises otherwise."""
        x = _check_images(x, name)
        if int(x.shape[1]) != self.channels:
            raise InputError(f"{name} has {int(x.shape[1])} channel(s) (shape {list(x.shape)}) but this "
                             f"AblatedModel encodes {self.channels}-channel images into "
                             f"{2 * self.channels} channels")
        _check_ablation_model(self.model, self.channels, (int(x.shape[2]), int(x.shape[3])))
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in ``[0, 1]``, ``[N, C, H, W]`` -> ``(x, 1 - x)``, ``[N, 2C, H, W]`` (nothing ablated).

        >>> AblatedModel(nn.Conv2d(2, 1, 1)).encode(torch.tensor([[[[0.25]]]])).flatten().tolist()
        [0.25, 0.75]
        """
        return _encode(self.check_images(x))

    def ablate(self, x: torch.Tensor, kind: str, start: int | tuple[int, int], band: int) -> torch.Tensor:
        """Encode ``x`` and keep one band: ``band`` columns from column ``start`` (``kind="column"``) or the
        ``band x band`` block with top-left corner ``start = (row, col)`` (``kind="block"``), wrapping around
        the edges; every other pixel becomes null (0 in all ``2C`` channels).

        >>> m = AblatedModel(nn.Conv2d(2, 1, 1))
        >>> m.ablate(torch.full((1, 1, 2, 4), 0.5), "column", 3, 2)[0, 0].tolist()
        [[0.5, 0.0, 0.0, 0.5], [0.5, 0.0, 0.0, 0.5]]
        >>> m.ablate(torch.ones(1, 1, 3, 3), "block", (2, 2), 2)[0, 0].tolist()
        [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
        """
        x = self.check_images(x)
        check_choice(kind, KINDS, "kind")
        h, w = int(x.shape[2]), int(x.shape[3])
        band = _check_band(kind, band, h, w)
        return _ablate(x, kind, _ablation_index(kind, start, h, w), band)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the base model on already ablated, encoded inputs ``[N, 2C, H, W]``."""
        return self.model(z)


def random_ablation(x: torch.Tensor, kind: str, band: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time ablation: one random band (block) position drawn from ``generator`` for the whole batch
    (Levine and Feizi's training), applied to the encoded batch ``[N, 2C, H, W]``.

    >>> g = torch.Generator().manual_seed(0)
    >>> z = random_ablation(torch.rand(5, 1, 8, 8), "column", 3, g)
    >>> z.shape, int((z[0, 1] != 0).any(dim=0).sum())
    (torch.Size([5, 2, 8, 8]), 3)
    """
    check_choice(kind, KINDS, "kind")
    x = _check_images(x)
    h, w = int(x.shape[2]), int(x.shape[3])
    band = _check_band(kind, band, h, w)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    index = int(torch.randint(_num_ablations(kind, h, w), (1,), generator=generator, device=gen_device))
    return _ablate(x, kind, index, band)


class AblationTransform:
    """``(x, step) -> random_ablation(x, kind, band, generator seeded with (seed, step))``: the training
    transform of de-randomized smoothing (picklable; the same ``(seed, step)`` gives the same position)."""

    def __init__(self, kind: str, band: int, seed: int) -> None:
        self.kind = check_choice(kind, KINDS, "kind")
        self.band = check_positive_int(band, "band")
        self.seed = check_seed(seed, limit=2**63)

    def generator(self, step: int) -> torch.Generator:
        """The CPU generator of batch ``step``."""
        step = check_positive_int(step, "step", minimum=0)
        return torch.Generator().manual_seed(derive_seed(self.seed, STREAM_ABLATION, step))

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return random_ablation(x, self.kind, self.band, self.generator(step))

    def __repr__(self) -> str:
        return f"AblationTransform(kind={self.kind!r}, band={self.band}, seed={self.seed})"


def ablation_train_transform(kind: str, band: int, seed: int) -> AblationTransform:
    """A callable ``(x, step) -> ablated encoded x`` for training loops: batch number ``step`` gets one band
    (block) position drawn from a ``torch.Generator`` seeded with ``derive_seed(seed, STREAM_ABLATION, step)``.

    >>> t = ablation_train_transform("column", 2, seed=0)
    >>> x = torch.rand(3, 1, 6, 6)
    >>> torch.equal(t(x, 5), t(x, 5)), t(x, 5).shape
    (True, torch.Size([3, 2, 6, 6]))
    """
    return AblationTransform(kind, band, seed)


class CutoutTransform:
    """``(x, step) -> x`` with ``masks`` squares of side ``side`` per image, at positions drawn from a generator
    seeded with ``derive_seed(seed, STREAM_CUTOUT, step)``, set to ``fill``: Cutout (DeVries & Taylor 2017), the
    augmentation PatchCleanser fine-tunes its models with (Xiang et al., USENIX Security 2022) so that they
    classify masked images. Picklable; the same ``(seed, step)`` gives the same masks.

    >>> t = CutoutTransform(side=3, seed=0, masks=2)
    >>> x = torch.ones(4, 1, 8, 8)
    >>> torch.equal(t(x, 7), t(x, 7)), bool((t(x, 7) == 0).any()), int((t(x, 7)[0] == 0).sum()) <= 18
    (True, True, True)
    """

    def __init__(self, side: int, seed: int, masks: int = 2, fill: float = 0.0) -> None:
        self.side = check_positive_int(side, "side")
        self.seed = check_seed(seed, limit=2**63)
        self.masks = check_positive_int(masks, "masks")
        self.fill = check_float(fill, "fill", minimum=-math.inf)

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        step = check_positive_int(step, "step", minimum=0)
        n, _, h, w = (int(s) for s in x.shape)
        side_h, side_w = min(self.side, h), min(self.side, w)
        g = torch.Generator().manual_seed(derive_seed(self.seed, STREAM_CUTOUT, step))
        rows = torch.randint(0, h - side_h + 1, (n, self.masks), generator=g).to(x.device)
        cols = torch.randint(0, w - side_w + 1, (n, self.masks), generator=g).to(x.device)
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        in_r = (ar_h >= rows[..., None]) & (ar_h < rows[..., None] + side_h)           # [n, masks, h]
        in_c = (ar_w >= cols[..., None]) & (ar_w < cols[..., None] + side_w)           # [n, masks, w]
        hidden = (in_r[..., :, None] & in_c[..., None, :]).any(dim=1)                  # [n, h, w]
        return torch.where(hidden[:, None], torch.as_tensor(self.fill, dtype=x.dtype, device=x.device), x)

    def __repr__(self) -> str:
        return f"CutoutTransform(side={self.side}, seed={self.seed}, masks={self.masks}, fill={self.fill})"


# ---------------------------------------------------------------------------------------------- votes
def patch_delta(kind: str, band: int, patch_side: int) -> int:
    """``Delta``: how many ablations a patch of side ``patch_side`` can touch, ``m + band - 1`` column bands
    or ``(m + band - 1)**2`` blocks (Levine and Feizi, NeurIPS 2020).

    >>> patch_delta("column", 4, 5), patch_delta("block", 2, 3)
    (8, 16)
    """
    check_choice(kind, KINDS, "kind")
    reach = check_positive_int(patch_side, "patch_side") + check_positive_int(band, "band") - 1
    return reach if kind == "column" else reach * reach


def _ranked(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction c, runner-up c', gap n_c - n_c') under the stable order: most votes, smaller index first.
    With one class, the runner-up is a virtual class ``1`` with 0 votes."""
    n, k = counts.shape
    order = np.argsort(-counts, axis=1, kind="stable")
    top = order[:, 0]
    n_top = counts[np.arange(n), top]
    if k < 2:
        return top, np.ones(n, dtype=np.int64), n_top
    second = order[:, 1]
    return top, second, n_top - counts[np.arange(n), second]


def certify_from_counts(counts: Any, *, kind: str, band: int, max_side: int,
                        patch_sizes: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prediction and certificate of de-randomized smoothing from vote counts ``[N, num_classes]``.

    ``c`` has most votes (smaller index wins ties), ``c'`` is the runner-up in the same order; side ``m`` is
    certified iff ``n_c - n_c' > 2 Delta(m)``, or ``n_c - n_c' == 2 Delta(m)`` and ``c < c'``
    (:func:`patch_delta`). Returns ``(prediction [N], largest certified side in 1..max_side or 0 [N],
    certified [N, len(patch_sizes)])``.

    >>> pred, side, ok = certify_from_counts([[10, 4, 0], [4, 10, 0]], kind="column", band=1, max_side=8,
    ...                                      patch_sizes=[3])
    >>> pred.tolist(), side.tolist(), ok.tolist()
    ([0, 1], [3, 2], [[True], [False]])
    """
    check_choice(kind, KINDS, "kind")
    band = check_positive_int(band, "band")
    max_side = check_positive_int(max_side, "max_side")
    try:
        arr = np.asarray(counts)
    except ValueError as exc:
        raise InputError("counts must be non-negative integer votes of shape [N, num_classes]") from exc
    if arr.ndim != 2 or arr.shape[1] == 0 or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise InputError(f"counts must be non-negative integer votes of shape [N, num_classes], got "
                         f"dtype {arr.dtype} and shape {arr.shape}")
    sides = [check_positive_int(m, "patch_sizes") for m in patch_sizes]
    top, second, gap = _ranked(arr.astype(np.int64))
    ms = np.arange(1, max_side + 1)
    reach = ms + band - 1
    deltas = reach if kind == "column" else reach * reach
    ok = (gap[:, None] > 2 * deltas[None, :]) | ((gap[:, None] == 2 * deltas[None, :]) & (top < second)[:, None])
    largest = np.where(ok, ms[None, :], 0).max(axis=1)
    certified = largest[:, None] >= np.asarray(sides, dtype=np.int64).reshape(1, -1)
    return top.astype(np.int64), largest.astype(np.int64), certified


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PatchCertificate:
    """Per-point patch certificates (Mode C; deterministic, unit: patch side in pixels).

    Attributes (length ``N`` unless stated):
        label: true class, ``-1`` if unknown.
        prediction: the certified classifier's prediction (never abstains).
        certified_side: the largest certified patch side, 0 if none.
        counts: ``[N, num_classes]`` votes (de-randomized smoothing: votes over all ablations;
            PatchCleanser: how many one-mask predictions name each class).
        patch_sizes: the requested patch sides.
        certified: ``[N, len(patch_sizes)]``, whether each requested side is certified.
        correct: ``prediction == label`` (False where the label is unknown).
        index: the point's id (its position unless given).
        meta: settings, ``unit`` and ``threat_model`` (JSON-serialisable).

    >>> cert = PatchCertificate(label=[0, 1, 2], prediction=[0, 1, 0], certified_side=[3, 1, 4],
    ...                         counts=[[8, 0], [0, 8], [8, 0]], patch_sizes=(2,))
    >>> cert.certified.ravel().tolist(), cert.certified_accuracy([1, 2, 3, 4]).tolist()
    ([True, False, True], [0.6666666666666666, 0.3333333333333333, 0.3333333333333333, 0.0])
    """

    label: np.ndarray
    prediction: np.ndarray
    certified_side: np.ndarray
    counts: np.ndarray
    patch_sizes: tuple[int, ...] = ()
    certified: np.ndarray | None = None
    correct: np.ndarray | None = None
    index: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prediction = np.asarray(self.prediction, dtype=np.int64).reshape(-1)
        n = self.prediction.shape[0]

        def column(name: str, values: Any, dtype: Any) -> np.ndarray:
            arr = np.asarray(values, dtype=dtype)
            if arr.ndim == 0:
                arr = np.full(n, arr.item(), dtype=dtype)
            if arr.shape != (n,):
                raise InputError(f"{name} must have shape [{n}], got {arr.shape}")
            return arr

        self.label = column("label", self.label, np.int64)
        self.certified_side = column("certified_side", self.certified_side, np.int64)
        if (self.certified_side < 0).any():
            raise InputError("certified_side must be non-negative")
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.ndim != 2 or self.counts.shape[0] != n:
            raise InputError(f"counts must have shape [{n}, num_classes], got {self.counts.shape}")
        self.patch_sizes = tuple(int(m) for m in self.patch_sizes)
        want = self.certified_side[:, None] >= np.asarray(self.patch_sizes, dtype=np.int64).reshape(1, -1)
        self.certified = want if self.certified is None else np.asarray(self.certified, dtype=bool)
        if self.certified.shape != (n, len(self.patch_sizes)):
            raise InputError(f"certified must have shape [{n}, {len(self.patch_sizes)}], got {self.certified.shape}")
        if self.correct is None:
            self.correct = (self.prediction == self.label) & (self.label >= 0)
        self.correct = column("correct", self.correct, bool)
        self.index = column("index", np.arange(n) if self.index is None else self.index, np.int64)
        self.meta = dict(self.meta)

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    def certified_accuracy(self, patch_sizes: int | Sequence[int]) -> float | np.ndarray:
        """Fraction of points that are correct with ``certified_side >= m``, for each side ``m``
        (``m = 0`` gives the plain accuracy of the certified classifier); NaN for an empty result."""
        m = np.asarray(patch_sizes)
        if not np.issubdtype(m.dtype, np.integer) or (m < 0).any():
            raise InputError(f"patch_sizes must be non-negative integers, got {patch_sizes!r}")
        if len(self) == 0:
            out = np.full(m.shape, np.nan)
        else:
            ok = self.correct[None, :] & (self.certified_side[None, :] >= m.reshape(-1, 1))
            out = ok.mean(axis=1).reshape(m.shape)
        return float(out) if out.ndim == 0 else out

    def accuracy(self) -> float:
        """Fraction of correct predictions (certified or not)."""
        return float(np.mean(self.correct)) if len(self) else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """One row per point: index, label, prediction, certified_side, correct, ``certified_m{m}`` for each
        requested side and ``votes_{c}`` for each class."""
        cols: dict[str, Any] = {"index": self.index, "label": self.label, "prediction": self.prediction,
                                "certified_side": self.certified_side, "correct": self.correct}
        for j, m in enumerate(self.patch_sizes):
            cols[f"certified_m{m}"] = self.certified[:, j]
        for c in range(self.counts.shape[1]):
            cols[f"votes_{c}"] = self.counts[:, c]
        return pd.DataFrame(cols)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field as (nested) lists, plus ``meta``."""
        return {"label": self.label.tolist(), "prediction": self.prediction.tolist(),
                "certified_side": self.certified_side.tolist(), "counts": self.counts.tolist(),
                "patch_sizes": list(self.patch_sizes), "certified": self.certified.tolist(),
                "correct": self.correct.tolist(), "index": self.index.tolist(), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCertificate:
        """Inverse of :meth:`to_dict`."""
        fields = ("label", "prediction", "certified_side", "counts", "patch_sizes", "certified", "correct", "index")
        kwargs = {k: data[k] for k in fields if k in data}
        kwargs["patch_sizes"] = tuple(kwargs.get("patch_sizes", ()))
        if "certified" in kwargs:
            kwargs["certified"] = np.asarray(kwargs["certified"], dtype=bool).reshape(
                len(data["prediction"]), len(kwargs["patch_sizes"]))
        return cls(**kwargs, meta=data.get("meta", {}))


@dataclass
class PatchCleanserCertificate(PatchCertificate):
    """A :class:`PatchCertificate` of PatchCleanser, with the ``[N, M, M]`` two-mask prediction map
    (``mask_predictions[n, i, j]``: the label with masks ``i`` and ``j``; the diagonal is one mask)."""

    mask_predictions: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask_predictions is not None:
            self.mask_predictions = np.asarray(self.mask_predictions, dtype=np.int64)
            if self.mask_predictions.ndim != 3 or self.mask_predictions.shape[0] != len(self):
                raise InputError(f"mask_predictions must have shape [{len(self)}, M, M], got "
                                 f"{self.mask_predictions.shape}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["mask_predictions"] = None if self.mask_predictions is None else self.mask_predictions.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchCleanserCertificate:
        base = PatchCertificate.from_dict(data)
        return cls(**{k: getattr(base, k) for k in ("label", "prediction", "certified_side", "counts",
                                                    "patch_sizes", "certified", "correct", "index", "meta")},
                   mask_predictions=data.get("mask_predictions"))


def patch_trigger_robustness(cert: PatchCertificate, trigger_side: int, target: int | None = None) -> float:
    """Certified trigger robustness of Mode C: the fraction of non-target points, certified *at their
    triggered inputs* ``x + t`` with their true labels, that are predicted correctly and certified at a
    patch side ``>= trigger_side`` (reference/patch-certificates.md section 0). NaN if no point is left.

    >>> cert = PatchCertificate(label=[0, 1, 2, 1], prediction=[0, 1, 2, 0], certified_side=[5, 3, 1, 4],
    ...                         counts=[[1]] * 4)
    >>> patch_trigger_robustness(cert, trigger_side=3, target=0)
    0.3333333333333333
    """
    if not isinstance(cert, PatchCertificate):
        raise InputError(f"cert must be a PatchCertificate, got {type(cert).__name__}")
    side = check_positive_int(trigger_side, "trigger_side")
    if (cert.label < 0).any():
        raise InputError("patch trigger robustness needs the true labels of the certified points")
    keep = np.ones(len(cert), dtype=bool)
    if target is not None:
        keep = cert.label != check_positive_int(target, "target", minimum=0)
    if not keep.any():
        return float("nan")
    return float((cert.correct & (cert.certified_side >= side))[keep].mean())


# ---------------------------------------------------------------------------------------------- passes
@contextmanager
def _evaluating(model: nn.Module, dev: torch.device) -> Iterator[torch.dtype]:
    """Eval mode on ``dev`` for the passes; yields the input dtype; mode and device restored afterwards."""
    was_training, home = model.training, module_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    model.eval()
    if home is not None and home != dev:
        model.to(dev)
    try:
        yield dtype
    finally:
        if home is not None and home != dev:
            model.to(home)
        model.train(was_training)


def _logits(model: Callable[[torch.Tensor], Any], z: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    out = model(z)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != z.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"model must return logits of shape [{z.shape[0]}, num_classes], got {got}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise InputError(f"model returned {num_classes} logits per input in one batch and {out.shape[1]} in another")
    if not bool(torch.isfinite(out).all()):
        raise InputError("model returned NaN or inf logits")
    return out


def _labels(y: Any, n: int, num_classes: int) -> np.ndarray:
    if y is None:
        return np.full(n, -1, dtype=np.int64)
    return check_labels(y, n, num_classes).numpy()


def derandomized_certify(model: nn.Module, x: torch.Tensor, y: Any = None, *, kind: str = "column",
                         band: int, patch_sizes: int | Sequence[int] = (), theta: float = 0.2,
                         rule: str = "threshold", batch_size: int = 512,
                         device: str | torch.device = "cpu") -> PatchCertificate:
    """Column / block de-randomized smoothing (Levine and Feizi, NeurIPS 2020): all ``W`` column (``H * W``
    block) ablations of every point, votes, prediction and the largest certified patch side.

    Args:
        model: an :class:`AblatedModel`, or a base model taking ``2C`` channels (wrapped here).
        x: images ``[N, C, H, W]`` in ``[0, 1]``; ``y``: optional true labels ``[N]``.
        kind: ``"column"`` (``W`` passes) or ``"block"`` (``H * W`` passes); band: columns (block side) kept.
        patch_sizes: patch sides to report in ``certified`` (each in ``1..min(H, W)``).
        theta, rule: ``"threshold"``: every class with softmax ``>= theta`` votes; ``"argmax"``: the top logit.
        batch_size: rows (ablated inputs) per forward; device: where the passes run.

    The largest certified side is the largest ``m`` in ``1..min(H, W)`` that passes
    :func:`certify_from_counts` (0 if none).

    >>> base = nn.Sequential(nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> _ = nn.init.zeros_(base[0].weight); _ = base[0].bias.data.copy_(torch.tensor([2.0, 0.0, 0.0]))
    >>> cert = derandomized_certify(base, torch.rand(2, 1, 6, 6), [0, 1], band=2, patch_sizes=[1, 2, 3])
    >>> cert.counts.tolist(), cert.certified_side.tolist(), cert.certified.tolist()
    ([[6, 0, 0], [6, 0, 0]], [2, 2], [[True, True, False], [True, True, False]])
    >>> cert.certified_accuracy([0, 2, 3]).tolist()
    [0.5, 0.5, 0.0]
    """
    check_choice(kind, KINDS, "kind")
    check_choice(rule, RULES, "rule")
    theta = check_float(theta, "theta", minimum=0.0, strict=True, maximum=1.0)
    batch_size = check_positive_int(batch_size, "batch_size")
    x = _check_images(x)
    n, c, h, w = (int(s) for s in x.shape)
    band = _check_band(kind, band, h, w)
    sides = _check_sides(patch_sizes, h, w)
    ablated = model if isinstance(model, AblatedModel) else AblatedModel(model, channels=c)
    ablated.check_images(x)
    dev = resolve_device(device)
    num_ablations = _num_ablations(kind, h, w)
    total = num_ablations * n
    counts: torch.Tensor | None = None
    with _evaluating(ablated, dev) as dtype, torch.inference_mode():
        enc = _encode(x.detach().to(dev, dtype))
        for r0 in range(0, total, batch_size):
            rows = torch.arange(r0, min(r0 + batch_size, total), device=dev)
            ablation, point = rows // n, rows % n
            keep = _keep_masks(kind, band, h, w, ablation)
            z = enc[point] * keep[:, None].to(dtype)
            logits = _logits(ablated, z, None if counts is None else counts.shape[1])
            if counts is None:
                counts = torch.zeros(n, logits.shape[1], dtype=torch.int64, device=dev)
            if rule == "threshold":
                votes = (torch.softmax(logits.float(), dim=1) >= theta).long()
            else:
                votes = nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1])
            counts.index_add_(0, point, votes)
    assert counts is not None
    counts_np = counts.cpu().numpy()
    prediction, largest, certified = certify_from_counts(counts_np, kind=kind, band=band, max_side=min(h, w),
                                                         patch_sizes=sides)
    meta = {"certificate": "derandomized-smoothing", "reference": "Levine and Feizi, NeurIPS 2020",
            "kind": kind, "band": band, "rule": rule, "theta": theta if rule == "threshold" else None,
            "num_ablations": num_ablations, "image_size": [h, w], "unit": UNIT, "threat_model": THREAT_MODEL,
            "deterministic": True}
    return PatchCertificate(label=_labels(y, n, counts_np.shape[1]), prediction=prediction,
                            certified_side=largest, counts=counts_np, patch_sizes=sides, certified=certified,
                            meta=meta)


# ---------------------------------------------------------------------------------------------- PatchCleanser
def _axis_positions(length: int, patch: int, k: int, axis: str) -> tuple[list[int], int, int]:
    """Mask positions, mask side and stride along one axis (an R-covering set for patch side ``patch``)."""
    positions_max = length - patch + 1
    if k < 2:
        raise InputError(f"k={k} masks per axis cannot cover the image usefully: one mask spans the whole "
                         f"{axis} (mask side {length}), so the masked predictions ignore the input; use k >= 2")
    if k > positions_max:
        raise InputError(f"k={k} masks per axis cannot be placed on a {axis} of {length} pixels: a patch of "
                         f"side {patch} has only {positions_max} positions there; use k <= {positions_max}")
    stride = math.ceil(positions_max / k)
    side = patch + stride - 1
    positions = list(range(0, length - side + 1, stride))
    if positions[-1] != length - side:
        positions.append(length - side)
    # every patch start q in [0, length - patch] must lie in [a, a + stride - 1] for some mask start a
    starts = np.arange(positions_max)
    covered = np.zeros(positions_max, dtype=bool)
    for a in positions:
        covered |= (starts >= a) & (starts + patch <= a + side)
    if not covered.all():  # cannot happen with the formula above; kept as a guard
        raise InputError(f"k={k} masks of side {side} (stride {stride}) cannot cover every patch position "
                         f"along the {axis}")
    return positions, side, stride


def _mask_geometry(image_size: Any, patch_size: Any, k: Any) -> tuple[int, int, int, tuple, tuple]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise InputError(f"image_size must be an int or (H, W), got {image_size!r}")
    h, w = (check_positive_int(v, "image_size") for v in image_size)
    p = _check_side(patch_size, h, w, "patch_size")
    k = check_positive_int(k, "k")
    return h, w, p, _axis_positions(h, p, k, "height"), _axis_positions(w, p, k, "width")


def patchcleanser_masks(image_size: int | tuple[int, int], patch_size: int, k: int) -> torch.Tensor:
    """PatchCleanser's R-covering mask set (Xiang et al., USENIX Security 2022): bool ``[M, H, W]``, True where
    a pixel is masked, every ``patch_size x patch_size`` patch lying entirely inside at least one mask.

    Per axis of length ``L``: stride ``s = ceil((L - p + 1) / k)``, mask side ``p + s - 1``, positions
    ``0, s, 2s, ...`` with the last position ``L - (p + s - 1)`` appended when missing: at most ``k`` per
    axis, ``M`` = (row positions) x (column positions), row-major. ``k < 2`` (one mask over the whole image)
    and ``k > L - p + 1`` (more masks than patch positions) raise :class:`InputError`.

    >>> masks = patchcleanser_masks((8, 8), 2, 3)
    >>> masks.shape, int(masks[0].sum()), masks[0, :5, :5].int().sum(dim=1).tolist()
    (torch.Size([9, 8, 8]), 16, [4, 4, 4, 4, 0])
    """
    h, w, _, (rows, side_h, _), (cols, side_w, _) = _mask_geometry(image_size, patch_size, k)
    masks = torch.zeros(len(rows) * len(cols), h, w, dtype=torch.bool)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            masks[i * len(cols) + j, r:r + side_h, c:c + side_w] = True
    return masks


def double_masking(mask_predictions: Any, num_classes: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PatchCleanser's decision from a two-mask prediction map ``[N, M, M]`` (symmetric; the diagonal holds
    the one-mask predictions): ``(prediction [N], certified [N], one-mask votes [N, num_classes])``.

    Unanimous one-mask predictions give that label; otherwise the first disagreer mask ``i`` (one-mask label
    != the majority) whose two-mask predictions ``map[i, :]`` all equal its one-mask label; otherwise the
    majority (smaller index wins ties). Certified iff the whole map equals the prediction (Xiang et al.).

    >>> agree = [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    >>> disagreer = [[0, 0, 0], [0, 1, 2], [0, 2, 1]]  # masks 1, 2 vote 1 (majority); mask 0 votes 0
    >>> majority = [[0, 1, 0], [1, 1, 1], [0, 1, 1]]
    >>> pred, cert, votes = double_masking([agree, [[0, 0, 0], [0, 1, 1], [0, 1, 1]]])
    >>> pred.tolist(), cert.tolist()
    ([1, 0], [True, False])
    >>> double_masking([disagreer, majority])[0].tolist()
    [0, 1]
    """
    try:
        pred2 = np.asarray(mask_predictions)
    except ValueError as exc:
        raise InputError("mask_predictions must be integer labels of shape [N, M, M]") from exc
    if (pred2.ndim != 3 or pred2.shape[1] != pred2.shape[2] or pred2.shape[1] == 0
            or not np.issubdtype(pred2.dtype, np.integer) or (pred2 < 0).any()):
        raise InputError(f"mask_predictions must be non-negative integer labels of shape [N, M, M], got dtype "
                         f"{pred2.dtype} and shape {pred2.shape}")
    if not (pred2 == pred2.transpose(0, 2, 1)).all():
        raise InputError("mask_predictions must be symmetric: masks i and j together are masks j and i")
    pred2 = pred2.astype(np.int64)
    k = int(pred2.max()) + 1 if num_classes is None else check_positive_int(num_classes, "num_classes")
    if pred2.max() >= k:
        raise InputError(f"mask_predictions holds label {int(pred2.max())} but num_classes is {k}")
    n, m, _ = pred2.shape
    one = pred2[:, np.arange(m), np.arange(m)]  # [N, M] one-mask predictions
    votes = np.zeros((n, k), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), m), one.ravel()), 1)
    majority = votes.argmax(axis=1)  # first maximum: the smaller index wins ties
    agree = (one == one[:, :1]).all(axis=1)
    consistent = (pred2 == one[:, :, None]).all(axis=2) & (one != majority[:, None])  # [N, M]
    chosen = one[np.arange(n), consistent.argmax(axis=1)]  # the first consistent disagreer
    prediction = np.where(agree, one[:, 0], np.where(consistent.any(axis=1), chosen, majority))
    certified = (pred2 == prediction[:, None, None]).all(axis=(1, 2))
    return prediction, certified, votes


def patchcleanser_certify(model: nn.Module, x: torch.Tensor, y: Any = None, *, patch_size: int, k: int = 6,
                          fill: float = 0.0, batch_size: int = 512,
                          device: str | torch.device = "cpu") -> PatchCleanserCertificate:
    """PatchCleanser double masking and its certificate (Xiang et al., USENIX Security 2022) for any classifier.

    With the masks of :func:`patchcleanser_masks` (``M`` of them; ``M = k**2`` when each axis holds ``k``),
    the model predicts every two-mask input, ``M (M + 1) / 2`` passes (``k**2 (k**2 + 1) / 2``) including the
    ``M`` one-mask inputs, batched. Prediction (double masking): the one-mask label when all ``M`` agree;
    otherwise the first *disagreer* mask (one-mask label != the majority) whose two-mask predictions all equal
    its own label; otherwise the majority one-mask label (smaller index wins ties). Certified for side
    ``patch_size`` (and so every smaller side) iff every two-mask prediction equals the prediction.
    Masked pixels are set to ``fill`` (pixel units, before the model's own normalisation).

    >>> base = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    >>> _ = nn.init.zeros_(base[1].weight); _ = base[1].bias.data.copy_(torch.tensor([0.0, 1.0]))
    >>> cert = patchcleanser_certify(base, torch.rand(3, 1, 8, 8), [1, 1, 0], patch_size=2, k=3)
    >>> cert.meta["num_masks"], cert.meta["num_passes"], cert.certified_side.tolist()
    (9, 45, [2, 2, 2])
    >>> cert.certified_accuracy(2)
    0.6666666666666666
    """
    fill = check_float(fill, "fill", minimum=-math.inf)
    batch_size = check_positive_int(batch_size, "batch_size")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = check_model_input(model, _check_images(x))
    n, _, h, w = (int(s) for s in x.shape)
    _, _, p, (rows_, side_h, stride_h), (cols_, side_w, stride_w) = _mask_geometry((h, w), patch_size, k)
    dev = resolve_device(device)
    masks = patchcleanser_masks((h, w), p, k).to(dev)
    m = masks.shape[0]
    first, second = torch.triu_indices(m, m, device=dev)  # i <= j: the diagonal is the one-mask inputs
    total = first.numel() * n
    pred2 = torch.full((n, m, m), -1, dtype=torch.int64, device=dev)
    num_classes: int | None = None
    with _evaluating(model, dev) as dtype, torch.inference_mode():
        xd = x.detach().to(dev, dtype)
        fill_value = torch.tensor(fill, dtype=dtype, device=dev)
        for r0 in range(0, total, batch_size):
            rows = torch.arange(r0, min(r0 + batch_size, total), device=dev)
            pair, point = rows // n, rows % n
            i, j = first[pair], second[pair]
            masked = (masks[i] | masks[j])[:, None]
            z = torch.where(masked, fill_value, xd[point])
            logits = _logits(model, z, num_classes)
            num_classes = int(logits.shape[1])
            label = logits.argmax(dim=1)
            pred2[point, i, j] = label
            pred2[point, j, i] = label
    assert num_classes is not None
    pred2_np = pred2.cpu().numpy()
    pred_np, certified, counts = double_masking(pred2_np, num_classes)
    side = np.where(certified, p, 0)
    meta = {"certificate": "patchcleanser", "reference": "Xiang, Mahloujifar and Mittal, USENIX Security 2022",
            "patch_size": p, "k": int(k), "num_masks": m, "masks_per_axis": [len(rows_), len(cols_)],
            "mask_size": [side_h, side_w], "mask_stride": [stride_h, stride_w], "fill": fill,
            "num_passes": int(first.numel()), "image_size": [h, w], "unit": UNIT, "threat_model": THREAT_MODEL,
            "deterministic": True}
    return PatchCleanserCertificate(label=_labels(y, n, num_classes), prediction=pred_np, certified_side=side,
                                    counts=counts, patch_sizes=(p,), meta=meta, mask_predictions=pred2_np)
