"""Backdoor triggers and data poisoning.

An :class:`Attack` stamps a trigger on inputs (``apply``), reports the trigger's l2 norm per input in
pixel units (``trigger_norms``, compared with certified radii), and poisons a training set (``poison``):
a seeded choice of ``round(rate * N)`` *non-target* samples gets the trigger and the target label
(clean-label attacks such as :class:`SIG` stamp *target-class* samples instead and keep every label).

Implemented (registry names in :data:`ATTACKS`):

- ``badnets``: :class:`BadNets` patch (Gu et al. 2017);
- ``blended``: :class:`Blended` alpha-blend of a seeded noise pattern (Chen et al. 2017);
- ``rab-one-pixel``, ``rab-four-pixel``, ``rab-blending``: RAB's additive triggers of l2 norm ``delta``
  (:class:`RABOnePixel`, :class:`RABFourPixel`, :class:`RABBlending`; Weber et al., IEEE S&P 2023),
  added *unclipped*, so triggered inputs may leave [0, 1];
- ``wanet``: :class:`WaNet` warping trigger with noise mode (Nguyen & Tran, ICLR 2021);
- ``sig``: :class:`SIG` clean-label sinusoidal signal (Barni et al., ICIP 2019).

Every trigger or pattern is generated from a seed; nothing is downloaded.

To add an attack: subclass :class:`Attack`, set ``name``, store the constructor's keyword parameters
as attributes of the same name (listed in ``params``), implement ``_stamp(x)`` (``x`` is a private copy
``[N, C, H, W]`` in [0, 1]; return the triggered batch) and decorate the class with ``@register``.
``config()`` / ``make_attack(**config)`` then round-trip through JSON. Class attributes adapt the rest:
``clip = False`` keeps ``apply``'s output unclipped (the poisoned :class:`~certkit.backdoor.data.ArrayDataset`
is then built with ``check_range=False``); ``relabel = False`` keeps the labels of poisoned samples;
``_candidates`` chooses which samples may be poisoned; ``_poison_extra`` adds extra modified samples
(WaNet's noise mode); ``_norms`` may return the exact trigger norm (RAB's additive triggers).

Decisions (not fixed by the design notes):

- Poisoning is static (one triggered copy per chosen sample), not per batch as in WaNet's and
  BackdoorBench's training loops; no data augmentation is applied.
- ``TriggeredSet.trigger_norms`` comes from the attack's ``_norms`` (the same values as
  ``trigger_norms``), so RAB's triggers report exactly ``delta``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from certkit._validation import (
    check_choice,
    check_finite_tensor,
    check_number,
    check_positive_int,
    check_seed,
)
from certkit.backdoor.data import ArrayDataset
from certkit.errors import InputError

__all__ = [
    "ATTACKS",
    "Attack",
    "BadNets",
    "Blended",
    "PoisonedDataset",
    "RABBlending",
    "RABFourPixel",
    "RABOnePixel",
    "SIG",
    "TriggeredSet",
    "WaNet",
    "make_attack",
    "register",
    "triggered_test_set",
]

_REGISTRY: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding an :class:`Attack` subclass to the registry used by :func:`make_attack`."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} must set a class attribute 'name'")
    _REGISTRY[cls.name] = cls
    return cls


@dataclass
class PoisonedDataset:
    """A poisoned training set.

    Attributes:
        dataset: the poisoned copy (triggered inputs relabelled to ``target``; a clean-label attack such
            as :class:`SIG` triggers target-class inputs and keeps every label). Built with
            ``check_range=False`` when the attack does not clip (RAB's additive triggers).
        poison_indices: sorted int64 indices (into ``dataset``) of the poisoned samples.
        target: the target class.
        rate: the requested poisoning rate (fraction of the whole training set).
        noise_indices: sorted int64 indices of extra samples that got a *perturbed* trigger and kept
            their label (WaNet's noise mode); disjoint from ``poison_indices``; empty for other attacks.
    """

    dataset: ArrayDataset
    poison_indices: np.ndarray
    target: int
    rate: float
    noise_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_poisoned(self) -> int:
        return int(len(self.poison_indices))


@dataclass
class TriggeredSet:
    """Triggered non-target test inputs, for attack success rate and certified trigger robustness.

    Attributes:
        x: triggered inputs ``[M, C, H, W]`` in [0, 1] (may leave [0, 1] for unclipped additive triggers).
        y_true: their true labels, int64 ``[M]`` (all different from ``target``).
        indices: int64 indices of these inputs in the clean test set, ``[M]``.
        trigger_norms: l2 norm of the trigger on each input, pixel units, ``[M]``.
        target: the target class.
    """

    x: torch.Tensor
    y_true: torch.Tensor
    indices: np.ndarray
    trigger_norms: torch.Tensor
    target: int

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _check_images(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    check_finite_tensor(x, name)
    if x.dim() != 4:
        raise InputError(f"{name} must have shape [N, C, H, W], got {tuple(x.shape)}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise InputError(f"{name} must lie in [0, 1] (pixel units), got min {float(x.min()):g}, max {float(x.max()):g}")
    return x


_number = check_number


def _positive(value: Any, name: str) -> float:
    v = _number(value, name)
    if not (v > 0.0) or math.isinf(v):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _check_target(target: Any, num_classes: int) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise InputError(f"target must be an integer class index, got {target!r}")
    if not (0 <= int(target) < num_classes):
        raise InputError(f"target must lie in [0, {num_classes}), got {target}")
    return int(target)


class Attack(ABC):
    """Base class of backdoor triggers (constructor stores parameters; no state is fitted)."""

    #: registry name, e.g. ``"badnets"``
    name: ClassVar[str] = ""
    #: names of the constructor parameters (each stored as an attribute of the same name)
    params: ClassVar[tuple[str, ...]] = ()
    #: whether ``apply`` clips its output to [0, 1] (``False``: additive triggers kept exact, e.g. RAB's)
    clip: ClassVar[bool] = True
    #: whether ``poison`` relabels the poisoned samples to the target (``False``: clean-label attack)
    relabel: ClassVar[bool] = True

    @abstractmethod
    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a private copy ``x`` ``[N, C, H, W]`` (may modify it in place); return the result."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return a triggered copy of ``x`` (``[N, C, H, W]`` in [0, 1]), clipped to [0, 1] unless the
        attack sets ``clip = False`` (then the result may leave [0, 1]). ``x`` itself is not modified."""
        _check_images(x)
        out = self._stamp(x.detach().clone())
        return out.clamp_(0.0, 1.0) if self.clip else out

    def _norms(self, x: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
        """Per-input l2 norm of the trigger, given ``x`` and ``triggered = apply(x)``; float64 ``[N]``."""
        return (triggered.double() - x.detach().double()).flatten(1).norm(dim=1)

    def trigger_norms(self, x: torch.Tensor) -> torch.Tensor:
        """l2 norm of ``apply(x) - x`` per input (pixel units), float64 ``[N]`` on ``x``'s device."""
        return self._norms(x, self.apply(x))

    def _patch_pixels(self, h: int, w: int) -> list[tuple[int, int]] | None:
        """The ``(row, col)`` the trigger may change on ``h x w`` images, or ``None`` when it changes the
        whole image (a global trigger: Blended, WaNet, SIG, RAB's blending pattern)."""
        return None

    def patch_side(self, input_shape: tuple[int, ...]) -> int | None:
        """Side of the smallest square holding every pixel the trigger changes (the unit of patch
        certificates, Mode C), or ``None`` for a global trigger: patch certificates do not apply to it.

        >>> BadNets(patch_size=3).patch_side((1, 8, 8)), Blended().patch_side((1, 8, 8))
        (3, None)
        """
        h, w = (int(s) for s in tuple(input_shape)[-2:])
        pixels = self._patch_pixels(h, w)
        if pixels is None:
            return None
        rows, cols = [r for r, _ in pixels], [c for _, c in pixels]
        return max(max(rows) - min(rows) + 1, max(cols) - min(cols) + 1)

    def _candidates(self, y: np.ndarray, target: int) -> tuple[np.ndarray, str]:
        """Indices that ``poison`` may trigger and a description for the error message (default: the
        samples whose label is not ``target``)."""
        return np.flatnonzero(y != target), f"have a label other than the target {target}"

    def _poison_extra(
        self, x: torch.Tensor, y: torch.Tensor, poison_idx: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Hook run by ``poison`` after stamping: may modify other rows of the copies ``x``, ``y`` in place
        and returns their sorted int64 indices (``PoisonedDataset.noise_indices``). Default: none."""
        return np.zeros(0, dtype=np.int64)

    def poison(self, dataset: ArrayDataset, rate: float, target: int, seed: int = 0) -> PoisonedDataset:
        """Poison ``round(rate * len(dataset))`` samples chosen uniformly (``numpy.random.default_rng(seed)``)
        among those whose label is not ``target``: stamp the trigger and relabel them to ``target``.
        (Clean-label attacks choose among the target-class samples and keep the labels; WaNet's noise mode
        also perturbs extra samples, see :class:`WaNet`.)

        Args:
            dataset: clean training set (not modified).
            rate: fraction of the *whole* training set to poison, ``0 <= rate < 1``.
            target: target class in ``[0, num_classes)``.
            seed: seed of the choice of samples.
        """
        if not isinstance(dataset, ArrayDataset):
            raise InputError(f"dataset must be an ArrayDataset, got {type(dataset).__name__}")
        r = _number(rate, "rate")
        if not (0.0 <= r < 1.0):
            raise InputError(f"rate must lie in [0, 1), got {rate!r}")
        target = _check_target(target, dataset.num_classes)
        n_poison = int(round(r * len(dataset)))
        candidates, described = self._candidates(dataset.y.numpy(), target)
        if n_poison > len(candidates):
            raise InputError(
                f"cannot poison {n_poison} samples (rate {r:g} of {len(dataset)}): only {len(candidates)} "
                f"samples {described}"
            )
        rng = np.random.default_rng(int(seed))
        idx = np.sort(rng.choice(candidates, size=n_poison, replace=False)).astype(np.int64)
        x, y = dataset.x.clone(), dataset.y.clone()
        if n_poison:
            t = torch.from_numpy(idx)
            x[t] = self.apply(x[t])
            if self.relabel:
                y[t] = target
        extra = self._poison_extra(x, y, idx, rng)
        name = f"{dataset.name}+{self.name}" if dataset.name else self.name
        data = ArrayDataset(x, y, dataset.num_classes, name, check_range=self.clip)
        return PoisonedDataset(data, idx, target, r, noise_indices=extra)

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **params}`` (JSON-serialisable); ``make_attack(**config)`` rebuilds the attack."""
        return {"name": self.name, **{p: getattr(self, p) for p in self.params}}

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config() == other.config()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.config().items()))))


