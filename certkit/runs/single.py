"""End-to-end experiments on a run directory: train (possibly backdoored) models, certify them with
test-time smoothing, and report. The CLI (``certkit train | certify | report | demo``) is a thin layer
over these functions.

A *single-model run* (``kind="single"``) holds, for one dataset and one attack, one model per training
noise level: ``undefended`` (trained without noise) and ``noise-<sigma>`` (trained with Gaussian noise
augmentation at ``sigma``, the base model Cohen et al. smooth at that sigma). Each model is certified on
the clean test set and on the triggered non-target test inputs. Every step is resumable: a model whose
checkpoint verifies is not retrained, a certificate file whose settings match is not recomputed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from certkit._validation import (
    check_alpha,
    check_choice,
    check_float,
    check_indices,
    check_positive_int,
    check_seed,
)
from certkit.backdoor.metrics import empirical_metrics
from certkit.backdoor.models import MODELS, build_model
from certkit.backdoor.prepare import DATA_FIELDS, PreparedData, check_data_fields, prepare_data
from certkit.backdoor.training import train_model
from certkit.certify.metrics import (
    certified_trigger_robustness,
    certified_triggered_accuracy,
    simultaneous_asr_bound,
)
from certkit.certify.patch import KINDS as ABLATIONS
from certkit.certify.patch import derandomized_certify
from certkit.certify.results import CertificationResult
from certkit.certify.sigma import SigmaResult, optimize_sigma
from certkit.certify.smoothing import RandomizedSmoothing
from certkit.certify.storage import StorageCertifier
from certkit.devices import resolve_device
from certkit.errors import InputError, RecordError
from certkit.io import read_indices, sha256_bytes
from certkit.progress import batches as progress_batches
from certkit.runs.budget import announce, seconds_per_input
from certkit.runs.defaults import CERTIFY, TRAIN, TRAINING_DEFENSES
from certkit.runs.fct import (
    check_fct_st_params,
    check_fct_st_size,
    fct_st_settings,
    fct_st_work,
    save_split,
    split_line,
    train_fct_st,
)
from certkit.runs.models import (
    ablated_model_name,
    build_ablated_model,
    build_model_from_spec,
    purified_noise_sigmas,
    train_ablated_model,
)
from certkit.runs.plots import plot_certified_rows
from certkit.runs.rundir import RunDirectory

RUN_KIND = "single"
SIGMA_MODES = ("fixed", "sample-specific")
DEFAULT_RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def model_name_for(sigma: float) -> str:
    """Name of the model trained at noise level ``sigma`` (``undefended`` for 0)."""
    return "undefended" if sigma == 0 else f"noise-{sigma:g}"


@dataclass
class TrainConfig:
    """Everything that defines the trained models of a single-model run (stored in the manifest)."""

    dataset: str = TRAIN["dataset"]
    model: str = TRAIN["model"]
    attack: str = TRAIN["attack"]
    attack_params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = TRAIN["poison_rate"]
    target: int = TRAIN["target"]
    epochs: int = TRAIN["epochs"]
    lr: float = TRAIN["lr"]
    batch_size: int = TRAIN["batch_size"]
    noise_sigmas: tuple[float, ...] = TRAIN["noise_sigmas"]
    seed: int = TRAIN["seed"]
    data_root: str | None = None
    #: de-randomized smoothing (Mode C): also train a ``2C``-channel model with one random band ("column")
    #: or block ("block") of side ``band`` kept per batch (``None``: no such model)
    ablation: str | None = None
    band: int | None = None
    #: a training-time defense: also train a model of that name from the poisoned data by the defended
    #: procedure (``"fct-st"``: FCT's D-ST, :mod:`certkit.runs.fct`); ``None``: none
    defense: str | None = None
    #: the defense's settings (``fct-st``: ``{"sd": ..., "st": ...}``); :func:`train` stores them resolved over
    #: the digits-scale or official defaults (:func:`certkit.runs.fct.fct_st_settings`) when it creates the run
    defense_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ablation is not None:
            check_choice(self.ablation, ABLATIONS, "ablation")
            self.band = check_positive_int(self.band, "band") if self.band is not None else None
            if self.band is None:
                raise InputError("--ablation needs --band B (the width of the kept band or block, in pixels)")
        elif self.band is not None:
            raise InputError("--band applies to --ablation column|block only")
        for k, v in check_data_fields(**{k: getattr(self, k) for k in DATA_FIELDS}).items():
            setattr(self, k, v)
        check_choice(self.model, MODELS, "model")
        if self.defense is not None:
            check_choice(self.defense, TRAINING_DEFENSES, "defense")
            self.defense_params = check_fct_st_params(self.defense_params)
        elif self.defense_params:
            raise InputError("--defense-params applies to --defense " + " | ".join(TRAINING_DEFENSES))
        self.epochs = check_positive_int(self.epochs, "epochs")
        self.lr = check_float(self.lr, "lr", strict=True)
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        self.noise_sigmas = tuple(check_float(s, "noise sigma") for s in self.noise_sigmas)
        if any(not math.isfinite(s) or s < 0 for s in self.noise_sigmas):
            raise InputError(f"noise sigmas must be finite and >= 0, got {self.noise_sigmas}")
        if len(set(self.noise_sigmas)) != len(self.noise_sigmas):
            raise InputError(f"noise sigmas must be distinct, got {self.noise_sigmas}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise_sigmas"] = list(self.noise_sigmas)
        if self.ablation is None:  # runs without it keep the config (and manifest) of earlier versions
            del d["ablation"], d["band"]
        if self.defense is None:
            del d["defense"], d["defense_params"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**d)


def train_run(run: RunDirectory, *, device: str = "auto", progress: bool = True, download: bool = False,
              log: Any = print) -> dict[str, dict[str, Any]]:
    """Train every model of the run that is not already saved; return their empirical metrics.

    The metrics (CA, ASR, RA) are also written to ``summary.json`` under ``"empirical"``.
    """

    cfg = TrainConfig.from_dict(run.config["train"])
    exp = prepare_data(cfg, download=download)
    for key, sha in exp.data_hashes.items():
        run.record_data_hash(key, sha)
    run.record_seed("train", cfg.seed)
    results: dict[str, dict[str, Any]] = {}
    _announce_training(run, cfg, exp, device, log)
    for sigma in cfg.noise_sigmas:
        name = model_name_for(sigma)
        if run.has_model(name):
            model = run.load_model(name)
            log(f"[train] {name}: checkpoint verified, not retrained")
        else:
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model, num_classes=exp.splits.num_classes, input_shape=exp.splits.input_shape,
                                mean=exp.splits.mean, std=exp.splits.std)
            t0 = time.perf_counter()
            history = train_model(model, exp.poisoned.dataset, epochs=cfg.epochs, lr=cfg.lr,
                                  batch_size=cfg.batch_size, noise_sigma=sigma, seed=cfg.seed, device=device,
                                  progress=progress, desc=f"train {name}")
            run.save_model(name, model, model.certkit_spec, step=f"train/{name}", seconds=time.perf_counter() - t0,
                           final_loss=history.loss[-1] if history.loss else None)
        m = empirical_metrics(model, exp.splits.test.x, exp.splits.test.y, exp.triggered, device=device)
        results[name] = {"noise_sigma": sigma, **m.to_dict()}
        log(f"[train] {name}: CA {m.clean_accuracy:.3f}  ASR {m.attack_success_rate:.3f}  RA {m.robust_accuracy:.3f}")
    if cfg.ablation is not None:
        results.update(_train_ablated(run, cfg, exp, device=device, progress=progress, log=log))
    summary = run.read_summary()
    if cfg.defense is not None:
        results.update(_train_defense(run, cfg, exp, summary.get("empirical", {}), device=device,
                                      progress=progress, log=log))
    summary["empirical"] = results
    summary["attack"] = {**exp.attack.config(), "target": cfg.target, "poison_rate": cfg.poison_rate,
                         "n_poisoned": int(len(exp.poisoned.poison_indices)),
                         "trigger_norm_mean": float(exp.triggered.trigger_norms.double().mean())
                         if len(exp.triggered.trigger_norms) else None}
    summary["dataset"] = {"name": exp.splits.name, "n_train": len(exp.splits.train), "n_test": len(exp.splits.test),
                          "num_classes": exp.splits.num_classes, "input_shape": list(exp.splits.input_shape)}
    run.write_json("summary.json", summary)
    return results


@dataclass
class CertifyConfig:
    """Settings of test-time smoothing for a run's models."""

    pairs: tuple[tuple[str, float], ...]  # (model name, sigma)
    n0: int = CERTIFY["n0"]
    n: int = CERTIFY["n"]
    alpha: float = CERTIFY["alpha"]
    seed: int = CERTIFY["seed"]
    batch_size: int = CERTIFY["batch_size"]
    max_points: int | None = None
    #: certify only these test-set indices (a sequence, or a .npy / text file read by certkit.io.read_indices);
    #: stored sorted; not with max_points; their range is checked against the test set in certify_run
    ids: tuple[int, ...] | None = None
    radii: tuple[float, ...] = DEFAULT_RADII
    dataset: str | None = None  # certify on another dataset than the run's (same shape and classes)
    data_root: str | None = None
    sigma_modes: tuple[str, ...] = CERTIFY["sigma_modes"]
    sigma_steps: int = CERTIFY["sigma_steps"]
    sigma_lr: float = CERTIFY["sigma_lr"]

    def __post_init__(self) -> None:
        self.n0 = check_positive_int(self.n0, "n0")
        self.n = check_positive_int(self.n, "n")
        self.alpha = check_alpha(self.alpha)
        self.seed = check_seed(self.seed)
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        if self.max_points is not None:
            self.max_points = check_positive_int(self.max_points, "max_points")
        if self.ids is not None:
            if self.max_points is not None:
                raise InputError("ids and max_points cannot be combined: give the test points to certify, or how "
                                 "many to draw")
            ids = read_indices(self.ids) if isinstance(self.ids, (str, os.PathLike)) else self.ids
            self.ids = tuple(int(i) for i in check_indices(ids, "ids"))
        self.sigma_modes = tuple(self.sigma_modes)
        if not self.sigma_modes:
            raise InputError("sigma_modes must name at least one of " + ", ".join(SIGMA_MODES))
        for m in self.sigma_modes:
            check_choice(m, SIGMA_MODES, "sigma mode")
        self.sigma_steps = check_positive_int(self.sigma_steps, "sigma_steps")
        self.sigma_lr = check_float(self.sigma_lr, "sigma_lr", strict=True)
        self.pairs = tuple((str(m), check_float(sg, f"sigma of model {m!r}", strict=True)) for m, sg in self.pairs)
        if not self.pairs:
            raise InputError("nothing to certify: give at least one (model, sigma) pair")


