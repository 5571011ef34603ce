"""Empirical backdoor purification defenses whose output models certkit certifies.

Methods register themselves with :func:`purifiers.registry.register`; build one with :func:`make`.
"""

from . import finetune, fst  # noqa: F401  (register the methods)
from .base import Purifier, PurifierTags
from .evaluate import PurificationReport, evaluate
from .finetune import FineTuning
from .fst import FeatureShiftTuning
from .registry import available, make, register

__all__ = [
    "FeatureShiftTuning",
    "FineTuning",
    "PurificationReport",
    "Purifier",
    "PurifierTags",
    "available",
    "evaluate",
    "make",
    "register",
]
