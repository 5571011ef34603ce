"""Registry of purification methods: :func:`make` builds one by name, :func:`available` lists them."""

from __future__ import annotations

from typing import Any

from certkit.errors import UnknownNameError

from .base import Purifier

_REGISTRY: dict[str, type[Purifier]] = {}


def register(cls: type[Purifier]) -> type[Purifier]:
    """Class decorator adding a :class:`Purifier` subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"purifier name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, dict[str, Any]]:
    """Registered method names with their tags (needs labels, default clean fraction, what changes)."""
    return {name: cls.tags.to_dict() for name, cls in sorted(_REGISTRY.items())}


def make(name: str, **params: Any) -> Purifier:
    """Build the purifier registered as ``name`` with keyword ``params``."""
    if name not in _REGISTRY:
        names = ", ".join(sorted(_REGISTRY)) or "none registered yet"
        raise UnknownNameError(f"unknown purifier {name!r}; available: {names}")
    cls = _REGISTRY[name]
    valid = cls._param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UnknownNameError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for purifier {name!r}; "
                               f"valid: {', '.join(valid)}")
    return cls(**params)


def fast_params(name: str) -> dict[str, Any]:
    """The tiny budget of purifier ``name`` used by tests and smoke runs (a copy)."""
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown purifier {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return dict(_REGISTRY[name].fast_params)
