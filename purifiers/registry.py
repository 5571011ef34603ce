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
    return _REGISTRY[name](**params)
