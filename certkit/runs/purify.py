"""Purify the backdoored model of a run directory, save it (rebuildable), and certify it like any other model.

The library behind ``certkit purify``: :func:`purify_run` loads a single-model run's ``undefended`` model
(trained on the poisoned set without noise) and its data and attack (the run's :class:`TrainConfig` through
:func:`certkit.runs.single.prepare`), draws the defender's clean data from the *clean* training set (never
the test split, never a poisoned sample), runs a registered :mod:`purifiers` method, evaluates it before and
after (CA, ASR, RA, DER, runtime) and writes

- ``models/purified-<method>.pt`` (hashed, loaded with ``weights_only=True``): methods that insert layers
  (NPD's polarizer) are saved with a spec that names the base architecture and the structural insertions
  (``"structure"``), so :func:`build_model_from_spec` rebuilds the architecture before the state dict loads;
- ``purify/<method>.json``: the parameters, seeds, the defender's training-set indices, the report;
- with ``noise_finetune_epochs``: ``models/purified-<method>-noise.pt``, the purified model fine-tuned with
  Gaussian noise at ``noise_sigma`` (:func:`certkit.backdoor.training.noise_finetune`, same clean data) so that it
  is a usable base classifier for test-time smoothing, and its own CA/ASR (does the fine-tune bring the
  backdoor back?).

``summary.json`` gets a ``"purified"`` section (one entry per saved model) that :func:`certkit.runs.single.report`
prints; an entry made with ``fast`` (``--fast``: the method's tiny ``fast_params``) has ``"smoke_test": true``
and is marked as a smoke test in the report; ``certkit certify RUN --model purified-<method> --sigma S``
certifies them with Cohen's CERTIFY.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import purifiers
from certkit._validation import check_positive_int, check_seed
from certkit.backdoor.prepare import prepare_data
from certkit.backdoor.training import noise_finetune
from certkit.devices import resolve_device
from certkit.errors import InputError, UnknownNameError
from certkit.runs.budget import announce, seconds_per_input
from certkit.runs.defaults import PURIFY
from certkit.runs.fct import save_split, split_line
from certkit.runs.models import NOISE_SUFFIX, PURIFIED_PREFIX, load_run_model, purified_spec
from certkit.runs.rundir import RunDirectory
from certkit.runs.single import RUN_KIND, TrainConfig
from purifiers._common import split_validation

DEFAULT_NOISE_SIGMA = 0.25
#: the defender's fraction when the method's own default leaves fewer than ``MIN_PER_CLASS`` images per class
SMALL_DATA_FRACTION = 0.2
MIN_PER_CLASS = 20


# ------------------------------------------------------------------------------------------ parameters
def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["epochs=3", "alpha=0.1", "train_bn=false", "bound=null", "mode=x"]`` -> a dict; each value is
    parsed as JSON when possible (numbers, true/false, null, lists), else kept as a string."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--param expects KEY=VALUE, got {item!r}")
        if key in out:
            raise InputError(f"--param {key} is given twice")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def default_clean_fraction(method: str, n_train: int, num_classes: int) -> float:
    """The defender's default fraction of the training set: the method's ``tags.clean_fraction`` (its paper's
    setting), raised to :data:`SMALL_DATA_FRACTION` (0.2) when that leaves fewer than :data:`MIN_PER_CLASS`
    images per class. On digits (1257 training images) 2-5% is 2-6 images per class, on which methods that
    re-initialise or re-train layers collapse; 20% (251 images, ~25 per class) gives them a fair chance."""
    frac = float(purifiers.available()[method]["clean_fraction"])
    if frac * n_train < MIN_PER_CLASS * num_classes:
        frac = max(frac, SMALL_DATA_FRACTION)
    return frac


# ------------------------------------------------------------------------------------------ structure


# ------------------------------------------------------------------------------------------ the run step
@dataclass
class PurifyConfig:
    """What ``certkit purify`` does to a run."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    clean_fraction: float | None = None  # None: default_clean_fraction
    fast: bool = False  # merge the method's fast_params (tiny budget, smoke runs) under params
    noise_finetune_epochs: int = PURIFY["noise_finetune_epochs"]# 0: no noise fine-tune
    noise_sigma: float = PURIFY["noise_sigma"]
    noise_lr: float = 1e-3
    seed: int = PURIFY["seed"]

    def __post_init__(self) -> None:


        names = purifiers.available()
        if self.method not in names:

            hint = ("; fct-st trains a new model from the poisoned data: `certkit train --defense fct-st`"
                    if self.method == "fct-st" else "")
            raise UnknownNameError(f"unknown purification method {self.method!r}; available: {', '.join(names)}{hint}")
        if not isinstance(self.params, dict):
            raise InputError(f"params must be a dict, got {type(self.params).__name__}")
        reserved = sorted({"device", "progress"} & set(self.params))
        if reserved:
            raise InputError(f"pass {', '.join(reserved)} with --device / --no-progress, not --param")
        self.seed = check_seed(self.seed)
        if self.noise_finetune_epochs:
            check_positive_int(self.noise_finetune_epochs, "--noise-finetune")
        elif self.noise_finetune_epochs != 0:
            raise InputError(f"--noise-finetune must be a non-negative integer, got {self.noise_finetune_epochs!r}")
        for v, what in ((self.noise_sigma, "--noise-sigma"), (self.noise_lr, "noise fine-tune lr")):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{what} must be a positive finite number, got {v!r}")

    @property
    def model_name(self) -> str:
        return PURIFIED_PREFIX + self.method

    def purifier_params(self) -> dict[str, Any]:

        return {**(purifiers.fast_params(self.method) if self.fast else {}), **self.params}


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in params.items()}