def _check_compatible(spec: dict[str, Any], splits: Any, model_name: str) -> None:
    """Refuse to certify a model on data of another shape or number of classes."""
    kw = spec.get("kwargs", {})
    want = (kw.get("num_classes"), tuple(kw.get("input_shape", ())))
    have = (splits.num_classes, tuple(splits.input_shape))
    if want != have:
        raise InputError(f"model {model_name!r} expects {want[0]} classes and inputs {want[1]}, but dataset "
                         f"{splits.name!r} has {have[0]} classes and inputs {have[1]}")


def _ids_setting(ids: tuple[int, ...] | None) -> dict[str, Any]:
    """The recorded setting of ``CertifyConfig.ids`` (absent without ids, so earlier certificates are reused)."""
    if ids is None:
        return {}
    return {"ids_sha256": sha256_bytes(np.asarray(ids, dtype=np.int64).tobytes()), "n_ids": len(ids)}


def _cert_file(model: str, sigma: float, which: str) -> str:
    return f"certificates/{model}__sigma-{sigma:g}__{which}.csv"


def _load_or_certify(run: RunDirectory, key: str, settings: dict[str, Any], compute: Any) -> CertificationResult:
    """Reuse ``key`` (a CSV in the run) when its stored settings match, else compute and store it."""
    meta_key = key.replace(".csv", ".json")
    try:
        stored = run.read_json(meta_key)
        if stored.get("settings") == json.loads(json.dumps(settings)):
            frame = run.read_frame(key)
            return CertificationResult.from_frame(frame, meta=stored.get("meta", {}))
    except (RecordError, FileNotFoundError, OSError, KeyError, ValueError):
        pass
    result: CertificationResult = compute()
    run.write_frame(key, result.to_frame())
    run.write_json(meta_key, {"settings": settings, "meta": result.meta})
    return result


