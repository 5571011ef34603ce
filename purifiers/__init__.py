"""Empirical backdoor purification defenses whose output models certkit certifies.

Methods register themselves with :func:`purifiers.registry.register`; build one with :func:`make`,
list them with :func:`available`. Every public module of this package is imported here, so a new method
module registers itself just by existing.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .base import Purifier, PurifierTags, SmallBudgetWarning
from .evaluate import PurificationReport, evaluate
from .registry import available, fast_params, make, register

_NOT_METHODS = {"base", "evaluate", "registry"}
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name not in _NOT_METHODS:
        _importlib.import_module(f"{__name__}.{_info.name}")

from .finetune import FineTuning  # noqa: E402
from .fst import FeatureShiftTuning  # noqa: E402
from .npd import NeuralPolarizerDefense  # noqa: E402
from .sau import SharedAdversarialUnlearning  # noqa: E402

__all__ = [
    "FeatureShiftTuning",
    "FineTuning",
    "NeuralPolarizerDefense",
    "PurificationReport",
    "Purifier",
    "PurifierTags",
    "SharedAdversarialUnlearning",
    "SmallBudgetWarning",
    "available",
    "evaluate",
    "fast_params",
    "make",
    "register",
]
