"""Backdoor triggers and data poisoning.

An :class:`Attack` stamps a trigger on inputs (``apply``), reports the trigger's l2 norm per input in
pixel units (``trigger_norms``, compared with certified radii), and poisons a training set (``poison``):
a seeded choice of ``round(rate * N)`` *non-target* samples gets the trigger and the target label.

Implemented: :class:`BadNets` (Gu et al. 2017) and :class:`Blended` (Chen et al. 2017).
To add an attack: subclass :class:`Attack`, set ``name``, store the constructor's keyword parameters
as attributes of the same name (listed in ``params``), implement ``_stamp(x)`` (``x`` is a private copy
``[N, C, H, W]`` in [0, 1]; return the triggered batch) and decorate the class with ``@register``.
``config()`` / ``make_attack(**config)`` then round-trip through JSON.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ._validation import check_choice, check_finite_tensor, check_positive_int
from .data import ArrayDataset
from .errors import InputError

__all__ = [
    "ATTACKS",
    "Attack",
    "BadNets",
    "Blended",
    "PoisonedDataset",
    "TriggeredSet",
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
        dataset: the poisoned copy (triggered inputs relabelled to ``target``).
        poison_indices: sorted int64 indices (into ``dataset``) of the poisoned samples.
        target: the target class.
        rate: the requested poisoning rate (fraction of the whole training set).
    """

    dataset: ArrayDataset
    poison_indices: np.ndarray
    target: int
    rate: float

    @property
    def num_poisoned(self) -> int:
        return int(len(self.poison_indices))


@dataclass
class TriggeredSet:
    """Triggered non-target test inputs, for attack success rate and certified trigger robustness.

    Attributes:
        x: triggered inputs ``[M, C, H, W]`` in [0, 1].
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


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number, got {value!r}") from exc
    if math.isnan(v):
        raise InputError(f"{name} must not be NaN")
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

    @abstractmethod
    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a private copy ``x`` ``[N, C, H, W]`` (may modify it in place); return the result."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return a triggered copy of ``x`` (``[N, C, H, W]`` in [0, 1]), clipped to [0, 1].
        ``x`` itself is not modified."""
        _check_images(x)
        out = self._stamp(x.detach().clone())
        return out.clamp_(0.0, 1.0)

    def trigger_norms(self, x: torch.Tensor) -> torch.Tensor:
        """l2 norm of ``apply(x) - x`` per input (pixel units), float64 ``[N]`` on ``x``'s device."""
        diff = self.apply(x).double() - x.detach().double()
        return diff.flatten(1).norm(dim=1)

    def poison(self, dataset: ArrayDataset, rate: float, target: int, seed: int = 0) -> PoisonedDataset:
        """Poison ``round(rate * len(dataset))`` samples chosen uniformly (``numpy.random.default_rng(seed)``)
        among those whose label is not ``target``: stamp the trigger and relabel them to ``target``.

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
        candidates = np.flatnonzero(dataset.y.numpy() != target)
        if n_poison > len(candidates):
            raise InputError(
                f"cannot poison {n_poison} samples (rate {r:g} of {len(dataset)}): only {len(candidates)} "
                f"samples have a label other than the target {target}"
            )
        rng = np.random.default_rng(int(seed))
        idx = np.sort(rng.choice(candidates, size=n_poison, replace=False)).astype(np.int64)
        x, y = dataset.x.clone(), dataset.y.clone()
        if n_poison:
            t = torch.from_numpy(idx)
            x[t] = self.apply(x[t])
            y[t] = target
        name = f"{dataset.name}+{self.name}" if dataset.name else self.name
        return PoisonedDataset(ArrayDataset(x, y, dataset.num_classes, name), idx, target, r)

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

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if p > h or p > w:
            raise InputError(f"BadNets patch of size {p} does not fit {h}x{w} images")
        r0 = h - p if self.location.startswith("bottom") else 0
        c0 = w - p if self.location.endswith("right") else 0
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
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {seed!r}")
        self.alpha = a
        self.seed = int(seed)

    def pattern(self, input_shape: tuple[int, int, int]) -> torch.Tensor:
        """The blend pattern, float32 ``input_shape`` = ``(C, H, W)`` with entries in [0, 1)."""
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(tuple(int(s) for s in input_shape), generator=gen)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        pat = self.pattern(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
        return x.mul_(1.0 - self.alpha).add_(self.alpha * pat)


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
    norms = (x.double() - clean.double()).flatten(1).norm(dim=1)
    return TriggeredSet(x=x, y_true=test.y[t].clone(), indices=idx, trigger_norms=norms, target=target)


#: Names accepted by :func:`make_attack` (keep this line after the last registered attack).
ATTACKS: tuple[str, ...] = tuple(_REGISTRY)
