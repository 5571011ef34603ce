"""Base class of post-training purification defenses.

A :class:`Purifier` follows scikit-learn's convention: the constructor only stores keyword parameters,
work happens in :meth:`Purifier.purify`, which never mutates the model it is given and returns a new,
self-contained ``nn.Module`` (normalisation stays its first layer). Capability tags describe what a
method needs (labels, the default fraction of clean data) and what it changes.
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import nn


@dataclass(frozen=True)
class PurifierTags:
    """What a purification method needs and changes."""

    needs_labels: bool = True
    clean_fraction: float = 0.05
    changes: str = "weights"  # "weights", "architecture" (inserted layers), "pruning"
    data_free: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Purifier(ABC):
    """A backdoor purification defense: ``purify(model, clean_data) -> purified model``."""

    #: Registry name, e.g. ``"fst"``.
    name: ClassVar[str] = ""
    tags: ClassVar[PurifierTags] = PurifierTags()

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        """The constructor's keyword parameters (JSON round-trip of a configuration)."""
        return {k: getattr(self, k) for k in self._param_names()}

    def clone(self) -> Purifier:
        """A new unfitted purifier with the same parameters."""
        return type(self)(**copy.deepcopy(self.get_params()))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def purify(self, model: nn.Module, clean_data: Any, *, validation: Any = None, seed: int | None = None) -> nn.Module:
        """Return a purified copy of ``model``; ``model`` itself is never modified.

        Args:
            model: the (possibly backdoored) classifier, normalisation as its first layer.
            clean_data: the defender's small clean set (an :class:`~certkit.data.ArrayDataset`).
            validation: a validation split carved from the defender's clean data, used for any selection.
            seed: seed of every random choice of the method.
        """
        work = copy.deepcopy(model)
        purified = self._purify(work, clean_data, validation=validation, seed=seed)
        return purified

    @abstractmethod
    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        """Method-specific work on a private copy of the model."""
