"""Small input checks shared by the public functions. Each raises :class:`~certkit.errors.InputError`
with a message naming the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import InputError, UnknownNameError


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float, requiring ``0 < alpha < 1``."""
    try:
        a = float(alpha)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number in (0, 1), got {alpha!r}") from exc
    if not (0.0 < a < 1.0) or math.isnan(a):
        raise InputError(f"{name} must lie in the open interval (0, 1), got {alpha!r}")
    return a


def check_number(value: Any, name: str) -> float:
    """Return ``value`` as a float, requiring a real number (not bool, not NaN; inf allowed)."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number, got {value!r}") from exc
    if math.isnan(v):
        raise InputError(f"{name} must be a number, got NaN")
    return v


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int, requiring it to be an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_choice(value: str, choices: Iterable[str], name: str) -> str:
    """Require ``value`` to be one of ``choices``; the error lists the allowed values."""
    choices = list(choices)
    if value not in choices:
        raise UnknownNameError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_finite_tensor(x: torch.Tensor, name: str) -> torch.Tensor:
    """Require a floating tensor without NaN or inf."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or inf values")
    return x


def check_sigma(sigma: Any, n_points: int | None = None, name: str = "sigma") -> torch.Tensor:
    """Return sigma as a float64 CPU tensor of shape ``[n_points]`` (or ``[]`` for a scalar).

    Raises if any value is non-finite or not strictly positive, or the length does not match.
    """
    s = torch.as_tensor(sigma, dtype=torch.float64).detach().cpu()
    if s.dim() > 1:
        raise InputError(f"{name} must be a scalar or a 1-D tensor of per-sample values, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise InputError(f"{name} contains NaN or inf values")
    if bool((s <= 0).any()):
        raise InputError(f"{name} must be strictly positive, got min {float(s.min()):g}")
    if s.dim() == 1 and n_points is not None and s.shape[0] != n_points:
        raise InputError(f"{name} has {s.shape[0]} values but there are {n_points} inputs")
    return s


def check_labels(y: Any, n_points: int, num_classes: int, name: str = "y") -> torch.Tensor:
    """Return integer labels of shape ``[n_points]`` in ``[0, num_classes)`` as an int64 CPU tensor."""
    t = torch.as_tensor(y).detach().cpu()
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise InputError(f"{name} must hold integer class labels, got dtype {t.dtype}")
    t = t.long()
    if t.dim() != 1 or t.shape[0] != n_points:
        raise InputError(f"{name} must have shape [{n_points}], got {tuple(t.shape)}")
    if n_points and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise InputError(f"{name} has labels outside [0, {num_classes}): min {int(t.min())}, max {int(t.max())}")
    return t