BADNETS_LOCATIONS = ("bottom-right", "bottom-left", "top-right", "top-left")
BADNETS_PATTERNS = ("solid", "checkerboard")


@register
class BadNets(Attack):
    """BadNets patch trigger (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning
    Model Supply Chain", 2017): a ``patch_size x patch_size`` square in a corner of the image, on every
    channel, replaces the pixels.

    Args:
        patch_size: side of the square in pixels (must fit the image).
        value: patch intensity in [0, 1].
        location: ``"bottom-right" | "bottom-left" | "top-right" | "top-left"``.
        pattern: ``"solid"`` (every patch pixel = ``value``) or ``"checkerboard"`` (pixel ``(i, j)`` of the
            patch is ``value`` when ``i + j`` is even, else ``1 - value``).
    """

    name = "badnets"
    params = ("patch_size", "value", "location", "pattern")

    def __init__(
        self, patch_size: int = 2, value: float = 1.0, location: str = "bottom-right", pattern: str = "solid"
    ) -> None:
        self.patch_size = check_positive_int(patch_size, "patch_size")
        v = _number(value, "value")
        if not (0.0 <= v <= 1.0):
            raise InputError(f"value must lie in [0, 1], got {value!r}")
        self.value = v
        self.location = check_choice(location, BADNETS_LOCATIONS, "location")
        self.pattern = check_choice(pattern, BADNETS_PATTERNS, "pattern")

    def patch(self) -> torch.Tensor:
        """The patch, float32 ``[patch_size, patch_size]``."""
        p = self.patch_size
        if self.pattern == "solid":
            return torch.full((p, p), self.value)
        i = torch.arange(p)
        even = ((i[:, None] + i[None, :]) % 2) == 0
        return torch.where(even, torch.tensor(self.value), torch.tensor(1.0 - self.value))

    def _corner(self, h: int, w: int) -> tuple[int, int]:
        p = self.patch_size
        if p > h or p > w:
            raise InputError(f"BadNets patch of size {p} does not fit {h}x{w} images")
        return (h - p if self.location.startswith("bottom") else 0, w - p if self.location.endswith("right") else 0)

    def _patch_pixels(self, h: int, w: int) -> list[tuple[int, int]]:
        r0, c0 = self._corner(h, w)
        return [(r0 + i, c0 + j) for i in range(self.patch_size) for j in range(self.patch_size)]

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        r0, c0 = self._corner(*x.shape[-2:])
        p = self.patch_size
        x[:, :, r0 : r0 + p, c0 : c0 + p] = self.patch().to(device=x.device, dtype=x.dtype)
        return x


