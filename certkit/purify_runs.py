"""Purify the backdoored model of a run directory, save it (rebuildable), and certify it like any other model.

The library behind ``certkit purify``: :func:`purify_run` loads a single-model run's ``undefended`` model
(trained on the poisoned set without noise) and its data and attack (the run's :class:`TrainConfig` through
:func:`certkit.experiments.prepare`), draws the defender's clean data from the *clean* training set (never
the test split, never a poisoned sample), runs a registered :mod:`purifiers` method, evaluates it before and
after (CA, ASR, RA, DER, runtime) and writes

- ``models/purified-<method>.pt`` (hashed, loaded with ``weights_only=True``): methods that insert layers
  (NPD's polarizer) are saved with a spec that names the base architecture and the structural insertions
  (``"structure"``), so :func:`build_model_from_spec` rebuilds the architecture before the state dict loads;
- ``purify/<method>.json``: the parameters, seeds, the defender's training-set indices, the report;
- with ``noise_finetune_epochs``: ``models/purified-<method>-noise.pt``, the purified model fine-tuned with
  Gaussian noise at ``noise_sigma`` (:func:`certkit.training.noise_finetune`, same clean data) so that it
  is a usable base classifier for test-time smoothing, and its own CA/ASR (does the fine-tune bring the
  backdoor back?).

``summary.json`` gets a ``"purified"`` section (one entry per saved model) that :func:`certkit.experiments.report`
prints; ``certkit certify RUN --model purified-<method> --sigma S`` certifies them with Cohen's CERTIFY.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .records import RunDirectory

PURIFIED_PREFIX = "purified-"
NOISE_SUFFIX = "-noise"
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
    import purifiers

    frac = float(purifiers.available()[method]["clean_fraction"])
    if frac * n_train < MIN_PER_CLASS * num_classes:
        frac = max(frac, SMALL_DATA_FRACTION)
    return frac


def draw_clean_indices(n_train: int, excluded: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(fraction * n_train)`` training samples drawn (seeded) among those not in
    ``excluded`` (the poisoned and WaNet-noised samples)."""
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
            and math.isfinite(fraction) and 0 < fraction <= 1):
        raise InputError(f"--clean-fraction must lie in (0, 1], got {fraction!r}")
    eligible = np.setdiff1d(np.arange(n_train), np.asarray(excluded, dtype=np.int64))
    k = int(round(fraction * n_train))
    if k < 1:
        raise InputError(f"clean fraction {fraction:g} of {n_train} training samples is empty")
    if k > len(eligible):
        raise InputError(f"clean fraction {fraction:g} asks for {k} samples but only {len(eligible)} training "
                         "samples are unpoisoned")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(eligible, size=k, replace=False)).astype(np.int64)


# ------------------------------------------------------------------------------------------ structure
def _base_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {"name": spec["name"], "kwargs": spec["kwargs"]}


def _apply_structure(model: nn.Module, ops: Sequence[dict[str, Any]]) -> nn.Module:
    """Apply recorded structural insertions to a freshly built base model (in place; returns it)."""
    from purifiers.npd import NeuralPolarizer, Polarized

    if not isinstance(ops, (list, tuple)):
        raise InputError(f"model spec 'structure' must be a list, got {type(ops).__name__}")
    for op in ops:
        kind = op.get("op") if isinstance(op, dict) else None
        if kind != "neural-polarizer":
            raise InputError(f"unknown structural operation {op!r} in model spec (known: 'neural-polarizer')")
        path, channels = op.get("path"), op.get("channels")
        try:
            layer = model.get_submodule(path)
        except (AttributeError, TypeError) as exc:
            raise InputError(f"model spec inserts a polarizer at {path!r}, which the base model lacks") from exc
        if not isinstance(layer, nn.Conv2d) or layer.in_channels != channels:
            raise InputError(f"model spec inserts a {channels}-channel polarizer in front of {path!r}, which is "
                             f"{type(layer).__name__} (not a Conv2d with {channels} input channels)")
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, Polarized(NeuralPolarizer(channels), layer))
    return model