def certify_run(run: RunDirectory, cfg: CertifyConfig, *, device: str = "auto", progress: bool = True,
                download: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Certify each (model, sigma) of ``cfg`` on the clean and the triggered test sets, in each sigma mode.

    ``fixed``: Cohen CERTIFY at ``sigma``. ``sample-specific`` (Cert-SSB / DDRS): per-point sigmas from
    :func:`certkit.optimize_sigma` started at ``sigma``, each optimised on the input itself: a triggered input
    gets the sigma the procedure finds at ``x + t``, never its clean twin's (a deployed system only ever sees
    ``x + t``; Cert-SSB's released evaluation borrows the clean sigma, which is not deployable). CERTIFY with
    each point's own sigma (the sigma that samples the noise is the one in the radius), then
    :class:`certkit.StorageCertifier`, whose store is part of the certified classifier (inside a stored ball
    it answers the stored label). Storage certificates are *transductive and order-dependent*: the clean
    test set is processed in test order (its store: ``stores/*.npz``); the triggered queries are processed
    as they would arrive in deployment, in test order before (without) any clean twin (their store:
    ``stores/*__triggered-first.npz``), and the certified trigger robustness of this mode is the fraction of
    non-target triggered queries certified to get their true label from that deployed classifier. The
    clean-first figure (clean twin certified beyond the trigger norm with the clean store) is kept as a
    labelled diagnostic only.

    Writes ``certificates/*.csv``, ``points.csv`` (every row, with ``model``, ``sigma_mode`` and ``set``
    columns), ``summary.json`` (``"certified"`` rows) and ``plots/certified_accuracy.png``.
    """

    train_cfg = TrainConfig.from_dict(run.config["train"])
    if cfg.dataset is not None:
        train_cfg = replace(train_cfg, dataset=cfg.dataset, data_root=cfg.data_root)
    exp = prepare_data(train_cfg, download=download)
    test, trig = exp.splits.test, exp.triggered
    if cfg.max_points is not None:  # a fixed-seed subsample of the test set, the same for every model
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.permutation(len(test))[: cfg.max_points])
        keep_trig = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    elif cfg.ids is not None:  # the given test points, in test order
        keep = check_indices(cfg.ids, "ids", n=len(test))
        keep_trig = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    else:
        keep, keep_trig = np.arange(len(test)), np.arange(len(trig.x))
    trig_ids = np.asarray(trig.indices)[keep_trig] + len(test)  # a triggered query's own id (noise, sigma)
    for model_name, _ in cfg.pairs:  # every model fits the data before any work
        _check_compatible(run.model_spec(model_name), exp.splits, model_name)
    _announce_certify(run, cfg, exp.splits.input_shape, len(keep) + len(keep_trig), device, log)
    rows: list[dict[str, Any]] = []
    frames: list[pd.DataFrame] = []
    for model_name, sigma in cfg.pairs:
        model = run.load_model(model_name, builder=build_model_from_spec, device="cpu")
        _check_compatible(run.model_spec(model_name), exp.splits, model_name)
        base = {"model": model_name, "model_sha256": run.manifest["models"][model_name]["sha256"],
                "sigma": sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed,
                "max_points": cfg.max_points, "dataset": train_cfg.dataset, "test_sha256": test.sha256(),
                **_ids_setting(cfg.ids)}
        for mode in cfg.sigma_modes:
            t0 = time.perf_counter()
            tag = "" if mode == "fixed" else "__ssb"
            label = f"{model_name}, sigma={sigma:g}" + ("" if mode == "fixed" else " (sample-specific)")
            settings = dict(base, sigma_mode=mode)
            if mode == "fixed":
                clean_sigma: Any = sigma
                trig_sigma: Any = sigma
            else:
                settings.update(sigma_steps=cfg.sigma_steps, sigma_lr=cfg.sigma_lr)
                clean_sigma = torch.as_tensor(_sample_specific_sigmas(
                    run, model, model_name, sigma, test.x[keep], keep, "clean", settings, cfg, device, progress))
                trig_sigma = torch.as_tensor(_sample_specific_sigmas(
                    run, model, model_name, sigma, trig.x[keep_trig], trig_ids, "triggered", settings, cfg, device,
                    progress))
            clean = _load_or_certify(
                run, _cert_file(model_name + tag, sigma, "clean"), {**settings, "set": "clean"},
                partial(RandomizedSmoothing(model, exp.splits.num_classes, clean_sigma, batch_size=cfg.batch_size,
                                            device=device, seed=cfg.seed, progress=progress).certify,
                        test.x[keep], test.y[keep], n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, ids=torch.as_tensor(keep),
                        trigger_norm=exp.test_trigger_norms[keep], name=label))
            triggered = _load_or_certify(
                run, _cert_file(model_name + tag, sigma, "triggered"), {**settings, "set": "triggered"},
                partial(RandomizedSmoothing(model, exp.splits.num_classes, trig_sigma, batch_size=cfg.batch_size,
                                            device=device, seed=cfg.seed, progress=progress).certify,
                        trig.x[keep_trig], trig.y_true[keep_trig], n0=cfg.n0, n=cfg.n, alpha=cfg.alpha,
                        ids=torch.as_tensor(trig_ids), triggered=True,
                        trigger_norm=trig.trigger_norms[keep_trig], name=label))
            storage: dict[str, Any] | None = None
            if mode == "sample-specific":
                clean, triggered, storage = _storage_update(run, model_name, sigma, test.x[keep], clean,
                                                            trig.x[keep_trig], triggered, train_cfg.target)
            run.record_timing(f"certify/{model_name}/sigma-{sigma:g}/{mode}", time.perf_counter() - t0)
            clean.meta["name"] = label
            rows.append(_summary_row(model_name, sigma, mode, clean, triggered, train_cfg.target, cfg, storage))
            r = rows[-1]
            log(f"[certify] {label}: certified acc@0 {r['smoothed_clean_accuracy']:.3f}  ACR {r['acr']:.3f}  "
                f"CTR {r['certified_trigger_robustness']:.3f}  smoothed ASR {r['smoothed_asr']:.3f}"
                + (f"  store: {storage['counts']}" if storage else ""))
            for res, which in ((clean, "clean"), (triggered, "triggered")):
                f = res.to_frame()
                f.insert(0, "set", which)
                f.insert(0, "base_sigma", sigma)
                f.insert(0, "sigma_mode", mode)
                f.insert(0, "model", model_name)
                frames.append(f)
    # add to what earlier certify calls wrote: a (model, sigma, sigma mode) certified again replaces its rows
    summary = run.read_summary()
    redone = {_row_key(r) for r in rows}
    kept = [r for r in summary.get("certified", []) if _row_key(r) not in redone]
    summary["certified"] = kept + rows
    if frames:
        new = pd.concat(frames, ignore_index=True)
        if kept and "points.csv" in run.manifest["files"]:
            old = run.read_frame("points.csv")
            keys = list(zip(old["model"], old["base_sigma"].astype(float), old["sigma_mode"]))
            old = old[[k not in redone for k in keys]]
            new = pd.concat([old, new], ignore_index=True)
        run.write_frame("points.csv", new)
    summary["certify_settings"] = {"n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed,
                                   "max_points": cfg.max_points, "radii": list(cfg.radii),
                                   "sigma_modes": list(cfg.sigma_modes),
                                   **({} if cfg.ids is None else {"ids": list(cfg.ids)})}
    run.write_json("summary.json", summary)
    if summary["certified"]:
        plot_certified_rows(run, summary["certified"], run.read_frame("points.csv"))
    return rows


def _announce_training(run: RunDirectory, cfg: TrainConfig, exp: PreparedData, device: str, log: Any) -> None:
    """The budget lines of :func:`train_run`: epochs x batches per model still to train, timed on one training
    step (forward and backward) of a fresh model, and the training-time defense's inputs (nothing is logged when
    every model is saved)."""
    names = [model_name_for(s) for s in cfg.noise_sigmas]
    if cfg.ablation is not None:
        names.append(ablated_model_name(cfg.ablation, cfg.band))
    todo = [name for name in names if not run.has_model(name)]
    defense = cfg.defense is not None and not run.has_model(cfg.defense)
    if not todo and not defense:
        return
    steps = progress_batches(len(exp.poisoned.dataset), cfg.batch_size)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model, num_classes=exp.splits.num_classes, input_shape=exp.splits.input_shape,
                            mean=exp.splits.mean, std=exp.splits.std)
    per = seconds_per_input(model, exp.splits.input_shape, batch=cfg.batch_size, device=device, backward=True)
    if todo:
        announce(log, "train", len(todo) * cfg.epochs * steps, "training steps",
                 detail=f"{len(todo)} model(s) x {cfg.epochs} epochs x {steps} batches of {cfg.batch_size}",
                 seconds_per_unit=None if per is None else per * cfg.batch_size, device=resolve_device(device))
    if defense:
        inputs, detail = fct_st_work(len(exp.poisoned.dataset), cfg.defense_params)
        announce(log, f"train {cfg.defense}", inputs, "inputs forward and backward", detail=detail,
                 seconds_per_unit=per, device=resolve_device(device))


def _announce_certify(run: RunDirectory, cfg: CertifyConfig, input_shape: Any, points: int, device: str,
                      log: Any) -> None:
    """The budget line of :func:`certify_run`: (n0 + n) forward passes per point, timed on one batch of noisy
    draws through the first model."""
    model = run.load_model(cfg.pairs[0][0], builder=build_model_from_spec, device="cpu")
    per = seconds_per_input(model, input_shape, batch=min(cfg.batch_size, cfg.n0 + cfg.n), device=device)
    modes = len(cfg.sigma_modes)
    ssb = "sample-specific" in cfg.sigma_modes
    announce(log, "certify", len(cfg.pairs) * modes * points * (cfg.n0 + cfg.n), "forward passes",
             detail=f"{len(cfg.pairs)} (model, sigma) x {modes} sigma mode(s) x {points} points (clean + "
             f"triggered) x (n0 {cfg.n0} + n {cfg.n}) draws", seconds_per_unit=per, device=resolve_device(device),
             note="certificates saved with the same settings are reused"
             + (f"; the sample-specific sigmas add {cfg.sigma_steps} ascent steps per point" if ssb else ""))


def _train_ablated(run: RunDirectory, cfg: TrainConfig, exp: PreparedData, *, device: str, progress: bool,
                   log: Any) -> dict[str, dict[str, Any]]:
    """Train (once) the run's de-randomized smoothing model on the same poisoned data, one seeded random
    band (block) per batch (Levine and Feizi, NeurIPS 2020), and measure its smoothed CA / ASR / RA (the
    predictions of the vote over every ablation, the classifier that patch certificates certify)."""
    name = ablated_model_name(cfg.ablation, cfg.band)
    if run.has_model(name):
        model = run.load_model(name, builder=build_model_from_spec)
        log(f"[train] {name}: checkpoint verified, not retrained")
    else:
        t0 = time.perf_counter()
        model, history = train_ablated_model(cfg.model, exp, cfg.ablation, cfg.band, epochs=cfg.epochs, lr=cfg.lr,
                                             batch_size=cfg.batch_size, seed=cfg.seed, device=device,
                                             progress=progress, desc=f"train {name}")
        run.save_model(name, model, model.certkit_spec, step=f"train/{name}", seconds=time.perf_counter() - t0,
                       final_loss=history.loss[-1] if history.loss else None)
    kw = dict(kind=cfg.ablation, band=cfg.band, device=device)
    clean = derandomized_certify(model, exp.splits.test.x, exp.splits.test.y, **kw)
    trig = derandomized_certify(model, exp.triggered.x, exp.triggered.y_true, **kw)
    target = exp.triggered.target
    m = {"noise_sigma": 0.0, "ablation": cfg.ablation, "band": cfg.band, "clean_accuracy": clean.accuracy(),
         "attack_success_rate": float(np.mean(trig.prediction == target)) if len(trig) else float("nan"),
         "robust_accuracy": trig.accuracy(), "n_clean": len(clean), "n_triggered": len(trig), "target": target,
         "prediction": "vote over every ablation (de-randomized smoothing)"}
    log(f"[train] {name}: smoothed CA {m['clean_accuracy']:.3f}  ASR {m['attack_success_rate']:.3f}  "
        f"RA {m['robust_accuracy']:.3f}")
    return {name: m}


def _train_defense(run: RunDirectory, cfg: TrainConfig, exp: PreparedData, previous: dict[str, Any], *,
                   device: str, progress: bool, log: Any) -> dict[str, dict[str, Any]]:
    """Train (once) the run's training-time defense model (FCT's D-ST, Chen, Wu, Wang, NeurIPS 2022) from the
    poisoned data and measure its CA / ASR / RA; its SD split (per-sample scores, thresholds, flags) is stored in
    ``train/<defense>_split.npz`` and its sizes and precision / recall against the true poison indices (a
    diagnostic the method never sees) in the metrics' ``"split"``. A resumed run reuses the stored split."""
    name = cfg.defense
    split_file = f"train/{name}_split.npz"
    stored = (previous.get(name) or {}).get("split")
    saved = run.load_model(name, builder=build_model_from_spec) if run.has_model(name) else None
    if saved is not None and stored is not None and run.has_file(split_file):
        model, record = saved, stored
        log(f"[train] {name}: checkpoint verified, not retrained")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            template = build_model(cfg.model, num_classes=exp.splits.num_classes,
                                   input_shape=exp.splits.input_shape, mean=exp.splits.mean, std=exp.splits.std)
        t0 = time.perf_counter()
        model, split = train_fct_st(template, exp.poisoned.dataset, cfg.defense_params, seed=cfg.seed,
                                    device=device, model=saved, progress=progress)
        record = save_split(run, split_file, split, exp.poisoned.poison_indices)
        log(f"[train] {split_line(name, record)}")
        if saved is None:
            run.save_model(name, model.cpu(), template.certkit_spec, step=f"train/{name}",
                           seconds=time.perf_counter() - t0)
    m = empirical_metrics(model, exp.splits.test.x, exp.splits.test.y, exp.triggered, device=device)
    log(f"[train] {name}: CA {m.clean_accuracy:.3f}  ASR {m.attack_success_rate:.3f}  RA {m.robust_accuracy:.3f}")
    return {name: {"noise_sigma": 0.0, "defense": name, **m.to_dict(), "split": record}}


def _row_key(row: dict[str, Any]) -> tuple[str, float, str]:
    return (row["model"], float(row["sigma"]), row.get("sigma_mode", "fixed"))


#: the level of the whole-test-set statements in summaries and reports (1 - delta)
SIMULTANEOUS_DELTA = 0.05


def _summary_row(model_name: str, sigma: float, mode: str, clean: CertificationResult,
                 triggered: CertificationResult, target: int, cfg: CertifyConfig,
                 storage: dict[str, Any] | None) -> dict[str, Any]:
    """One ``summary.json`` row. ``triggered`` holds the deployed answers on the triggered queries (for the
    sample-specific mode: after the triggered-first storage update)."""
    non_target = clean.label != target
    if storage is None:  # the clean twin certified beyond the trigger's norm (Cohen et al.'s certificate)
        ctr = certified_trigger_robustness(clean, target=target)
        n_ctr = int(non_target.sum())
        ctr_kind = "clean input certified correct with radius > ||t|| at that input"
    else:  # transductive: triggered queries certified to get their true label from the deployed store
        ctr = certified_triggered_accuracy(triggered, target=target)
        n_ctr = int((triggered.label != target).sum())
        ctr_kind = ("triggered query certified to get its true label from the deployed memory classifier "
                    "(transductive, order-dependent; order: " + storage["triggered_order"] + ")")
    deployed = triggered.prediction
    bound = (simultaneous_asr_bound(ctr, n_ctr, cfg.alpha, SIMULTANEOUS_DELTA)
             if n_ctr and not math.isnan(ctr) else None)
    return {
        "model": model_name, "sigma": sigma, "sigma_mode": mode, "n_clean": len(clean),
        "n_triggered": len(triggered), "smoothed_clean_accuracy": clean.accuracy(), "acr": clean.acr(),
        "abstain_rate": clean.abstain_rate(),
        "certified_accuracy": {f"{r:g}": float(a) for r, a in
                               zip(cfg.radii, np.atleast_1d(clean.certified_accuracy(list(cfg.radii))))},
        "certified_trigger_robustness": ctr,
        "certified_trigger_robustness_meaning": ctr_kind,
        "asr_bound": None if bound is None else bound.to_dict(),
        "smoothed_asr": float(np.mean(deployed == target)) if len(triggered) else float("nan"),
        "smoothed_robust_accuracy": float(np.mean(deployed == triggered.label)) if len(triggered) else float("nan"),
        "triggered_abstain_rate": float(np.mean(deployed < 0)) if len(triggered) else float("nan"),
        "sigma_mean": float(np.mean(clean.sigma)) if len(clean) else float("nan"),
        "storage": storage,
        "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed, "batch_size": cfg.batch_size,
        "max_points": cfg.max_points, **({} if cfg.ids is None else {"n_ids": len(cfg.ids)}),
    }


def _sample_specific_sigmas(run: RunDirectory, model: Any, model_name: str, sigma: float, x: torch.Tensor,
                            ids: np.ndarray, which: str, settings: dict[str, Any], cfg: CertifyConfig, device: str,
                            progress: bool) -> np.ndarray:
    """Per-point sigmas by SGA on the inputs ``x`` themselves (point ``ids`` seed the noise, so a point's
    sigma depends on nothing but its own input and id), cached in ``sigmas/`` while the settings match."""
    rel = f"sigmas/{model_name}__sigma-{sigma:g}" + ("" if which == "clean" else f"__{which}") + ".npz"
    meta_rel = rel.replace(".npz", ".json")
    want = json.loads(json.dumps({**{k: settings[k] for k in ("model_sha256", "sigma", "seed", "max_points",
                                                              "test_sha256", "sigma_steps", "sigma_lr")},
                                  **{k: settings[k] for k in ("ids_sha256",) if k in settings},
                                  "set": which, "ids": "own"}))
    try:
        if run.read_json(meta_rel) == want:
            run.read_bytes(rel)  # hash check
            return SigmaResult.load(run.file(rel)).sigma
    except (RecordError, FileNotFoundError, OSError, ValueError):
        pass
    res = optimize_sigma(model, x, base_sigma=sigma, steps=cfg.sigma_steps, lr=cfg.sigma_lr, seed=cfg.seed,
                         device=device, progress=progress, ids=torch.as_tensor(ids))
    res.save(run.file(rel))
    run.record_file(rel)
    run.write_json(meta_rel, want)
    return np.asarray(res.sigma, dtype=np.float64)


def _storage_update(run: RunDirectory, model_name: str, sigma: float, x_clean: torch.Tensor,
                    clean: CertificationResult, x_trig: torch.Tensor, triggered: CertificationResult, target: int
                    ) -> tuple[CertificationResult, CertificationResult, dict[str, Any]]:
    """The memory classifier, evaluated as deployed (see :func:`certify_run`): the clean test set in test
    order, and, separately, the triggered queries in test order before any clean twin. Saves both stores;
    returns the adjusted clean and triggered results and the storage record (orders, counts, diagnostic)."""
    clean_out = StorageCertifier(order="given").certify(x_clean, clean)
    trig_out = StorageCertifier(order="given").certify(x_trig, triggered)
    for out, suffix in ((clean_out, ""), (trig_out, "__triggered-first")):
        rel = f"stores/{model_name}__sigma-{sigma:g}{suffix}.npz"
        out.store.save(run.file(rel))
        run.record_file(rel)
    diagnostic = certified_trigger_robustness(clean_out.result, target=target)
    return clean_out.result, trig_out.result, {
        "kind": "transductive, order-dependent",
        "clean_order": "clean test queries in test-set order",
        "triggered_order": "triggered queries in test-set order, before (without) their clean twins",
        "counts": clean_out.counts(), "triggered_counts": trig_out.counts(),
        "ctr_clean_first_diagnostic": diagnostic,
        "ctr_clean_first_diagnostic_meaning": "clean twin certified beyond ||t|| with the clean queries stored "
                                              "first: not a deployable certificate (the clean twin is never seen "
                                              "before the attack)",
    }


def train(config: TrainConfig, out: str | Path, *, device: str = "auto", progress: bool = True,
          download: bool = False, log: Any = print) -> RunDirectory:
    """``certkit train``: check the whole config against its data first (dataset, target, model), then create
    (or resume) the run directory ``out`` and train every model of ``config`` that it does not hold yet.

    Nothing is written when a check fails, so a rejected command never leaves a half-made run directory.
    """
    resolve_device(device)
    data = prepare_data(config, download=download)
    build_model(config.model, num_classes=data.num_classes, input_shape=data.input_shape,
                mean=data.splits.mean, std=data.splits.std)  # the architecture accepts the data
    if config.ablation is not None:
        build_ablated_model(config.model, data, config.ablation, config.band)  # and the band fits
    if config.defense is not None:  # resolved once, here; the poisoned set is large enough for the SD split
        config = replace(config, defense_params=fct_st_settings(config.defense_params, dataset=config.dataset))
        check_fct_st_size(len(data.poisoned.dataset), config.defense_params)
    run = RunDirectory.create(out, {"train": config.to_dict()}, kind=RUN_KIND)
    train_run(run, device=device, progress=progress, download=download, log=log)
    return run


def resolve_pairs(run: RunDirectory, models: Sequence[str] | None = None,
                  sigmas: Sequence[float] | None = None) -> tuple[tuple[str, float], ...]:
    """The (model, sigma) pairs to certify: the given ``models`` (default: every noise-trained model) at the
    given ``sigmas`` (default: each model's own training or noise fine-tune sigma)."""
    if run.kind != RUN_KIND:
        raise InputError(f"{run.path} is a {run.kind!r} run; `certkit certify` works on single-model runs "
                         "(use `certkit ensemble certify` for ensembles)")
    cfg = TrainConfig.from_dict(run.config["train"])
    trained = {model_name_for(s): s for s in cfg.noise_sigmas}
    names = list(models) if models else [m for m, s in trained.items() if s > 0]
    for m in names:
        if m not in run.manifest["models"]:
            raise InputError(f"model {m!r} is not in run {run.path}; available: "
                             f"{', '.join(run.manifest['models']) or 'none'}")
    if not names:
        raise InputError("no noise-trained model in this run: pass --model NAME and --sigma S")
    if sigmas:
        return tuple((m, float(s)) for m in names for s in sigmas)
    trained = {**purified_noise_sigmas(run), **trained}  # noise-fine-tuned purified models: their noise sigma
    missing = [m for m in names if trained.get(m, 0) <= 0]
    if missing:
        raise InputError(f"model(s) {', '.join(missing)} were trained without noise: pass --sigma")
    return tuple((m, trained[m]) for m in names)


def certify(run_dir: str | Path | RunDirectory, *, models: Sequence[str] | None = None,
            sigmas: Sequence[float] | None = None, device: str = "auto", progress: bool = True,
            download: bool = False, log: Any = print, **settings: Any) -> RunDirectory:
    """``certkit certify``: certify ``models`` of a run at ``sigmas`` (see :func:`resolve_pairs`) with the
    :class:`CertifyConfig` ``settings`` (unknown names are an error); returns the run directory."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    known = {f for f in CertifyConfig.__dataclass_fields__ if f != "pairs"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown certify setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    cfg = CertifyConfig(pairs=resolve_pairs(run, models, sigmas), **settings)
    certify_run(run, cfg, device=device, progress=progress, download=download, log=log)
    return run