@register
class Blended(Attack):
    """Blended trigger (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
    Poisoning", 2017), random-pattern variant: ``x' = (1 - alpha) * x + alpha * pattern``.

    The pattern has the shape of one input ``[C, H, W]``, entries ``U[0, 1]`` drawn from a
    ``torch.Generator`` seeded with ``seed`` (on the CPU, so it is the same on every device). No image
    is downloaded. The trigger's l2 norm is ``alpha * ||pattern - x||_2``.

    Args:
        alpha: blend weight in (0, 1].
        seed: seed of the pattern.
    """

    name = "blended"
    params = ("alpha", "seed")

    def __init__(self, alpha: float = 0.1, seed: int = 0) -> None:
        a = _number(alpha, "alpha")
        if not (0.0 < a <= 1.0):
            raise InputError(f"alpha must lie in (0, 1], got {alpha!r}")
        self.alpha = a
        self.seed = check_seed(seed, limit=2**63)

    def pattern(self, input_shape: tuple[int, int, int]) -> torch.Tensor:
        """The blend pattern, float32 ``input_shape`` = ``(C, H, W)`` with entries in [0, 1)."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(tuple(int(s) for s in input_shape), generator=gen)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        pat = self.pattern(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
        return x.mul_(1.0 - self.alpha).add_(self.alpha * pat)


def _scaled_index(ref: int, size: int) -> int:
    """Index ``ref`` of a 28-pixel MNIST axis mapped to an axis of ``size`` pixels (``ref`` on 28)."""
    return int(math.floor(ref * (size - 1) / 27 + 0.5))


class _RABAdditive(Attack):
    """Shared behaviour of RAB's additive triggers: ``x' = x + t`` with ``||t||_2 = delta``, unclipped
    (``clip = False``): ``apply`` may return values outside [0, 1], the poisoned training set is an
    ``ArrayDataset(check_range=False)``, and ``trigger_norms`` (and ``TriggeredSet.trigger_norms``) return
    exactly ``delta`` for every input (``||apply(x) - x||`` equals it up to float32 rounding)."""

    clip = False
    delta: float

    @abstractmethod
    def trigger(self, input_shape: tuple[int, int, int]) -> torch.Tensor:
        """The additive trigger, float64 ``input_shape`` = ``(C, H, W)``, l2 norm ``delta``."""

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trigger(tuple(x.shape[1:])).to(device=x.device)
        return (x.double() + t).to(x.dtype)

    def _norms(self, x: torch.Tensor, triggered: torch.Tensor) -> torch.Tensor:
        # the trigger added to every input has norm exactly ``delta`` (unclipped); ``apply``'s float32
        # output differs from ``x`` by it up to float32 rounding only
        return torch.full((x.shape[0],), self.delta, dtype=torch.float64, device=x.device)


def _check_position(position: Any) -> tuple[int, int] | None:
    if position is None:
        return None
    if (
        isinstance(position, (str, bytes))
        or not isinstance(position, (tuple, list))
        or len(position) != 2
        or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0 for p in position)
    ):
        raise InputError(f"position must be None or a (row, col) pair of integers >= 0, got {position!r}")
    return (int(position[0]), int(position[1]))


def _check_fits(pixels: list[tuple[int, int]], h: int, w: int, what: str) -> None:
    for r, c in pixels:
        if not (0 <= r < h and 0 <= c < w):
            raise InputError(f"position: {what} pixel ({r}, {c}) is outside {h}x{w} images")


@register
class RABOnePixel(_RABAdditive):
    """RAB's one-pixel trigger (Weber et al., "RAB: Provable Robustness Against Backdoor Attacks", IEEE
    S&P 2023; reference code AI-secure/Robustness-Against-Backdoor-Attacks ``attack_lib.py``): add
    ``delta / sqrt(C)`` to one pixel on every channel, so ``||t||_2 = delta`` exactly.

    Where certkit differs from the reference code: the sum is *not* clipped (the reference clips this
    pixel to ``min(x + delta, 1)``; only its blending trigger is unclipped), so triggered inputs may leave
    [0, 1] and the trigger norm is exactly ``delta`` on every input, as the certificates assume; the
    default pixel is MNIST's (23, 23) scaled to the image, ``round(23 (H - 1) / 27)`` (the reference uses
    (15, 15) on CIFAR-10, (112, 112) on ImageNet).

    Args:
        delta: l2 norm of the trigger (pixel units), > 0.
        position: ``(row, col)`` of the pixel, or ``None`` for the default near the bottom-right corner:
            (23, 23) on 28x28, (6, 6) on 8x8, (26, 26) on 32x32.
    """

    name = "rab-one-pixel"
    params = ("delta", "position")

    def __init__(self, delta: float = 1.0, position: tuple[int, int] | None = None) -> None:
        self.delta = _positive(delta, "delta")
        self.position = _check_position(position)

    def _patch_pixels(self, h: int, w: int) -> list[tuple[int, int]]:
        return [self.pixel(h, w)]

    def pixel(self, h: int, w: int) -> tuple[int, int]:
        """The triggered ``(row, col)`` on ``h x w`` images."""
        r, c = self.position if self.position is not None else (_scaled_index(23, h), _scaled_index(23, w))
        _check_fits([(r, c)], h, w, "the trigger")
        return r, c

    def trigger(self, input_shape: tuple[int, int, int]) -> torch.Tensor:
        c, h, w = (int(s) for s in input_shape)
        r, col = self.pixel(h, w)
        t = torch.zeros(c, h, w, dtype=torch.float64)
        t[:, r, col] = self.delta / math.sqrt(c)
        return t


@register
class RABFourPixel(_RABAdditive):
    """RAB's four-pixel trigger (Weber et al., IEEE S&P 2023; reference ``attack_lib.py``): add
    ``delta / sqrt(4 C)`` to four pixels ``(r-1, c+1), (r, c), (r+1, c-1), (r+1, c+1)`` on every channel
    (``delta / 2`` each on one channel), so ``||t||_2 = delta`` exactly.

    Where certkit differs from the reference code: the sum is *not* clipped (the reference clips each
    pixel to 1), so triggered inputs may leave [0, 1] and the norm is exactly ``delta`` on every input;
    the default centre ``(r, c)`` is MNIST's (19, 19) scaled to the image, ``round(19 (H - 1) / 27)``
    (the reference: the same shape around (15, 15) on CIFAR-10 and (112, 112) on ImageNet).

    Args:
        delta: l2 norm of the trigger (pixel units), > 0.
        position: ``(row, col)`` of the pattern's centre pixel ``(r, c)`` (all four pixels must fit), or
            ``None`` for the default: (19, 19) on 28x28, (5, 5) on 8x8, (22, 22) on 32x32.
    """

    name = "rab-four-pixel"
    params = ("delta", "position")

    def __init__(self, delta: float = 1.0, position: tuple[int, int] | None = None) -> None:
        self.delta = _positive(delta, "delta")
        self.position = _check_position(position)

    def _patch_pixels(self, h: int, w: int) -> list[tuple[int, int]]:
        return self.pixels(h, w)

    def pixels(self, h: int, w: int) -> list[tuple[int, int]]:
        """The four triggered ``(row, col)`` on ``h x w`` images."""
        r, c = self.position if self.position is not None else (_scaled_index(19, h), _scaled_index(19, w))
        pix = [(r - 1, c + 1), (r, c), (r + 1, c - 1), (r + 1, c + 1)]
        _check_fits(pix, h, w, "four-pixel trigger")
        return pix

    def trigger(self, input_shape: tuple[int, int, int]) -> torch.Tensor:
        c, h, w = (int(s) for s in input_shape)
        t = torch.zeros(c, h, w, dtype=torch.float64)
        for r, col in self.pixels(h, w):
            t[:, r, col] = self.delta / math.sqrt(4 * c)
        return t


@register
class RABBlending(_RABAdditive):
    """RAB's "blending" trigger (Weber et al., IEEE S&P 2023; reference ``attack_lib.py``): a fixed
    ``N(0, I)`` pattern of the input's shape, rescaled to l2 norm ``delta`` and *added* unclipped (as in
    the reference code; it is not an alpha-blend), so triggered inputs may leave [0, 1].

    The pattern is ``numpy.random.RandomState(seed).randn(C, H, W)``, the same draw as the reference's
    ``np.random.seed(seed); np.random.randn(C, H, W)`` (seed 0 there). certkit rescales it in float64
    (the reference in float32).

    Args:
        delta: l2 norm of the trigger (pixel units), > 0.
        seed: seed of the pattern.
    """

    name = "rab-blending"
    params = ("delta", "seed")

    def __init__(self, delta: float = 1.0, seed: int = 0) -> None:
        self.delta = _positive(delta, "delta")
        self.seed = check_seed(seed, limit=2**63)

    def trigger(self, input_shape: tuple[int, int, int]) -> torch.Tensor:
        shape = tuple(int(s) for s in input_shape)
        noise = np.random.RandomState(self.seed).randn(*shape)
        return torch.from_numpy(noise / np.linalg.norm(noise) * self.delta)


@register
class WaNet(Attack):
    """WaNet warping trigger (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor Attack",
    ICLR 2021; as in their code and BackdoorBench): a ``k x k`` grid of uniform [-1, 1] displacements
    (seeded, divided by its mean absolute value) is bicubically upsampled to ``H x W``, scaled by ``s / H``
    (rows) and ``s / W`` (columns), added to the identity sampling grid, multiplied by ``grid_rescale``,
    clipped to [-1, 1] and applied with ``torch.nn.functional.grid_sample`` (bilinear,
    ``align_corners=True``, zero padding).

    Noise mode (``noise_mode=True``, the paper's "noise" / cross samples): ``poison`` also picks
    ``round(cross_ratio * n_poison)`` further samples (any label, not poisoned) and warps each with the
    trigger's grid plus its own uniform [-1, 1] / H perturbation (clipped to [-1, 1]); they keep their
    labels, so the network must learn the exact warp, not any warp.

    Where certkit differs: poisoning is static (the paper poisons and perturbs each batch afresh);
    the noise samples are drawn from ``seed`` of ``poison``; no augmentation; on non-square images the
    column displacement is scaled by ``1 / W`` (the paper uses ``1 / H`` for both); the noise count is
    ``round(cross_ratio * n_poison)`` (the paper: ``int(cross_ratio * n_poison)`` per batch). Default
    strength ``s = 1.0`` (the paper's 0.5): the mean displacement is about ``s / 2`` pixels whatever the
    image size, so ``s = 1`` stays a sub-pixel warp on larger images; on 8x8 digits (a 4x4 control grid
    is nearly as fine as the per-pixel noise-mode jitter) it is learnt more easily than 0.5 (digits-cnn,
    rate 0.1, 10 epochs: ASR 0.32-0.60 vs 0.16-0.50 over 3 seeds) and with rate 0.2 and 40 epochs
    reaches ASR 0.66-0.86 at clean accuracy >= 0.95 (5 seeds; tests/test_attacks.py).

    Args:
        k: side of the control grid, >= 2.
        s: warping strength, > 0.
        grid_rescale: factor applied to the warped grid, > 0 (1 in the paper).
        seed: seed of the control grid.
        noise_mode: add the noise samples when poisoning.
        cross_ratio: number of noise samples per poisoned sample, >= 0.
    """

    name = "wanet"
    params = ("k", "s", "grid_rescale", "seed", "noise_mode", "cross_ratio")

    def __init__(
        self,
        k: int = 4,
        s: float = 1.0,
        grid_rescale: float = 1.0,
        seed: int = 0,
        noise_mode: bool = True,
        cross_ratio: float = 2.0,
    ) -> None:
        self.k = check_positive_int(k, "k", minimum=2)
        self.s = _positive(s, "s")
        self.grid_rescale = _positive(grid_rescale, "grid_rescale")
        self.seed = check_seed(seed, limit=2**63)
        if not isinstance(noise_mode, (bool, np.bool_)):
            raise InputError(f"noise_mode must be a bool, got {noise_mode!r}")
        self.noise_mode = bool(noise_mode)
        cr = _number(cross_ratio, "cross_ratio")
        if not (0.0 <= cr < math.inf):
            raise InputError(f"cross_ratio must be a finite number >= 0, got {cross_ratio!r}")
        self.cross_ratio = cr

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The warped sampling grid for ``h x w`` images, float32 ``[1, h, w, 2]`` (x, y) in [-1, 1]."""
        gen = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=gen, dtype=torch.float64) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack((gx, gy), dim=-1)[None]
        scale = torch.tensor([self.s / w, self.s / h], dtype=torch.float64)
        return ((identity + noise * scale) * self.grid_rescale).clamp(-1, 1).float()

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.grid(x.shape[-2], x.shape[-1]))

    def apply_noise(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Noise-mode copy of ``x``: each input warped with the trigger's grid plus its own uniform
        [-1, 1] / H (rows), / W (columns) perturbation drawn from ``torch.Generator().manual_seed(seed)``."""
        _check_images(x)
        n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        gen = torch.Generator().manual_seed(check_seed(seed, limit=2**63))
        jitter = (torch.rand(n, h, w, 2, generator=gen, dtype=torch.float64) * 2 - 1) / torch.tensor(
            [w, h], dtype=torch.float64
        )
        grid = (self.grid(h, w).double() + jitter).clamp(-1, 1).float()
        return self._warp(x.detach().clone(), grid).clamp_(0.0, 1.0)

    def _poison_extra(
        self, x: torch.Tensor, y: torch.Tensor, poison_idx: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        n_noise = int(round(self.cross_ratio * len(poison_idx))) if self.noise_mode else 0
        if n_noise == 0:
            return np.zeros(0, dtype=np.int64)
        candidates = np.setdiff1d(np.arange(x.shape[0]), poison_idx)
        if n_noise > len(candidates):
            raise InputError(
                f"cross_ratio {self.cross_ratio:g} asks for {n_noise} noise samples but only "
                f"{len(candidates)} samples are not poisoned"
            )
        idx = np.sort(rng.choice(candidates, size=n_noise, replace=False)).astype(np.int64)
        t = torch.from_numpy(idx)
        x[t] = self.apply_noise(x[t], seed=int(rng.integers(2**62)))
        return idx


@register
class SIG(Attack):
    """SIG clean-label sinusoidal trigger (Barni, Kallas, Tondi, "A new backdoor attack in CNNs by
    training set corruption without label poisoning", ICIP 2019): ``x' = clip(x + delta sin(2 pi j f / W))``
    with ``j`` the column, the same on every row and channel (vertical stripes).

    Clean-label: ``poison`` stamps ``round(rate * N)`` samples chosen among the *target-class* training
    samples and keeps every label (``rate`` is a fraction of the whole training set, as in BackdoorBench:
    an error if the target class is too small); at test time the signal is stamped on non-target inputs
    as for the other attacks.

    Where certkit differs: one ``delta`` for training and testing; default ``delta = 20/255`` (the
    paper's training amplitude; BackdoorBench uses 40/255). ``f`` may be any positive number, but a
    multiple of ``W / 2`` gives a zero signal (``apply`` then raises :class:`InputError`).

    On 8x8 digits (digits-cnn, the whole target class of ~10% of the training set stamped) the default
    amplitude implants nothing (ASR ~0) and ``f = 6`` aliases to a period-4 column pattern whose
    negative half is clipped away on the black background (ASR 0.60-0.72 even at ``delta = 1``);
    ``delta = 1.0, f = 3`` implants (ASR 0.81-1.00, clean accuracy >= 0.90 over 5 seeds;
    tests/test_attacks.py). Real-size images need far less amplitude.

    Args:
        delta: amplitude (pixel units), > 0.
        f: frequency (periods over the image width), > 0.
    """

    name = "sig"
    params = ("delta", "f")
    relabel = False

    def __init__(self, delta: float = 20 / 255, f: float = 6) -> None:
        self.delta = _positive(delta, "delta")
        self.f = _positive(f, "f")
        if float(self.f).is_integer():
            self.f = int(self.f)

    def signal(self, h: int, w: int) -> torch.Tensor:
        """The additive signal, float64 ``[h, w]``."""
        j = torch.arange(w, dtype=torch.float64)
        row = self.delta * torch.sin(2 * math.pi * j * self.f / w)
        return row.expand(h, w).clone()

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        sig = self.signal(x.shape[-2], x.shape[-1]).to(device=x.device)
        if float(sig.abs().max()) < 1e-9 * self.delta:
            raise InputError(
                f"f = {self.f} is a multiple of half the image width {x.shape[-1]}: the signal vanishes"
            )
        return (x.double() + sig).to(x.dtype)

    def _candidates(self, y: np.ndarray, target: int) -> tuple[np.ndarray, str]:
        return np.flatnonzero(y == target), f"have the target label {target} (SIG is clean-label)"


def make_attack(name: str, **params: Any) -> Attack:
    """Build an attack by registry name (see :data:`ATTACKS`) with its keyword parameters."""
    check_choice(name, tuple(_REGISTRY), "attack")
    cls = _REGISTRY[name]
    unknown = sorted(set(params) - set(cls.params))
    if unknown:
        raise InputError(f"attack {name!r} has no parameter(s) {unknown}; it takes {', '.join(cls.params)}")
    return cls(**params)


def triggered_test_set(attack: Attack, test: ArrayDataset, target: int) -> TriggeredSet:
    """Stamp ``attack``'s trigger on every test input whose true label is not ``target``."""
    if not isinstance(attack, Attack):
        raise InputError(f"attack must be an Attack, got {type(attack).__name__}")
    if not isinstance(test, ArrayDataset):
        raise InputError(f"test must be an ArrayDataset, got {type(test).__name__}")
    target = _check_target(target, test.num_classes)
    idx = np.flatnonzero(test.y.numpy() != target).astype(np.int64)
    t = torch.from_numpy(idx)
    clean = test.x[t]
    x = attack.apply(clean)
    norms = attack._norms(clean, x)
    return TriggeredSet(x=x, y_true=test.y[t].clone(), indices=idx, trigger_norms=norms, target=target)


#: Names accepted by :func:`make_attack` (keep this line after the last registered attack).
ATTACKS: tuple[str, ...] = tuple(_REGISTRY)
