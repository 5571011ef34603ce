"""The one data pipeline of certkit: load -> split -> poison -> triggered test set -> defender's clean set.

Every run kind (single-model runs, ensembles, purify runs, the compare grid) describes its data with the same
fields (:class:`DataConfig`) and gets it from :func:`prepare_data`, so one config gives the same poisoned
indices, triggered test set and defender clean set everywhere. Each field is checked here once.

The defender's clean data (:meth:`PreparedData.defender_clean_indices`) is a seeded draw from the training
samples the attacker did *not* touch (the poisoned ones, and WaNet's noise-mode samples, are excluded): the
defender's reserve is genuinely clean, and never includes a test image.

>>> data = prepare_data(DataConfig(poison_rate=0.1))
>>> data.num_classes, data.poisoned.num_poisoned
(10, 126)
>>> len(data.defender_clean_indices(0.2))
251
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from certkit._validation import check_number, check_seed
from certkit.backdoor.attacks import Attack, PoisonedDataset, TriggeredSet, make_attack, triggered_test_set
from certkit.backdoor.data import ArrayDataset, DatasetSplits, load_dataset
from certkit.errors import InputError

__all__ = ["DATA_FIELDS", "check_attack", "DataConfig", "PreparedData", "draw_clean_indices", "prepare_data"]

#: the config fields that define a run's data (shared by TrainConfig, EnsembleSpec and CompareSpec)
DATA_FIELDS = ("dataset", "data_root", "attack", "attack_params", "poison_rate", "target", "seed")


@dataclass(frozen=True)
class DataConfig:
    """What defines a run's data: dataset, attack and the seed of the split and the poisoning.

    Attributes:
        dataset: ``digits | mnist | cifar10 | gtsrb | npz:PATH | npz@C,H,W:PATH | folder:PATH``
            (:func:`certkit.backdoor.data.load_dataset`); ``data_root``: torchvision's folder.
        attack, attack_params: :func:`certkit.backdoor.attacks.make_attack` name and parameters (checked).
        poison_rate: fraction of the whole training set poisoned, in ``[0, 1)``; ``target``: the target class.
        seed: split, poisoned samples and the defender's draw, in ``[0, 2**32)``.
    """

    dataset: str = "digits"
    data_root: str | None = None
    attack: str = "badnets"
    attack_params: Mapping[str, Any] = field(default_factory=dict)
    poison_rate: float = 0.1
    target: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for k, v in check_data_fields(**asdict(self)).items():
            set_(self, k, v)

    @classmethod
    def of(cls, spec: Any) -> DataConfig:
        """The data fields of any run config (an object or mapping with :data:`DATA_FIELDS`)."""
        get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
        return cls(**{k: get(k, getattr(cls, k, None)) for k in DATA_FIELDS if get(k, None) is not None})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "attack_params": dict(self.attack_params)}

    def key(self) -> str:
        """Canonical JSON of the config (a cache key)."""
        return json.dumps(self.to_dict(), sort_keys=True)


def check_attack(name: Any, params: Any = None, where: str = "attack") -> tuple[str, dict[str, Any]]:
    """An attack name and its parameters, checked by building the attack; the parameters come back as plain
    JSON values (what a run's config stores). ``where`` names the setting in error messages.

    >>> check_attack("badnets", {"patch_size": 3})
    ('badnets', {'patch_size': 3})
    """
    if not isinstance(name, str):
        raise InputError(f"{where} must be a string naming an attack, got {name!r}")
    params = {} if params is None else params
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise InputError(f"{where} params must be a mapping with string keys, got {params!r}")
    try:
        params = json.loads(json.dumps(dict(params), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} params must be JSON serialisable (finite numbers): {exc}") from exc
    make_attack(name, **params)  # validates the name and the parameters
    return name, params


def check_data_fields(*, dataset: Any = "digits", data_root: Any = None, attack: Any = "badnets",
                      attack_params: Any = None, poison_rate: Any = 0.1, target: Any = 0,
                      seed: Any = 0) -> dict[str, Any]:
    """The data fields, checked and normalised (attack name and parameters by building the attack).

    Raises :class:`InputError` (or :class:`~certkit.errors.UnknownNameError`) naming the first bad field.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise InputError(f"dataset must be a non-empty string, got {dataset!r}")
    if data_root is not None:
        if not isinstance(data_root, (str, os.PathLike)):
            raise InputError(f"data_root must be a path or None, got {type(data_root).__name__}")
        data_root = os.fspath(data_root)
    attack, attack_params = check_attack(attack, attack_params)
    poison_rate = check_number(poison_rate, "poison_rate")
    if not 0.0 <= poison_rate < 1.0:
        raise InputError(f"poison_rate must lie in [0, 1), got {poison_rate!r}")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise InputError(f"target must be a non-negative integer class index, got {target!r}")
    return {"dataset": dataset, "data_root": data_root, "attack": attack, "attack_params": attack_params,
            "poison_rate": poison_rate, "target": int(target), "seed": check_seed(seed)}


@dataclass
class PreparedData:
    """The deterministic data of a :class:`DataConfig`.

    Attributes:
        config: the config it was made from.
        splits: the clean :class:`~certkit.backdoor.data.DatasetSplits`.
        attack: the :class:`~certkit.backdoor.attacks.Attack`.
        poisoned: the :class:`~certkit.backdoor.attacks.PoisonedDataset` (``.dataset`` is what models train on).
        triggered: the :class:`~certkit.backdoor.attacks.TriggeredSet` (triggered non-target test inputs).
    """

    config: DataConfig
    splits: DatasetSplits
    attack: Attack
    poisoned: PoisonedDataset
    triggered: TriggeredSet

    @property
    def train(self) -> ArrayDataset:
        """The poisoned training set."""
        return self.poisoned.dataset

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.splits.input_shape

    @property
    def test_trigger_norms(self) -> torch.Tensor:
        """l2 norm of the trigger on every clean test input (float64 ``[n_test]``)."""
        return self.attack.trigger_norms(self.splits.test.x)

    @functools.cached_property
    def data_hashes(self) -> dict[str, str]:
        """sha256 of the clean training and test sets and of the poisoned training set (recorded by runs)."""
        return {"train": self.splits.train.sha256(), "test": self.splits.test.sha256(),
                "poisoned_train": self.poisoned.dataset.sha256()}

    def attacked_indices(self) -> np.ndarray:
        """Training indices the attacker changed: the poisoned samples and any noise-mode samples."""
        return np.union1d(self.poisoned.poison_indices, self.poisoned.noise_indices).astype(np.int64)

    def defender_clean_indices(self, fraction: float, seed: int | None = None) -> np.ndarray:
        """Sorted training indices of the defender's clean set: ``round(fraction * n_train)`` samples drawn
        (seeded by ``seed``, default the config's) among those the attacker did not touch."""
        seed = self.config.seed if seed is None else check_seed(seed)
        return draw_clean_indices(len(self.splits.train), self.attacked_indices(), fraction, seed)

    def defender_clean(self, fraction: float, seed: int | None = None) -> ArrayDataset:
        """The defender's clean set (clean images, true labels; see :meth:`defender_clean_indices`)."""
        return self.splits.train.subset(self.defender_clean_indices(fraction, seed))


def draw_clean_indices(n_train: int, excluded: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction * n_train)`` training samples drawn (``default_rng(seed)``) among
    those not in ``excluded``.

    >>> draw_clean_indices(10, np.array([0, 1]), 0.5, seed=0).tolist()
    [3, 4, 5, 6, 7]
    """
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
            and math.isfinite(fraction) and 0 < fraction <= 1):
        raise InputError(f"clean fraction must lie in (0, 1], got {fraction!r}")
    eligible = np.setdiff1d(np.arange(n_train), np.asarray(excluded, dtype=np.int64))
    k = int(round(fraction * n_train))
    if k < 1:
        raise InputError(f"clean fraction {fraction:g} of {n_train} training samples is empty")
    if k > len(eligible):
        raise InputError(f"clean fraction {fraction:g} asks for {k} samples but only {len(eligible)} training "
                         "samples are unpoisoned")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(eligible, size=k, replace=False)).astype(np.int64)


_CACHE: dict[str, PreparedData] = {}
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def prepare_data(config: DataConfig | Mapping[str, Any] | Any, *, download: bool = False,
                 cache: bool = True) -> PreparedData:
    """Load the dataset, poison its training set and build the triggered test set (deterministic in the
    config; cached per process so that workers training many members load it once).

    Args:
        config: a :class:`DataConfig`, or any run config holding its fields.
        download: let torchvision datasets download.
        cache: reuse this process's copy for an equal config (the objects are shared: do not modify them).

    Raises :class:`InputError` when ``target`` is not a class of the dataset or the poison rate asks for more
    samples than there are non-target inputs.
    """
    cfg = config if isinstance(config, DataConfig) else DataConfig.of(config)
    key = cfg.key()
    with _CACHE_LOCK:
        if cache and key in _CACHE:
            return _CACHE[key]
    splits = load_dataset(cfg.dataset, root=cfg.data_root, download=download, seed=cfg.seed)
    if not 0 <= cfg.target < splits.num_classes:
        raise InputError(f"target class {cfg.target} is out of range for dataset {cfg.dataset!r} with "
                         f"{splits.num_classes} classes (use 0..{splits.num_classes - 1})")
    attack = make_attack(cfg.attack, **cfg.attack_params)
    poisoned = attack.poison(splits.train, rate=cfg.poison_rate, target=cfg.target, seed=cfg.seed)
    triggered = triggered_test_set(attack, splits.test, cfg.target)
    data = PreparedData(cfg, splits, attack, poisoned, triggered)
    if cache:
        with _CACHE_LOCK:
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = data
    return data
