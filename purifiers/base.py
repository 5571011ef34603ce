"""Base class of post-training purification defenses.

A :class:`Purifier` follows scikit-learn's convention: the constructor stores keyword parameters (and
checks them at once, so a bad value fails before any work), work happens in :meth:`Purifier.purify`, which never mutates the model it is given and returns a new,
self-contained ``nn.Module`` (normalisation stays its first layer). Capability tags describe what a
method needs (labels, the default fraction of clean data) and what it changes.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from certkit.backdoor.data import ArrayDataset
from certkit.errors import InputError
from purifiers._common import check_inputs, check_num_classes, check_seed, split_validation

#: an epoch with fewer optimiser steps than this gets a :class:`SmallBudgetWarning`
MIN_STEPS_PER_EPOCH = 4


class SmallBudgetWarning(RuntimeWarning):
    """A purification epoch has only a few optimiser steps (the batch size is close to, or above, the number of
    clean samples), so the method's epoch budget gives far fewer updates than in its paper."""


def _check_training_set(name: str, model: nn.Module, train_data: Any) -> Any:
    """``train_data`` for a method tagged ``needs_training_set``: a non-empty ArrayDataset with the model's
    number of classes (one-line :class:`InputError` otherwise)."""
    if train_data is None:
        raise InputError(f"{name} works on the poisoned training set, but none was given: pass train_data= "
                         "(certkit purify and the compare grid pass it); the input model is unchanged")
    if not isinstance(train_data, ArrayDataset):
        raise InputError(f"train_data must be a certkit.backdoor.data.ArrayDataset, got {type(train_data).__name__}")
    if len(train_data) == 0:
        raise InputError(f"train_data is empty: {name} needs the poisoned training set")
    check_num_classes(model, train_data)
    return train_data


