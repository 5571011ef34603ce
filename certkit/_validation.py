"""Small input checks shared by the public functions. Each raises :class:`~certkit.errors.InputError`
with a message naming the argument."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from certkit.errors import InputError, UnknownNameError


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
    """Return ``value`` as an int, requiring an integer (not a bool, not a float such as ``3.0``) ``>= minimum``.

    >>> check_positive_int(3, "epochs")
    3
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {what}, got {value!r}")
    return int(value)


#: seeds feed numpy and scikit-learn, which need them in [0, 2**32)
SEED_LIMIT = 2**32


def check_seed(seed: Any, name: str = "seed", *, allow_none: bool = False, limit: int = SEED_LIMIT) -> int:
    """Return ``seed`` as an int in ``[0, limit)`` (``None`` gives 0 when ``allow_none``). The default limit
    ``2**32`` is what numpy's legacy seeding and scikit-learn accept; seeds only fed to ``torch.Generator``
    or :func:`certkit.seeding.derive_seed` may use ``limit=2**63``.

    >>> check_seed(7)
    7
    """
    if seed is None and allow_none:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < limit:
        bound = "2**32" if limit == SEED_LIMIT else f"2**{limit.bit_length() - 1}"
        raise InputError(f"{name} must be an integer in [0, {bound}), got {seed!r}")
    return int(seed)


def check_float(value: Any, name: str, *, minimum: float = 0.0, strict: bool = False,
                maximum: float | None = None) -> float:
    """``value`` as a finite float ``>= minimum`` (``>`` when ``strict``; ``<= maximum`` if given).

    >>> check_float(0.5, "lr", strict=True)
    0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum) or (maximum is not None and v > maximum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        if maximum is not None:
            bound += f" and <= {maximum:g}"
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return v


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


def check_positive_array(values: Any, name: str, n: int | None = None, *, scalar_ok: bool = False) -> np.ndarray:
    """``values`` as a new float64 array ``[n]`` of finite numbers > 0 (per-point sigmas, per-sample scales).

    A tensor is moved to the CPU; a scalar is repeated ``n`` times when ``scalar_ok``.

    >>> check_positive_array(0.5, "sigma", 3, scalar_ok=True).tolist()
    [0.5, 0.5, 0.5]
    """
    if isinstance(values, bool):
        raise InputError(f"{name} must be positive numbers, got {values!r}")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be positive numbers, got {type(values).__name__}") from exc
    if arr.ndim == 0 and scalar_ok:
        arr = np.full(1 if n is None else n, float(arr))
    if arr.ndim != 1:
        what = "a scalar or a 1-D array" if scalar_ok else "a 1-D array"
        raise InputError(f"{name} must be {what} of per-point values, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name} has {arr.shape[0]} values but there are {n} points")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or inf values")
    if arr.size and (arr <= 0).any():
        raise InputError(f"{name} must be strictly positive, got min {float(arr.min()):g}")
    return arr.copy()


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


def expected_input_shape(model: torch.nn.Module) -> tuple[int, ...] | None:
    """The ``(C, H, W)`` a certkit model was built for (its ``certkit_spec``), else ``(C,)`` from the first
    ``Conv2d`` of a plain model, else ``None`` (unknown)."""
    spec = getattr(model, "certkit_spec", None)
    shape = spec.get("kwargs", {}).get("input_shape") if isinstance(spec, dict) else None
    if shape is not None:
        return tuple(int(s) for s in shape)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return (int(module.in_channels),)
        if isinstance(module, torch.nn.Linear):
            return None
    return None


def check_model_input(model: torch.nn.Module, x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Check a batch ``[N, *input_shape]`` against ``model`` before any forward pass: a tensor, floating,
    finite, at least one input, and the model's channel count and spatial size where they are known.

    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    >>> check_model_input(m, torch.zeros(2, 1, 8, 8))
    Traceback (most recent call last):
    ...
    certkit.errors.InputError: x has 1 channel(s) (shape [2, 1, 8, 8]) but the model's first layer expects 3
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape [N, *input_shape], got {type(x).__name__}")
    if x.dim() < 2:
        raise InputError(f"{name} must have shape [N, *input_shape], got {list(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"{name} holds no inputs (shape {list(x.shape)}): nothing to certify")
    check_finite_tensor(x, name)
    want = expected_input_shape(model)
    if want is not None:
        if x.dim() != 4:
            raise InputError(f"{name} must be images [N, C, H, W] for this model, got shape {list(x.shape)}")
        if int(x.shape[1]) != want[0]:
            raise InputError(f"{name} has {int(x.shape[1])} channel(s) (shape {list(x.shape)}) but the model's "
                             f"first layer expects {want[0]}")
        if len(want) == 3 and tuple(int(s) for s in x.shape[2:]) != want[1:]:
            raise InputError(f"{name} has images of size {int(x.shape[2])}x{int(x.shape[3])} but the model was "
                             f"built for {want[1]}x{want[2]}")
    return x


def check_input_shape(shape: Any, name: str = "input_shape") -> tuple[int, int, int]:
    """``(C, H, W)`` of one image: three positive integers, given as a sequence or as the text ``"C,H,W"``.

    >>> check_input_shape("1,28,28")
    (1, 28, 28)
    >>> check_input_shape((3, 32))
    Traceback (most recent call last):
    ...
    certkit.errors.InputError: input_shape must be three positive integers C,H,W, got (3, 32)
    """
    values = shape.replace(" ", "").split(",") if isinstance(shape, str) else shape
    bad = InputError(f"{name} must be three positive integers C,H,W, got {shape!r}")
    try:
        items = list(values)
    except TypeError as exc:
        raise bad from exc
    if len(items) != 3:
        raise bad
    out = []
    for v in items:
        if isinstance(v, str):
            if not v.isdigit():
                raise bad
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise bad
        out.append(int(v))
    return out[0], out[1], out[2]


def check_indices(values: Any, name: str = "ids", n: int | None = None) -> np.ndarray:
    """Point indices: a non-empty 1-D array of distinct integers ``>= 0`` (and ``< n`` when ``n`` is given),
    returned sorted as int64.

    >>> check_indices([4, 0, 2]).tolist()
    [0, 2, 4]
    >>> check_indices([1, 1])
    Traceback (most recent call last):
    ...
    certkit.errors.InputError: ids must not repeat an index: 1 appears 2 times
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{name} must be a 1-D list of indices, got shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name} is empty: give at least one index")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if int(arr.min()) < 0:
        raise InputError(f"{name} must be indices >= 0, got {int(arr.min())}")
    if n is not None and int(arr.max()) >= n:
        raise InputError(f"{name} has index {int(arr.max())} but there are only {n} points (indices 0..{n - 1})")
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        i = int(np.argmax(counts > 1))
        raise InputError(f"{name} must not repeat an index: {int(uniq[i])} appears {int(counts[i])} times")
    return uniq