def build_model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model (fresh weights) from a saved spec: :func:`certkit.models.model_from_spec` for a plain
    spec; for a purified model's spec ``{"name", "kwargs", "structure": [...]}`` the base architecture with
    the recorded insertions applied. The result carries ``certkit_spec`` (the base spec)."""
    from .models import model_from_spec

    if not isinstance(spec, dict) or "structure" not in spec:
        return model_from_spec(spec)
    base = _base_spec(spec)
    model = _apply_structure(model_from_spec(base), spec["structure"])
    model.certkit_spec = base
    return model


def _bake_pruning(model: nn.Module) -> nn.Module:
    """Fold ``torch.nn.utils.prune`` reparametrisations (``weight_orig`` * ``weight_mask``) into plain weights
    (same function, plain state dict)."""
    from torch.nn.utils import prune

    if not prune.is_pruned(model):
        return model
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def purified_spec(model: nn.Module, base_spec: dict[str, Any]) -> dict[str, Any]:
    """The spec to save a purified ``model`` under: ``base_spec`` when the architecture is unchanged, else
    ``base_spec`` plus ``"structure"`` (inserted polarizers, found by type). Raises :class:`InputError` when
    the rebuilt architecture would not hold the model's state dict (an insertion certkit cannot describe)."""
    from purifiers.npd import Polarized

    from .models import model_from_spec

    base_spec = _base_spec(base_spec)
    ops = [{"op": "neural-polarizer", "path": name, "channels": int(m.polarizer.conv.in_channels)}
           for name, m in model.named_modules() if isinstance(m, Polarized)]
    spec = dict(base_spec, structure=ops) if ops else base_spec
    rebuilt = build_model_from_spec(spec) if ops else model_from_spec(base_spec)
    want, have = _shapes(model), _shapes(rebuilt)
    if want != have:
        extra = sorted(set(want) - set(have))[:3]
        missing = sorted(set(have) - set(want))[:3]
        odd = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:3]
        raise InputError("the purified model's architecture cannot be rebuilt from its base spec "
                         f"(extra {extra}, missing {missing}, reshaped {odd}); it cannot be saved in a run")
    return spec


def load_run_model(run: RunDirectory, name: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """``run.load_model(name)`` that also rebuilds purified architectures (hash-checked, ``weights_only``)."""
    return run.load_model(name, builder=build_model_from_spec, device=device)


# ------------------------------------------------------------------------------------------ the run step
@dataclass
class PurifyConfig:
    """What ``certkit purify`` does to a run."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    clean_fraction: float | None = None  # None: default_clean_fraction
    fast: bool = False  # merge the method's fast_params (tiny budget, smoke runs) under params
    noise_finetune_epochs: int = 0  # 0: no noise fine-tune
    noise_sigma: float = DEFAULT_NOISE_SIGMA
    noise_lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        import purifiers

        from ._validation import check_positive_int

        names = purifiers.available()
        if self.method not in names:
            from .errors import UnknownNameError

            raise UnknownNameError(f"unknown purification method {self.method!r}; available: {', '.join(names)}")
        if not isinstance(self.params, dict):
            raise InputError(f"params must be a dict, got {type(self.params).__name__}")
        reserved = sorted({"device", "progress"} & set(self.params))
        if reserved:
            raise InputError(f"pass {', '.join(reserved)} with --device / --no-progress, not --param")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"--seed must be a non-negative integer, got {self.seed!r}")
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
        import purifiers

        return {**(purifiers.fast_params(self.method) if self.fast else {}), **self.params}


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in params.items()}


def purify_run(run: RunDirectory, cfg: PurifyConfig, *, device: str = "auto", progress: bool = True,
               download: bool = False, log: Any = print) -> dict[str, Any]:
    """Purify the run's ``undefended`` model with ``cfg.method``; save, evaluate and record it (see the
    module docstring). Returns the record written to ``purify/<method>.json``."""
    import purifiers
    from purifiers._common import split_validation

    from .experiments import RUN_KIND, TrainConfig, _read_summary, prepare

    if run.kind != RUN_KIND:
        raise InputError(f"run {run.path} is a {run.kind!r} run; purify works on single-model runs "
                         "(`certkit train` / `certkit demo`)")
    train_cfg = TrainConfig.from_dict(run.config["train"])
    if not run.has_model("undefended"):
        raise InputError(f"run {run.path} has no verified 'undefended' model (trained without noise): train it "
                         "with `certkit train --noise-sigmas 0 ...`")
    exp = prepare(train_cfg, download=download)
    model = load_run_model(run, "undefended", device="cpu")
    purifier = purifiers.make(cfg.method, **cfg.purifier_params(), device=device, progress=progress)
    tags = type(purifier).tags
    train = exp.splits.train
    fraction = (default_clean_fraction(cfg.method, len(train), exp.splits.num_classes)
                if cfg.clean_fraction is None else cfg.clean_fraction)
    excluded = np.union1d(exp.poisoned.poison_indices, exp.poisoned.noise_indices)
    idx = draw_clean_indices(len(train), excluded, fraction, cfg.seed)
    clean = train.subset(idx)
    fit, validation = clean, None
    if tags.uses_validation:
        fit, validation = split_validation(clean, type(purifier).validation_fraction, cfg.seed)
    log(f"[purify] {cfg.method}: {len(fit)} clean training images"
        + (f" + {len(validation)} validation" if validation is not None else "")
        + f" ({fraction:.0%} of the training set, none poisoned)")
    t0 = time.perf_counter()
    purified = purifier.purify(model, fit, validation=validation, seed=cfg.seed)
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
    }
    entries = {cfg.model_name: {"method": cfg.method, "noise_sigma": None, **report.to_dict()}}
    noise_name = cfg.model_name + NOISE_SUFFIX
    if cfg.noise_finetune_epochs:
        from .training import noise_finetune

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
        entries[noise_name] = {"method": cfg.method, "noise_sigma": cfg.noise_sigma, **nrep.to_dict()}
        log(f"[purify] {noise_name}: CA {nrep.ca_after:.3f}  ASR {nrep.asr_after:.3f}  RA {nrep.ra_after:.3f}  "
            f"(ASR {'+' if nrep.asr_after >= report.asr_after else ''}{nrep.asr_after - report.asr_after:.3f} "
            f"vs the purified model; {t_noise:.1f} s)")
    run.write_json(f"purify/{cfg.method}.json", record)
    summary = _read_summary(run)
    purified_rows = dict(summary.get("purified", {}))
    if not cfg.noise_finetune_epochs:
        purified_rows.pop(noise_name, None)  # an older fine-tune of an earlier purification no longer applies
    purified_rows.update(entries)
    summary["purified"] = purified_rows
    run.write_json("summary.json", summary)
    return record


def purified_noise_sigmas(run: RunDirectory) -> dict[str, float]:
    """Noise-fine-tuned purified models of the run and their fine-tune sigma (the default smoothing sigma)."""
    from .experiments import _read_summary

    rows = _read_summary(run).get("purified", {})
    return {name: float(r["noise_sigma"]) for name, r in rows.items()
            if r.get("noise_sigma") and name in run.manifest["models"]}


# ------------------------------------------------------------------------------------------ report
def purified_table(summary: dict[str, Any]) -> str:
    """Text table of the ``"purified"`` section of a run's summary (empty string when there is none)."""
    rows = summary.get("purified", {})
    if not rows:
        return ""
    lines = [f"{'purified model':<26}{'noise':>7}{'CA':>13}{'ASR':>13}{'RA':>13}{'DER':>7}{'time':>8}"]
    for name, r in rows.items():
        ns = r.get("noise_sigma")
        lines.append(f"{name:<26}{(f'{ns:g}' if ns else '-'):>7}"
                     f"{r['ca_before']:>6.3f}->{r['ca_after']:.3f}{r['asr_before']:>6.3f}->{r['asr_after']:.3f}"
                     f"{r['ra_before']:>6.3f}->{r['ra_after']:.3f}{r['der']:>7.3f}"
                     f"{(r.get('runtime_s') or float('nan')):>7.1f}s")
    lines.append("before -> after purification (before = the undefended backdoored model); noise: sigma of the "
                 "Gaussian noise fine-tune; time: purification (or fine-tune) seconds.")
    return "\n".join(lines)