@dataclass(frozen=True)
class PurifierTags:
    """What a purification method needs and changes."""

    needs_labels: bool = True
    clean_fraction: float = 0.05
    changes: str = "weights"  # "weights", "architecture" (inserted layers), "pruning"
    data_free: bool = False
    #: the method selects something (a threshold, a stopping point) on a validation split
    uses_validation: bool = False
    #: the method needs BatchNorm layers in the model
    needs_batchnorm: bool = False
    #: the method works on the poisoned training set (``purify(..., train_data=...)``; FCT's D-BR), not only
    #: on a clean reserve
    needs_training_set: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Purifier(ABC):
    """A backdoor purification defense: ``purify(model, clean_data) -> purified model``."""

    #: Registry name, e.g. ``"fst"``.
    name: ClassVar[str] = ""
    tags: ClassVar[PurifierTags] = PurifierTags()
    #: Tiny budgets for tests and smoke runs (``make(name, **cls.fast_params)``); not a faithful setting.
    fast_params: ClassVar[dict[str, Any]] = {}
    #: The fewest clean samples the method can work with (checked before any work).
    min_clean: ClassVar[int] = 10
    #: Fraction of the clean data carved off as the validation split when a method that selects on
    #: validation data is given none.
    validation_fraction: ClassVar[float] = 0.2
    #: The method makes passes (epochs) over the clean data in mini-batches of ``self.batch_size`` (False for
    #: iteration budgets such as ANP's and for data-free methods): :meth:`purify` checks its steps per epoch.
    epoch_batches: ClassVar[bool] = True
    #: The method takes the backdoor's target class as its ``target`` parameter (MESA); a harness that knows
    #: the target (the comparison grid) passes it unless the parameters already set one.
    needs_target: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass constructor checks its parameters as soon as it has stored them (``_validate``), so
        ``purifiers.make("fst", epochs=0)`` fails at once, before any model or data is touched."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def checked_init(self: Purifier, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            if type(self) is cls:  # once, after the most derived constructor
                self._validate()

        cls.__init__ = checked_init  # type: ignore[method-assign]

    def _validate(self) -> dict[str, Any]:
        """The checked parameters (``InputError`` naming the first bad one); subclasses override it."""
        return {}

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

    def purify(self, model: nn.Module, clean_data: Any = None, *, validation: Any = None, seed: int | None = None,
               train_data: Any = None) -> nn.Module:
        """Return a purified copy of ``model``; ``model`` itself is never modified. Records ``budget_`` (steps per
        epoch; a :class:`SmallBudgetWarning` when they are fewer than :data:`MIN_STEPS_PER_EPOCH`).

        Args:
            model: the (possibly backdoored) classifier, normalisation as its first layer.
            clean_data: the defender's small clean set (an :class:`~certkit.backdoor.data.ArrayDataset`).
            validation: a validation split carved from the defender's clean data, used for any selection.
            seed: seed of every random choice of the method.
            train_data: the poisoned training set, required by (and only passed on to) methods tagged
                ``needs_training_set`` (FCT's D-BR), which also accept ``clean_data=None``.
        """
        clean_data, extra = self.check(model, clean_data, train_data=train_data)
        seed = check_seed(seed)
        if self.tags.uses_validation and validation is None:
            clean_data, validation = split_validation(clean_data, self.validation_fraction, seed)
        elif validation is not None:
            check_inputs(model, validation)
        self.budget_ = self._check_budget(len(extra["train_data"]) if extra else len(clean_data))
        work = copy.deepcopy(model)
        purified = self._purify(work, clean_data, validation=validation, seed=seed, **extra)
        bad = [name for name, t in list(purified.named_parameters()) + list(purified.named_buffers())
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise InputError(f"{self.name} produced non-finite weights ({', '.join(bad[:3])}); the input model is "
                             "unchanged; try a smaller learning rate")
        return purified

    def work(self, n: int, num_classes: int) -> tuple[float, str] | None:
        """About how many passes (every sample forward and backward once) this configuration's main loops make
        over ``n`` samples (the clean set; the training set for ``needs_training_set`` methods), and their
        breakdown in words: the budget line of ``certkit purify``. None when the method trains nothing (CLP) or
        its cost depends on the data (a subclass without a formula). Forward-only evaluations are not counted;
        loops that stop early count at their cap."""
        return None

    def check(self, model: nn.Module, clean_data: Any = None, *, train_data: Any = None
              ) -> tuple[Any, dict[str, Any]]:
        """The checks :meth:`purify` makes before any work (model, data, sizes, BatchNorm, the training set of
        ``needs_training_set`` methods), callable on their own so a harness can refuse a run before announcing
        it. Returns ``(clean_data, extra)``: the clean data (an empty slice of the training set for methods
        that use none) and the keyword arguments for :meth:`_purify`."""
        extra: dict[str, Any] = {}
        if self.tags.needs_training_set:
            extra["train_data"] = _check_training_set(self.name, model, train_data)
            self._check_training_data(extra["train_data"])
        if clean_data is None and self.tags.needs_training_set:
            clean_data = extra["train_data"].subset([])  # the method does not use a clean reserve
        else:
            check_inputs(model, clean_data)
            check_num_classes(model, clean_data)
        if not self.tags.data_free and len(clean_data) < self.min_clean:
            raise InputError(f"{self.name} needs at least {self.min_clean} clean samples, got {len(clean_data)}")
        if self.tags.needs_batchnorm and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                 for m in model.modules()):
            raise InputError(f"{self.name} acts on BatchNorm neurons but {type(model).__name__} has no BatchNorm "
                             "layer; use a model with BatchNorm (e.g. 'digits-bn-cnn' or 'preact-resnet18')")
        return clean_data, extra

    def _check_training_data(self, train_data: Any) -> None:
        """Method-specific checks of the training set (``needs_training_set``), before any work or warning."""
        return None

    def _check_budget(self, n: int) -> dict[str, Any] | None:
        """Steps per epoch of ``batch_size`` mini-batches over ``n`` clean samples, recorded as ``budget_``
        (``n_clean``, ``batch_size``, ``steps_per_epoch``, ``warning``); below :data:`MIN_STEPS_PER_EPOCH` a
        :class:`SmallBudgetWarning` is issued (its text is the ``warning`` entry). None for methods without
        epochs of mini-batches (``epoch_batches`` False, data-free methods)."""
        batch_size = getattr(self, "batch_size", None)
        if self.tags.data_free or not self.epoch_batches or not isinstance(batch_size, int) or batch_size < 1:
            return None
        steps = math.ceil(n / batch_size)
        message = None
        if steps < MIN_STEPS_PER_EPOCH:
            head = (f"batch_size {batch_size} >= clean samples {n}: one step per epoch" if batch_size >= n else
                    f"batch_size {batch_size} with {n} clean samples: {steps} optimiser steps per epoch")
            message = (f"{self.name}: {head} (< {MIN_STEPS_PER_EPOCH}), far fewer updates than the method's "
                       f"epoch budget assumes; lower batch_size (CLI: --param batch_size=...)")
            warnings.warn(message, SmallBudgetWarning, stacklevel=3)
        return {"n_clean": n, "batch_size": batch_size, "steps_per_epoch": steps, "warning": message}

    @abstractmethod
    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        """Method-specific work on a private copy of the model; :meth:`purify` has already checked the model,
        ``clean_data`` (and ``validation``) and turned ``seed`` into a non-negative int."""