def _announce_purify(method: str, purifier: Any, model: torch.nn.Module, n: int, num_classes: int,
                     input_shape: Any, device: str, log: Any) -> None:
    """The budget line of :func:`purify_run`: the method's passes over its data (:meth:`purifiers.Purifier.work`,
    approximate), timed on one training step of the model (nothing for a method without a formula, e.g. CLP)."""
    work = purifier.work(n, num_classes)
    if work is None:
        return
    passes, detail = work
    per = seconds_per_input(model, input_shape, batch=getattr(purifier, "batch_size", 128), device=device,
                            backward=True)
    announce(log, f"purify {method}", int(round(passes * n)), "inputs forward and backward",
             detail=f"{detail} over {n} images", seconds_per_unit=per, device=resolve_device(device),
             note="approximate (the method's main loops)")


def purify_run(run: RunDirectory, cfg: PurifyConfig, *, device: str = "auto", progress: bool = True,
               download: bool = False, log: Any = print) -> dict[str, Any]:
    """Purify the run's ``undefended`` model with ``cfg.method``; save, evaluate and record it (see the
    module docstring). Returns the record written to ``purify/<method>.json``."""

    if run.kind != RUN_KIND:
        raise InputError(f"run {run.path} is a {run.kind!r} run; purify works on single-model runs "
                         "(`certkit train` / `certkit demo`)")
    train_cfg = TrainConfig.from_dict(run.config["train"])
    if not run.has_model("undefended"):
        raise InputError(f"run {run.path} has no verified 'undefended' model (trained without noise): train it "
                         "with `certkit train --noise-sigmas 0 ...`")
    exp = prepare_data(train_cfg, download=download)
    model = load_run_model(run, "undefended", device="cpu")
    purifier = purifiers.make(cfg.method, **cfg.purifier_params(), device=device, progress=progress)
    tags = type(purifier).tags
    train = exp.splits.train
    fraction = (default_clean_fraction(cfg.method, len(train), exp.splits.num_classes)
                if cfg.clean_fraction is None else cfg.clean_fraction)
    idx = exp.defender_clean_indices(fraction, cfg.seed)
    clean = train.subset(idx)
    fit, validation = clean, None
    if tags.uses_validation:
        fit, validation = split_validation(clean, type(purifier).validation_fraction, cfg.seed)
    log(f"[purify] {cfg.method}: {len(fit)} clean training images"
        + (f" + {len(validation)} validation" if validation is not None else "")
        + f" ({fraction:.0%} of the training set, none poisoned)")
    if cfg.fast:
        log(f"[purify] {cfg.method}: --fast smoke-test budgets {purifiers.fast_params(cfg.method)}: not a "
            "faithful setting; the results are labelled smoke_test")
    train_data = {"train_data": exp.poisoned.dataset} if tags.needs_training_set else {}
    if train_data:
        log(f"[purify] {cfg.method} works on the poisoned training set ({len(exp.poisoned.dataset)} images); the "
            "clean slice above is only used for the noise fine-tune")
    purifier.check(model, fit, **train_data)  # refuse (e.g. no BatchNorm) before announcing the work
    _announce_purify(cfg.method, purifier, model, len(exp.poisoned.dataset) if train_data else len(fit),
                     exp.splits.num_classes, exp.splits.input_shape, device, log)
    t0 = time.perf_counter()
    purified = purifier.purify(model, fit, validation=validation, seed=cfg.seed, **train_data)
    runtime = time.perf_counter() - t0
    report = purifiers.evaluate(model, purified, exp.splits.test, exp.triggered, device=device, runtime_s=runtime)
    spec = purified_spec(purified, run.model_spec("undefended"))
    run.save_model(cfg.model_name, purified, spec)
    run.record_seed(f"purify/{cfg.method}", cfg.seed)
    run.record_data_hash(f"purify/{cfg.method}/clean", clean.sha256())
    run.record_timing(f"purify/{cfg.method}", runtime)
    log(f"[purify] {cfg.model_name}: CA {report.ca_before:.3f} -> {report.ca_after:.3f}  ASR {report.asr_before:.3f}"
        f" -> {report.asr_after:.3f}  RA {report.ra_before:.3f} -> {report.ra_after:.3f}  DER {report.der:.3f}  "
        f"({runtime:.1f} s)")
    record: dict[str, Any] = {
        "method": cfg.method, "model": cfg.model_name, "params": _jsonable(purifier.get_params()),
        "tags": tags.to_dict(), "config": asdict(cfg), "seed": cfg.seed,
        "clean": {"fraction": fraction, "n": len(clean), "n_fit": len(fit),
                  "n_validation": 0 if validation is None else len(validation),
                  "train_indices": idx.tolist(), "sha256": clean.sha256()},
        "report": report.to_dict(), "noise_finetune": None,
        "budget": getattr(purifier, "budget_", None), "smoke_test": cfg.fast,
    }
    split = getattr(purifier, "split_", None)
    if split is not None:  # FCT: per-sample scores, thresholds, flags; precision / recall as a diagnostic
        record["split"] = save_split(run, f"purify/{cfg.method}_split.npz", split, exp.poisoned.poison_indices)
        log(f"[purify] {split_line(cfg.method, record['split'])}")
    entries = {cfg.model_name: {"method": cfg.method, "noise_sigma": None, **report.to_dict(),
                                "smoke_test": cfg.fast}}
    noise_name = cfg.model_name + NOISE_SUFFIX
    if cfg.noise_finetune_epochs:

        t1 = time.perf_counter()
        tuned = noise_finetune(purified, clean, sigma=cfg.noise_sigma, epochs=cfg.noise_finetune_epochs,
                               lr=cfg.noise_lr, seed=cfg.seed, device=device, progress=progress)
        tuned.to("cpu").eval()
        t_noise = time.perf_counter() - t1
        nrep = purifiers.evaluate(model, tuned, exp.splits.test, exp.triggered, device=device, runtime_s=t_noise)
        run.save_model(noise_name, tuned, purified_spec(tuned, run.model_spec("undefended")))
        run.record_timing(f"purify/{cfg.method}/noise-finetune", t_noise)
        record["noise_finetune"] = {"model": noise_name, "sigma": cfg.noise_sigma,
                                    "epochs": cfg.noise_finetune_epochs, "lr": cfg.noise_lr, "seed": cfg.seed,
                                    "report": nrep.to_dict(), "asr_change": nrep.asr_after - report.asr_after}
        entries[noise_name] = {"method": cfg.method, "noise_sigma": cfg.noise_sigma, **nrep.to_dict(),
                               "smoke_test": cfg.fast}
        log(f"[purify] {noise_name}: CA {nrep.ca_after:.3f}  ASR {nrep.asr_after:.3f}  RA {nrep.ra_after:.3f}  "
            f"(ASR {'+' if nrep.asr_after >= report.asr_after else ''}{nrep.asr_after - report.asr_after:.3f} "
            f"vs the purified model; {t_noise:.1f} s)")
    run.write_json(f"purify/{cfg.method}.json", record)
    summary = run.read_summary()
    purified_rows = dict(summary.get("purified", {}))
    if not cfg.noise_finetune_epochs:
        purified_rows.pop(noise_name, None)  # an older fine-tune of an earlier purification no longer applies
    purified_rows.update(entries)
    summary["purified"] = purified_rows
    run.write_json("summary.json", summary)
    return record


# ------------------------------------------------------------------------------------------ report


__all__ = [
    "purify",
    "DEFAULT_NOISE_SIGMA",
    "PurifyConfig",
    "default_clean_fraction",
    "parse_params",
    "purify_run",
]


def purify(run_dir: str | RunDirectory, cfg: PurifyConfig, *, device: str = "auto", progress: bool = True,
           download: bool = False, log: Any = print) -> RunDirectory:
    """``certkit purify``: open the run directory and :func:`purify_run` its undefended model; returns the run."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    purify_run(run, cfg, device=device, progress=progress, download=download, log=log)
    return run
