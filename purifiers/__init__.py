"""Empirical backdoor purification defenses whose output models certkit certifies.

Methods register themselves with :func:`purifiers.registry.register`; build one with :func:`make`.
"""

from .base import Purifier, PurifierTags
from .registry import available, make, register

__all__ = ["Purifier", "PurifierTags", "available", "make", "register"]
