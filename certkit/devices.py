"""Device selection: ``auto`` picks CUDA when available, else CPU. Nothing in certkit hard-codes CUDA."""

from __future__ import annotations

import torch

from certkit.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | torch.device`` into a :class:`torch.device`.

    Raises :class:`InputError` if CUDA is requested but not available.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use one of {', '.join(DEVICE_CHOICES)}")
    return dev


def check_device_name(device: str | torch.device) -> str:
    """The device's name, checked for form only (``auto``, ``cpu``, ``cuda``, ``cuda:N``): for work that runs
    on other machines (Dask workers), whose devices this process may not have."""
    if isinstance(device, str) and device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use one of {', '.join(DEVICE_CHOICES)}")
    return str(dev)


def module_device(model: torch.nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter or buffer, ``None`` for a model without tensors."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None