def write_purified_plot(run: RunDirectory, results: Sequence[tuple[str, Any]], trigger_norm: float | None = None):
    """``plots/purified_certified_accuracy.png``: certified accuracy (clean test set, test-time smoothing) of
    the purified models, without (left) and with (right) the Gaussian noise fine-tune. ``results`` holds
    ``(model name, CertificationResult)`` pairs; returns the path, or None when no purified model is among them."""
    from .plots import _pyplot, plot_certified_accuracy, save_figure

    plain = [r for name, r in results if name.startswith(PURIFIED_PREFIX) and not name.endswith(NOISE_SUFFIX)]
    noisy = [r for name, r in results if name.startswith(PURIFIED_PREFIX) and name.endswith(NOISE_SUFFIX)]
    if not plain and not noisy:
        return None
    plt = _pyplot()
    _, axes = plt.subplots(1, 2, figsize=(11, 4))
    top = max([float(r.radius.max(initial=0.0)) for r in plain + noisy] + [trigger_norm or 0.0]) * 1.05 or 1.0
    markers = [trigger_norm] if trigger_norm is not None and math.isfinite(trigger_norm) else None
    for ax, group, title in ((axes[0], plain, "purified"), (axes[1], noisy, "purified + noise fine-tune")):
        if group:
            plot_certified_accuracy(group, ax=ax, max_radius=top, markers=markers,
                                    marker_label="trigger l2 norm (median)", title=title)
        else:
            ax.set_title(f"{title}: not certified")
            ax.set_axis_off()
    return save_figure(axes[0], run.file("plots/purified_certified_accuracy.png"))


__all__ = [
    "DEFAULT_NOISE_SIGMA",
    "PurifyConfig",
    "build_model_from_spec",
    "default_clean_fraction",
    "draw_clean_indices",
    "load_run_model",
    "parse_params",
    "purified_noise_sigmas",
    "purified_spec",
    "purified_table",
    "purify_run",
    "write_purified_plot",
]
