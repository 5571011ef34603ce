"""Empirical backdoor purification defenses whose output models certkit certifies.

Methods register themselves with :func:`purifiers.registry.register`; build one with :func:`make`.
"""

from . import finetune, fst, npd, sau  # noqa: F401  (register the methods)
from .base import Purifier, PurifierTags
from .evaluate import PurificationReport, evaluate
from .finetune import FineTuning
from .fst import FeatureShiftTuning
from .npd import NeuralPolarizerDefense
from .registry import available, fast_params, make, register
from .sau import SharedAdversarialUnlearning

__all__ = [
    "FeatureShiftTuning",
    "FineTuning",
    "NeuralPolarizerDefense",
    "PurificationReport",
    "Purifier",
    "PurifierTags",
    "SharedAdversarialUnlearning",
    "available",
    "evaluate",
    "fast_params",
    "make",
    "register",
]
