"""``certkit compare``: empirical against certified backdoor robustness, attacks x defenses in one grid.

A :class:`CompareSpec` (a YAML/JSON file, flags, or the ``digits`` preset) names a dataset, attacks, poison
rates, defenses and smoothing settings. :func:`run_compare` runs every *cell* (one attack at one poison rate
against one defense) on this machine (joblib) or on a Dask cluster and writes one *comparison directory*::

    <out>/
      manifest.json          kind "compare", the spec and its canonical sha256 (a resume must match it)
      models/backdoored-<attack>.pt   the undefended model of each attack x rate (hashed; not retrained)
      cells/<cell_id>.json   one finished cell each (written atomically; kept on resume)
      ensembles/<cell_id>/   the ensemble run directory of a RAB or Cert-SSB cell (members kept on resume)
      table.csv, table.md    the tidy table, one row per cell, rebuilt from cells/
      plots/asr_vs_ctr.png, plots/certified_accuracy_<attack>.png

Cells (the ``defenses`` of the spec):

* ``undefended``: the backdoored model itself (the "before" of every other cell of its attack);
* a purifier name (:func:`purifiers.available`): purify with the defender's clean data (``clean_fraction``
  of the *clean* training set, fixed seed; methods that select carve their validation split off it),
  measure CA / ASR / RA / DER, and optionally the ASR after a re-activation fine-tune on a few poisoned
  samples (``reactivation``);
* every model above is then smoothed at test time: a short Gaussian-noise fine-tune on the defender's clean
  data (:func:`certkit.training.noise_finetune`, ``noise_finetune_epochs``) and Cohen et al.'s CERTIFY at
  ``sigma`` on the clean test set: certified accuracy at ``radii``, ACR and certified trigger robustness
  (non-target points certified correct beyond the trigger's l2 norm at that point; ``1 -`` it bounds the
  smoothed classifier's ASR);
* ``rab``: a training-time smoothed ensemble (RAB, Weber et al. 2023) of ``ensemble_members`` models
  trained on the poisoned data with noise ``sigma``, certified with the joint trigger norm
  ``sqrt(sum_j ||Delta_j||^2 + ||t||^2)`` (:mod:`certkit.ensemble_runs`);
* ``cert-ssb``: the same with sample-specific training and test scales (Cert-SSB; certificates hold
  conditional on the data-chosen scales, radius in test-sigma units, CTR by the weighted condition).

A cell that cannot run (a purifier that is not registered: reason ``not available``; a BatchNorm method on a
model without BatchNorm; any other certkit error) is recorded as ``skipped`` with its reason and the rest of
the grid goes on; an unexpected exception is recorded as ``failed``. On resume, ``ok`` and ``skipped`` cells
are kept, except ``not available`` cells of a defense that has been registered since, and ``failed`` cells
are retried. Delete ``cells/<cell_id>.json`` to recompute one cell.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import CertkitError, InputError, RecordError
from .records import RunDirectory

RUN_KIND = "compare"
#: The thirteen purifiers of the comparison (registry names), in the order of the table.
PURIFIERS: tuple[str, ...] = ("ft", "fst", "tsc", "sau", "npd", "tsbd", "fine-pruning", "anp", "nad", "i-bau",
                              "rnp", "clp", "ft-sam")
#: Defenses that are not purifiers.
SPECIAL_DEFENSES: tuple[str, ...] = ("undefended", "rab", "cert-ssb")
DEFAULT_DEFENSES: tuple[str, ...] = ("undefended", *PURIFIERS, "rab", "cert-ssb")
DEFAULT_RADII: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
NOT_AVAILABLE = "not available"
#: Caps on purifier budgets in the ``digits`` preset: a parameter of that name whose default is larger is
#: lowered to the cap (the official defaults are tuned for CIFAR-10; digits' 251 clean images need far less).
PRESET_BUDGET_CAPS: dict[str, int] = {"epochs": 10, "warm_epochs": 5, "te_epochs": 10, "ft_epochs": 10,
                                      "n_iters": 200, "curve_epochs": 20, "max_unlearn_epochs": 100,
                                      "unlearn_epochs": 20, "mask_epochs": 20}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _attack_entry(a: Any, i: int) -> dict[str, Any]:
    from .attacks import make_attack

    if isinstance(a, str):
        a = {"name": a}
    if not isinstance(a, Mapping):
        raise InputError(f"attacks[{i}] must be a name or a mapping with keys name, params; got {a!r}")
    unknown = sorted(set(a) - {"name", "params"})
    if unknown:
        raise InputError(f"unknown key(s) in attacks[{i}]: {', '.join(unknown)}; allowed: name, params")
    name, params = a.get("name"), a.get("params") or {}
    if not isinstance(name, str):
        raise InputError(f"attacks[{i}] needs a name (string), got {name!r}")
    if not isinstance(params, Mapping):
        raise InputError(f"attacks[{i}].params must be a mapping, got {params!r}")
    try:
        params = json.loads(json.dumps(dict(params), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"attacks[{i}].params must be JSON serialisable: {exc}") from exc
    make_attack(name, **params)  # validates the name and the parameters
    return {"name": name, "params": params}


def _floats(values: Any, name: str, *, lo: float, lo_strict: bool, hi: float | None = None) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise InputError(f"{name} must be a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo \
                or (lo_strict and v == lo) or (hi is not None and v >= hi):
            rng = f"{'>' if lo_strict else '>='} {lo:g}" + (f" and < {hi:g}" if hi is not None else "")
            raise InputError(f"{name} must hold finite numbers {rng}, got {v!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise InputError(f"{name} must be distinct, got {out}")
    return tuple(out)


def _pos_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _pos_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass
class CompareSpec:
    """What a comparison runs (stored in the comparison directory; its canonical hash guards resumes).

    Attributes:
        dataset, data_root, model: data (:func:`certkit.data.load_dataset`) and the architecture of the
            backdoored model (``digits-bn-cnn`` by default so that BatchNorm methods run).
        attacks: attack names or ``{"name": ..., "params": {...}}`` (:func:`certkit.attacks.make_attack`).
        poison_rates: fractions of the training set poisoned; one backdoored model per attack and rate.
        target: the target class. epochs, lr, batch_size: Adam training of the backdoored model.
        defenses: cell names: ``undefended``, purifier names, ``rab``, ``cert-ssb``.
        clean_fraction: the defender's clean data, a fixed-seed slice of the clean training set.
        purifier_params: per-purifier parameter overrides, ``{name: {param: value}}``.
        budget_caps: ``{param: cap}``: a purifier parameter of that name whose default exceeds the cap is
            lowered to it (overrides win). The parameters used are recorded in every row (``budget``).
        sigma: smoothing noise (pixel units) of the test-time cells and of the ensembles.
        noise_finetune_epochs, noise_finetune_lr: Gaussian-noise fine-tune before test-time smoothing.
        n0, n, alpha, max_points, radii, certify_batch_size: CERTIFY settings (``max_points``: a fixed-seed
            subsample of the test set).
        ensemble_members, ensemble_epochs: RAB / Cert-SSB ensembles. ssb_sigma_steps, ssb_sigma_lr: the
            sample-specific scale ascent of Cert-SSB.
        reactivation, reactivation_samples, reactivation_epochs, reactivation_lr: re-activation check: SGD
            fine-tune of each purified model on that many poisoned training samples, ASR after it.
        seed: seed of the split, poisoning, training, purification and noise.
    """

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "digits-bn-cnn"
    attacks: tuple[Any, ...] = ("badnets",)
    poison_rates: tuple[float, ...] = (0.1,)
    target: int = 0
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    clean_fraction: float = 0.2
    purifier_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget_caps: dict[str, int] = field(default_factory=dict)
    sigma: float = 0.25
    noise_finetune_epochs: int = 5
    noise_finetune_lr: float = 1e-3
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    max_points: int | None = None
    radii: tuple[float, ...] = DEFAULT_RADII
    certify_batch_size: int = 2000
    ensemble_members: int = 10
    ensemble_epochs: int = 10
    ssb_sigma_steps: int = 200
    ssb_sigma_lr: float = 1e-4
    reactivation: bool = False
    reactivation_samples: int = 5
    reactivation_epochs: int = 5
    reactivation_lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        from ._validation import check_alpha, check_choice
        from .models import MODELS

        if not isinstance(self.dataset, str) or not self.dataset:
            raise InputError(f"dataset must be a non-empty string, got {self.dataset!r}")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise InputError(f"data_root must be a string or null, got {self.data_root!r}")
        if not isinstance(self.model, str):
            raise InputError(f"model must be a string, got {self.model!r}")
        check_choice(self.model, MODELS, "model")
        attacks = [self.attacks] if isinstance(self.attacks, (str, Mapping)) else self.attacks
        if not isinstance(attacks, Sequence) or not attacks:
            raise InputError(f"attacks must be a non-empty list, got {self.attacks!r}")
        self.attacks = tuple(_attack_entry(a, i) for i, a in enumerate(attacks))
        keys = [attack_key(a["name"], a["params"], 0.0) for a in self.attacks]
        if len(set(keys)) != len(keys):
            raise InputError("attacks must be distinct (same name and parameters given twice)")
        self.poison_rates = _floats(self.poison_rates, "poison_rates", lo=0.0, lo_strict=True, hi=1.0)
        if isinstance(self.target, bool) or not isinstance(self.target, (int, np.integer)) or self.target < 0:
            raise InputError(f"target must be a non-negative integer, got {self.target!r}")
        self.target = int(self.target)
        self.epochs = _pos_int(self.epochs, "epochs")
        self.lr = _pos_float(self.lr, "lr")
        self.batch_size = _pos_int(self.batch_size, "batch_size")
        defenses = [self.defenses] if isinstance(self.defenses, str) else self.defenses
        if not isinstance(defenses, Sequence) or not defenses or not all(isinstance(d, str) and d for d in defenses):
            raise InputError(f"defenses must be a non-empty list of names, got {self.defenses!r}")
        if len(set(defenses)) != len(defenses):
            raise InputError(f"defenses must be distinct, got {list(defenses)}")
        bad = [d for d in defenses if not _safe(d)]
        if bad:
            raise InputError(f"defense names must use letters, digits, '-', '_' only: {bad}")
        self.defenses = tuple(defenses)
        if isinstance(self.clean_fraction, bool) or not isinstance(self.clean_fraction, (int, float)) \
                or not 0 < self.clean_fraction < 1:
            raise InputError(f"clean_fraction must lie in (0, 1), got {self.clean_fraction!r}")
        self.clean_fraction = float(self.clean_fraction)
        if not isinstance(self.purifier_params, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in self.purifier_params.items()):
            raise InputError("purifier_params must map purifier names to parameter mappings, "
                             f"got {self.purifier_params!r}")
        extra = sorted(set(self.purifier_params) - set(self.defenses) - set(PURIFIERS))
        if extra:  # a typo would otherwise be ignored silently
            raise InputError(f"purifier_params name unknown defenses (neither in the grid nor purifiers): "
                             f"{', '.join(extra)}")
        for k in self.purifier_params:
            if "device" in self.purifier_params[k] or "progress" in self.purifier_params[k]:
                raise InputError(f"purifier_params[{k!r}]: device and progress are set by the comparison")
        try:
            self.purifier_params = json.loads(json.dumps({k: dict(v) for k, v in self.purifier_params.items()},
                                                         allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InputError(f"purifier_params must be JSON serialisable: {exc}") from exc
        if not isinstance(self.budget_caps, Mapping):
            raise InputError(f"budget_caps must map parameter names to positive integers, got {self.budget_caps!r}")
        self.budget_caps = {str(k): _pos_int(v, f"budget_caps[{k!r}]") for k, v in self.budget_caps.items()}
        self.sigma = _pos_float(self.sigma, "sigma")
        self.noise_finetune_epochs = _pos_int(self.noise_finetune_epochs, "noise_finetune_epochs")
        self.noise_finetune_lr = _pos_float(self.noise_finetune_lr, "noise_finetune_lr")
        self.n0 = _pos_int(self.n0, "n0")
        self.n = _pos_int(self.n, "n")
        self.alpha = check_alpha(self.alpha)
        if self.max_points is not None:
            self.max_points = _pos_int(self.max_points, "max_points")
        self.radii = _floats(self.radii, "radii", lo=0.0, lo_strict=False)
        self.certify_batch_size = _pos_int(self.certify_batch_size, "certify_batch_size")
        self.ensemble_members = _pos_int(self.ensemble_members, "ensemble_members")
        self.ensemble_epochs = _pos_int(self.ensemble_epochs, "ensemble_epochs")
        self.ssb_sigma_steps = _pos_int(self.ssb_sigma_steps, "ssb_sigma_steps")
        self.ssb_sigma_lr = _pos_float(self.ssb_sigma_lr, "ssb_sigma_lr")
        if not isinstance(self.reactivation, bool):
            raise InputError(f"reactivation must be true or false, got {self.reactivation!r}")
        self.reactivation_samples = _pos_int(self.reactivation_samples, "reactivation_samples")
        self.reactivation_epochs = _pos_int(self.reactivation_epochs, "reactivation_epochs")
        self.reactivation_lr = _pos_float(self.reactivation_lr, "reactivation_lr")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**32:
            raise InputError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        self.seed = int(self.seed)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        for k in ("attacks", "poison_rates", "defenses", "radii"):
            d[k] = list(d[k])
        return d

    def sha256(self) -> str:
        """Hash of the canonical JSON of :meth:`to_dict` (sorted keys): the identity of a comparison."""
        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompareSpec:
        """Build from a mapping; unknown keys raise :class:`InputError` naming them."""
        if not isinstance(d, Mapping):
            raise InputError(f"a compare spec must be a mapping of settings, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in set(d) - set(known))
        if unknown:
            raise InputError(f"unknown compare spec key(s): {', '.join(unknown)}; allowed: {', '.join(known)}")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> CompareSpec:
        """Read a YAML (``.yaml``/``.yml``) or JSON spec file."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"spec file {p} does not exist")
        text = p.read_text()
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            raise InputError(f"spec file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from exc
        if data is None:
            data = {}
        return cls.from_dict(data)

    # ------------------------------------------------------------------ grid
    def cells(self) -> list[dict[str, Any]]:
        """Every cell of the grid, attack x rate x defense, in table order."""
        out = []
        for a in self.attacks:
            for rate in self.poison_rates:
                key = attack_key(a["name"], a["params"], rate)
                for d in self.defenses:
                    out.append({"id": f"{key}__{d}", "attack_key": key, "attack": a["name"],
                                "attack_params": a["params"], "poison_rate": rate, "defense": d})
        return out


def _safe(name: str) -> bool:
    return all(c.isalnum() or c in "-_" for c in name)


def attack_key(name: str, params: Mapping[str, Any], rate: float) -> str:
    """File-safe key of an attack at a poison rate, e.g. ``badnets-p0.1`` (a short parameter hash is added
    when the attack has parameters)."""
    tag = f"-{hashlib.sha256(_canonical(dict(params)).encode()).hexdigest()[:8]}" if params else ""
    return f"{name}{tag}-p{rate:g}"


#: Digits-scale settings of the ``digits`` preset (251 clean images, so one official 128-256 batch is the whole
#: set): smaller batches and, where the official step size barely moves the model in so few steps, a larger
#: learning rate. Method hyper-parameters that define the defense (FST's alpha, ANP's eps and threshold, CLP's
#: u, NPD's bound, TSC's t, ...) keep their official values, so a method that fails here fails honestly.
PRESET_PURIFIER_PARAMS: dict[str, dict[str, Any]] = {
    "ft": {"epochs": 10, "batch_size": 32},
    "fst": {"epochs": 20, "batch_size": 32},
    "tsc": {"rounds": 2, "curve_epochs": 20, "ft_epochs": 2, "batch_size": 64, "curve_lr": 0.05},
    "sau": {"epochs": 10, "lr": 3e-3, "batch_size": 32},
    "npd": {"epochs": 20, "warm_epochs": 2, "batch_size": 32},
    "tsbd": {"lr_unlearn": 1e-2, "n_candidates": [0.05, 0.1, 0.3], "ft_epochs": 10, "batch_size": 32},
    "fine-pruning": {"epochs": 20, "batch_size": 32},
    "anp": {"n_iters": 200, "batch_size": 64},
    "nad": {"batch_size": 32},
    "i-bau": {"lr": 3e-4, "batch_size": 64, "portion": 1.0},
    "rnp": {},
    "clp": {},
    "ft-sam": {"epochs": 10, "batch_size": 32},
}


def preset(name: str) -> CompareSpec:
    """A named default grid. ``digits``: BadNets and Blended at 10% on the embedded digits with the BatchNorm
    digits CNN, the undefended model, all thirteen purifiers (budgets capped by :data:`PRESET_BUDGET_CAPS`),
    RAB and Cert-SSB ensembles of 20 members trained 5 epochs each (with M votes a point certifies at most
    ``p_lower = (alpha / K) ** (1 / M)`` with the class-selection correction: 20 members and 10 classes allow
    radius ~0.34 sigma), sigma 0.25, n = 1000 noise draws on
    the whole test set. Purifier settings: :data:`PRESET_PURIFIER_PARAMS` (digits-scale batches and step
    sizes; I-BAU perturbs the whole batch instead of the official 1%, which on 64-image batches is no image)
    over the capped official defaults; the re-activation check is on."""
    if name != "digits":
        raise InputError(f"unknown preset {name!r}; available: digits")
    return CompareSpec(dataset="digits", model="digits-bn-cnn", attacks=("badnets", "blended"), poison_rates=(0.1,),
                       defenses=DEFAULT_DEFENSES, budget_caps=dict(PRESET_BUDGET_CAPS),
                       purifier_params=copy.deepcopy(PRESET_PURIFIER_PARAMS), reactivation=True, sigma=0.25, n=1000,
                       ensemble_members=20, ensemble_epochs=5, ssb_sigma_steps=200)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class _Data:
    splits: Any
    attack: Any
    poisoned: Any
    triggered: Any
    clean: Any
    keep: np.ndarray


_DATA_CACHE: dict[str, _Data] = {}


def _data(spec: CompareSpec, cell: Mapping[str, Any]) -> _Data:
    """Deterministic data of a cell's attack (cached per process)."""
    from .attacks import make_attack, triggered_test_set
    from .data import load_dataset

    key = _canonical([spec.dataset, spec.data_root, spec.seed, spec.target, spec.clean_fraction, spec.max_points,
                      cell["attack"], cell["attack_params"], cell["poison_rate"]])
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    splits = load_dataset(spec.dataset, root=spec.data_root, seed=spec.seed)
    if spec.target >= splits.num_classes:
        raise InputError(f"target class {spec.target} is out of range for {splits.num_classes} classes")
    attack = make_attack(cell["attack"], **cell["attack_params"])
    poisoned = attack.poison(splits.train, rate=cell["poison_rate"], target=spec.target, seed=spec.seed)
    triggered = triggered_test_set(attack, splits.test, spec.target)
    rng = np.random.default_rng(spec.seed)
    idx = np.sort(rng.permutation(len(splits.train))[: max(1, int(round(spec.clean_fraction * len(splits.train))))])
    clean = splits.train.subset(idx)
    n_test = len(splits.test)
    if spec.max_points is not None and spec.max_points < n_test:
        keep = np.sort(np.random.default_rng(spec.seed).permutation(n_test)[: spec.max_points])
    else:
        keep = np.arange(n_test)
    data = _Data(splits, attack, poisoned, triggered, clean, keep)
    _DATA_CACHE[key] = data
    return data


def backdoored_name(key: str) -> str:
    return f"backdoored-{key}"


def _train_backdoored(run: RunDirectory, spec: CompareSpec, cell: Mapping[str, Any], device: str,
                      log: Any) -> None:
    """Train (once) the undefended model of an attack x rate into ``models/``."""
    from .models import build_model
    from .training import train_model

    name = backdoored_name(cell["attack_key"])
    if run.has_model(name):
        return
    data = _data(spec, cell)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_model(spec.model, num_classes=data.splits.num_classes, input_shape=data.splits.input_shape,
                            mean=data.splits.mean, std=data.splits.std)
    t0 = time.perf_counter()
    train_model(model, data.poisoned.dataset, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                seed=spec.seed, device=device, progress=False, desc=f"train {name}")
    run.save_model(name, model.cpu(), model.certkit_spec)
    run.record_timing(f"train/{name}", time.perf_counter() - t0)
    log(f"[compare] trained {name} ({time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------- cells
def purifier_budget(spec: CompareSpec, name: str) -> dict[str, Any]:
    """The parameters a purifier cell uses: official defaults, lowered by ``budget_caps``, then the spec's
    ``purifier_params`` (``device``/``progress`` excluded). Raises :class:`UnknownNameError` when ``name``
    is not registered."""
    import inspect

    import purifiers

    cls = type(purifiers.make(name))
    params: dict[str, Any] = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", "device", "progress") or p.default is inspect.Parameter.empty:
            continue
        params[p.name] = p.default
        cap = spec.budget_caps.get(p.name)
        if cap is not None and isinstance(p.default, int) and not isinstance(p.default, bool) and p.default > cap:
            params[p.name] = cap
    params.update(spec.purifier_params.get(name, {}))
    return json.loads(json.dumps(params, default=str))


def reactivation_asr(model: torch.nn.Module, poisoned: Any, triggered: Any, *, samples: int, epochs: int,
                     lr: float, seed: int, device: str) -> float:
    """ASR of ``model`` after a retuning attack (:func:`purifiers.reactivation.reactivation_asr`: SGD,
    momentum 0.9, on ``samples`` poisoned training samples in one batch for ``epochs``; Min et al., NeurIPS
    2024: 5 samples, 5 epochs)."""
    from purifiers.reactivation import reactivation_asr as _reactivation_asr

    return float(_reactivation_asr(model, poisoned, triggered, n_samples=samples, epochs=epochs, lr=lr,
                                   batch_size=samples, seed=seed, device=device))


def _curve(res: Any) -> dict[str, Any]:
    radii = np.sort(res.radius[res.correct]).tolist()
    return {"n_points": len(res), "correct_radii": [round(float(r), 6) for r in radii]}


def _smoothed(spec: CompareSpec, model: torch.nn.Module, data: _Data, device: str) -> dict[str, Any]:
    """Noise fine-tune ``model`` on the defender's clean data, certify the clean test set at ``sigma``."""
    from .metrics import certified_trigger_robustness
    from .smoothing import RandomizedSmoothing
    from .training import noise_finetune

    t0 = time.perf_counter()
    tuned = noise_finetune(model, data.clean, sigma=spec.sigma, epochs=spec.noise_finetune_epochs,
                           lr=spec.noise_finetune_lr, seed=spec.seed, device=device, progress=False)
    test, keep = data.splits.test, data.keep
    norms = data.attack.trigger_norms(test.x[keep])
    res = RandomizedSmoothing(tuned, data.splits.num_classes, spec.sigma, batch_size=spec.certify_batch_size,
                              device=device, seed=spec.seed, progress=False).certify(
        test.x[keep], test.y[keep], n0=spec.n0, n=spec.n, alpha=spec.alpha, ids=torch.as_tensor(keep),
        trigger_norm=norms)
    ctr = certified_trigger_robustness(res, target=spec.target)
    nt = test.y[keep].numpy() != spec.target
    return {
        "smoothed_ca": res.accuracy(),
        "certified_accuracy": {f"{r:g}": float(a) for r, a in
                               zip(spec.radii, np.atleast_1d(res.certified_accuracy(list(spec.radii))))},
        "acr": res.acr(), "abstain_rate": res.abstain_rate(), "ctr": ctr,
        "certified_asr_bound": None if math.isnan(ctr) else 1.0 - ctr,
        "trigger_norm": float(np.median(norms.numpy()[nt])) if nt.any() else None,
        "certify_s": time.perf_counter() - t0, "curve": _curve(res),
    }


def _before(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, data: _Data, device: str
            ) -> tuple[torch.nn.Module, Any]:
    from .metrics import empirical_metrics

    model = run.load_model(backdoored_name(cell["attack_key"]), device="cpu")
    return model, empirical_metrics(model, data.splits.test.x, data.splits.test.y, data.triggered, device=device)


def _purifier_cell(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, device: str) -> dict[str, Any]:
    import purifiers

    from .metrics import defense_effectiveness_rating, empirical_metrics

    name = cell["defense"]
    data = _data(spec, cell)
    model, before = _before(spec, cell, run, data, device)
    row: dict[str, Any] = {"kind": "undefended" if name == "undefended" else "purifier",
                           "ca_before": before.clean_accuracy, "asr_before": before.attack_success_rate}
    if name == "undefended":
        purified, after, row["budget"] = model, before, {}
    else:
        if name not in purifiers.available():
            return {**row, "status": "skipped", "reason": NOT_AVAILABLE}
        params = purifier_budget(spec, name)
        row["budget"] = params
        method = purifiers.make(name, **params, device=device, progress=False)
        t0 = time.perf_counter()
        purified = method.purify(model, data.clean, seed=spec.seed)
        row["purify_s"] = time.perf_counter() - t0
        after = empirical_metrics(purified, data.splits.test.x, data.splits.test.y, data.triggered, device=device)
    row.update(ca=after.clean_accuracy, asr=after.attack_success_rate, ra=after.robust_accuracy,
               der=defense_effectiveness_rating(before.clean_accuracy, before.attack_success_rate,
                                                after.clean_accuracy, after.attack_success_rate))
    if spec.reactivation:
        row["reactivation_asr"] = reactivation_asr(purified, data.poisoned, data.triggered,
                                                   samples=spec.reactivation_samples,
                                                   epochs=spec.reactivation_epochs, lr=spec.reactivation_lr,
                                                   seed=spec.seed, device=device)
    row.update(_smoothed(spec, purified, data, device))
    return {**row, "status": "ok", "reason": ""}


def _ensemble_cell(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, device: str) -> dict[str, Any]:
    from .ensemble_runs import EnsembleCertifyConfig, certify_ensemble_run
    from .ensemble_training import EnsembleSpec, train_ensemble
    from .metrics import defense_effectiveness_rating

    ssb = cell["defense"] == "cert-ssb"
    data = _data(spec, cell)
    _, before = _before(spec, cell, run, data, device)
    espec = EnsembleSpec(dataset=spec.dataset, data_root=spec.data_root, model=spec.model, attack=cell["attack"],
                         attack_params=cell["attack_params"], poison_rate=cell["poison_rate"], target=spec.target,
                         members=spec.ensemble_members, sigma=spec.sigma, epochs=spec.ensemble_epochs,
                         seed=spec.seed,
                         **({"noise": "sample-specific", "sigma_steps": spec.ssb_sigma_steps,
                             "sigma_lr": spec.ssb_sigma_lr} if ssb else {}))
    sub = train_ensemble(espec, run.path / "ensembles" / cell["id"], n_jobs=1, device=device, progress=False)
    summary = certify_ensemble_run(sub, EnsembleCertifyConfig(alpha=spec.alpha, max_points=spec.max_points,
                                                              seed=spec.seed, radii=tuple(spec.radii)),
                                   device=device, progress=False, log=lambda *_: None)
    ens = summary["ensemble"]
    frame = sub.read_frame("points.csv")
    clean = frame[frame["set"] == "clean"]
    radii = np.sort(clean["radius"].to_numpy()[clean["correct"].to_numpy().astype(bool)])
    ctr = ens["certified_trigger_robustness"]
    ca, asr = ens["ensemble_clean_accuracy"], ens["ensemble_asr"]
    return {
        "kind": cell["defense"], "ca_before": before.clean_accuracy, "asr_before": before.attack_success_rate,
        "budget": {"members": spec.ensemble_members, "epochs": spec.ensemble_epochs,
                   **({"sigma_steps": spec.ssb_sigma_steps, "sigma_lr": spec.ssb_sigma_lr} if ssb else {})},
        "ca": ca, "asr": asr, "ra": None,
        "der": defense_effectiveness_rating(before.clean_accuracy, before.attack_success_rate, ca, asr),
        "smoothed_ca": ens["certified_accuracy"].get("0", float(np.mean(clean["correct"]))),
        "certified_accuracy": ens["certified_accuracy"], "acr": ens["acr"], "abstain_rate": ens["abstain_rate"],
        "ctr": ctr, "certified_asr_bound": None if ctr is None or math.isnan(ctr) else 1.0 - ctr,
        "trigger_norm": ens.get("joint_trigger_norm_median"),
        "curve": {"n_points": int(len(clean)), "correct_radii": [round(float(r), 6) for r in radii]},
        "note": ("joint trigger norm; radius in test-sigma units, CTR by the weighted condition, conditional on "
                 "the data-chosen scales" if ssb else "joint trigger norm sqrt(sum ||Delta_j||^2 + ||t||^2)"),
        "status": "ok", "reason": "",
    }


def run_cell(spec_dict: Mapping[str, Any], cell: Mapping[str, Any], out: str, device: str = "cpu") -> dict[str, Any]:
    """Run one cell and return its row (never raises: failures become ``skipped``/``failed`` rows).

    Pure and idempotent given the comparison directory (module level, so joblib and Dask pickle it by
    reference); it reads the backdoored model from ``out`` and writes only ``out/ensembles/<cell_id>``.
    """
    spec = CompareSpec.from_dict(spec_dict)
    base = {"cell_id": cell["id"], "attack": cell["attack"], "attack_params": cell["attack_params"],
            "poison_rate": cell["poison_rate"], "defense": cell["defense"], "spec_sha256": spec.sha256()}
    t0 = time.perf_counter()
    try:
        run = RunDirectory.open(out)
        if cell["defense"] in ("rab", "cert-ssb"):
            row = _ensemble_cell(spec, cell, run, device)
        else:
            row = _purifier_cell(spec, cell, run, device)
    except CertkitError as exc:
        row = {"status": "skipped", "reason": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - a bug in one method must not abort the grid
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        row = {"status": "failed", "reason": tb}
    from .records import to_jsonable

    return to_jsonable({**base, **row, "wall_s": time.perf_counter() - t0})


# ---------------------------------------------------------------------------------------------- grid
def _open_dir(out: str | os.PathLike, spec: CompareSpec) -> RunDirectory:
    root = Path(out)
    sha = spec.sha256()
    if (root / "manifest.json").exists():
        run = RunDirectory.open(root)
        stored = run.config.get("spec_sha256") if run.kind == RUN_KIND else None
        if stored != sha:
            what = f"a {run.kind!r} run" if run.kind != RUN_KIND else f"another spec (sha256 {str(stored)[:12]})"
            raise RecordError(f"comparison directory {root} holds {what}, not this spec (sha256 {sha[:12]}); "
                              "refusing to mix results: use a new --out directory")
        return run
    return RunDirectory.create(root, {"compare": spec.to_dict(), "spec_sha256": sha}, kind=RUN_KIND)


def _finished(run: RunDirectory, cid: str, sha: str, registered: Sequence[str]) -> dict[str, Any] | None:
    rel = f"cells/{cid}.json"
    if rel not in run.manifest["files"]:
        return None
    try:
        row = run.read_json(rel)
    except (RecordError, OSError, ValueError):
        return None
    if row.get("spec_sha256") != sha or row.get("status") not in ("ok", "skipped"):
        return None
    if row.get("status") == "skipped" and row.get("reason") == NOT_AVAILABLE and row.get("defense") in registered:
        return None
    return row


def _iter_cells(tasks: list[tuple], n_jobs: int, backend: str, scheduler: Any) -> Iterator[dict[str, Any]]:
    if scheduler is None:
        if n_jobs == 1:
            for t in tasks:
                yield run_cell(*t)
            return
        from joblib import Parallel, delayed

        yield from Parallel(n_jobs=n_jobs, backend=backend, return_as="generator_unordered")(
            delayed(run_cell)(*t) for t in tasks)
        return
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler == "local-cluster":
        cluster = LocalCluster(n_workers=max(1, n_jobs), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster, set_as_default=False)
        own = True
    elif isinstance(scheduler, Client):
        client, own = scheduler, False
    else:
        from .ensemble_training import _connect

        client, own = _connect(scheduler, 10.0)
    futures: list[Any] = []
    try:
        token = os.urandom(4).hex()
        futures = client.map(run_cell, *list(zip(*tasks)), key=[f"certkit-cell-{t[1]['id']}-{token}" for t in tasks],
                             pure=False)
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        if futures:
            with contextlib.suppress(Exception):
                client.cancel(futures)
        if own:
            client.close()
        if cluster is not None:
            cluster.close()


@dataclass
class CompareResult:
    """What :func:`run_compare` returns: the directory, the table and how many cells ran this time."""

    path: Path
    table: pd.DataFrame
    computed: int
    reused: int

    def __repr__(self) -> str:
        return f"CompareResult({self.path}, {len(self.table)} cells, computed {self.computed}, reused {self.reused})"


def run_compare(spec: CompareSpec | Mapping[str, Any], out: str | os.PathLike, *, n_jobs: int = 1,
                backend: str = "loky", scheduler: Any = None, device: str = "cpu", progress: bool = True,
                plots: bool = True, log: Any = print) -> CompareResult:
    """Run every unfinished cell of ``spec`` into the comparison directory ``out`` and rebuild its table
    (``table.csv``, ``table.md``) and plots.

    Args:
        spec: a :class:`CompareSpec` or its mapping.
        out: comparison directory, created or resumed (a directory made from another spec is refused).
        n_jobs, backend: joblib map over the cells (``n_jobs=1``: in this process).
        scheduler: ``None`` (joblib), ``"local-cluster"`` (a Dask LocalCluster of ``n_jobs`` workers), a
            Dask scheduler address ``tcp://host:port`` or a :class:`distributed.Client`. Workers must see
            ``out`` at the same path.
        device: ``cpu`` | ``cuda`` | ``auto`` for training, purification and certification.
    """
    from tqdm.auto import tqdm

    import purifiers

    from .devices import resolve_device

    spec = spec if isinstance(spec, CompareSpec) else CompareSpec.from_dict(spec)
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise InputError(f"n_jobs must be a non-zero integer, got {n_jobs!r}")
    if scheduler is not None and not (isinstance(scheduler, str) and (scheduler == "local-cluster"
                                                                       or "://" in scheduler)):
        from .ensemble_training import _check_client

        _check_client(scheduler)
    dev = str(resolve_device(device)) if scheduler is None else device
    run = _open_dir(out, spec)
    sha = spec.sha256()
    cells = spec.cells()
    t0 = time.perf_counter()
    seen: set[str] = set()
    for c in cells:  # the undefended models first, in this process (each is reused by every cell of its row)
        if c["attack_key"] not in seen:
            seen.add(c["attack_key"])
            _train_backdoored(run, spec, c, str(resolve_device(device)), log)
    run.reload()
    registered = list(purifiers.available())
    todo = [c for c in cells if _finished(run, c["id"], sha, registered) is None]
    reused = len(cells) - len(todo)
    if reused:
        log(f"[compare] {reused} finished cell(s) kept, {len(todo)} to run")
    tasks = [(spec.to_dict(), c, str(Path(run.path).resolve()), dev) for c in todo]
    bar = tqdm(total=len(cells), initial=reused, desc="cells", unit="cell", disable=not progress,
               dynamic_ncols=True)
    try:
        for row in _iter_cells(tasks, n_jobs, backend, scheduler):
            run.write_json(f"cells/{row['cell_id']}.json", row)
            bar.update(1)
            bar.set_postfix(last=row["cell_id"], status=row["status"])
            if row["status"] != "ok":
                log(f"[compare] {row['cell_id']}: {row['status']} ({row['reason']})")
    finally:
        bar.close()
    run.record_timing("compare", time.perf_counter() - t0)
    table = write_table(run, spec)
    if plots:
        from .compare_plots import write_plots

        write_plots(run, table)
    return CompareResult(Path(run.path), table, len(todo), reused)


# ---------------------------------------------------------------------------------------------- table
TABLE_COLUMNS = ("attack", "poison_rate", "defense", "kind", "status", "reason", "ca", "asr", "ra", "der",
                 "ca_before", "asr_before", "reactivation_asr", "smoothed_ca", "acr", "ctr", "certified_asr_bound",
                 "trigger_norm", "abstain_rate", "purify_s", "wall_s", "budget", "cell_id")


def load_cells(path: str | os.PathLike | RunDirectory) -> list[dict[str, Any]]:
    """The finished cell rows of a comparison directory (hash-checked), in the spec's table order."""
    run = path if isinstance(path, RunDirectory) else RunDirectory.open(path)
    if run.kind != RUN_KIND:
        raise RecordError(f"{run.path} holds a {run.kind!r} run, not a comparison directory")
    spec = CompareSpec.from_dict(run.config["compare"])
    rows, files = [], run.manifest["files"]
    for c in spec.cells():
        rel = f"cells/{c['id']}.json"
        if rel in files and run.file(rel).is_file():  # a deleted cell file is recomputed on the next run
            rows.append(run.read_json(rel))
    return rows


def build_table(rows: Sequence[Mapping[str, Any]], radii: Sequence[float]) -> pd.DataFrame:
    """One row per cell with :data:`TABLE_COLUMNS` and ``ca@<r>`` columns for each radius."""
    records = []
    for r in rows:
        rec = {c: r.get(c) for c in TABLE_COLUMNS}
        rec["budget"] = _canonical(r["budget"]) if r.get("budget") is not None else ""
        ca_r = r.get("certified_accuracy") or {}
        for rad in radii:
            rec[f"ca@{rad:g}"] = ca_r.get(f"{rad:g}")
        records.append(rec)
    cols = list(TABLE_COLUMNS[:16]) + [f"ca@{rad:g}" for rad in radii] + list(TABLE_COLUMNS[16:])
    frame = pd.DataFrame.from_records(records, columns=cols)
    for c in cols:
        if c not in ("attack", "defense", "kind", "status", "reason", "budget", "cell_id"):
            frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


def to_markdown(table: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table (3 decimals; empty cells for missing values)."""
    cols = list(columns) if columns is not None else [c for c in table.columns if c not in ("budget", "cell_id")]

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


MARKDOWN_NOTE = (
    "CA/ASR/RA: empirical clean accuracy, attack success rate and robust accuracy of the defended model "
    "(ensembles: majority vote; RA not measured); DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2 against the "
    "undefended model. smoothed_ca and ca@r: certified accuracy of the smoothed classifier (purified model "
    "after a Gaussian-noise fine-tune, or the ensemble) at radius r; acr: average certified radius; ctr: "
    "certified trigger robustness (non-target test points certified correct beyond the trigger's l2 norm, the "
    "joint norm for ensembles); certified_asr_bound = 1 - ctr. Times in seconds. Budgets per row in table.csv.\n"
)


def write_table(run: RunDirectory, spec: CompareSpec) -> pd.DataFrame:
    """Rebuild ``table.csv`` and ``table.md`` from ``cells/``."""
    table = build_table(load_cells(run), spec.radii)
    run.write_frame("table.csv", table)
    run.write_text("table.md", f"# certkit compare ({spec.dataset}, model {spec.model}, sigma {spec.sigma:g})\n\n"
                   + to_markdown(table) + "\n" + MARKDOWN_NOTE)
    return table


def report(path: str | os.PathLike, *, replot: bool = True) -> str:
    """Rebuild the table (and plots) of a comparison directory from its cell files; return the Markdown."""
    run = RunDirectory.open(path)
    if run.kind != RUN_KIND:
        raise RecordError(f"{run.path} holds a {run.kind!r} run, not a comparison directory")
    spec = CompareSpec.from_dict(run.config["compare"])
    table = write_table(run, spec)
    if replot and len(table):
        from .compare_plots import write_plots

        write_plots(run, table)
    return run.read_text("table.md")
