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
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import InputError, RecordError
from .metrics import certified_trigger_robustness, empirical_metrics
from .records import RunDirectory
from .results import CertificationResult

RUN_KIND = "single"
DEFAULT_RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def model_name_for(sigma: float) -> str:
    """Name of the model trained at noise level ``sigma`` (``undefended`` for 0)."""
    return "undefended" if sigma == 0 else f"noise-{sigma:g}"


@dataclass
class TrainConfig:
    """Everything that defines the trained models of a single-model run (stored in the manifest)."""

    dataset: str = "digits"
    model: str = "digits-cnn"
    attack: str = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = 0.1
    target: int = 0
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    noise_sigmas: tuple[float, ...] = (0.0,)
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        self.noise_sigmas = tuple(float(s) for s in self.noise_sigmas)
        if any(not math.isfinite(s) or s < 0 for s in self.noise_sigmas):
            raise InputError(f"noise sigmas must be finite and >= 0, got {self.noise_sigmas}")
        if len(set(self.noise_sigmas)) != len(self.noise_sigmas):
            raise InputError(f"noise sigmas must be distinct, got {self.noise_sigmas}")
        if not 0.0 <= self.poison_rate < 1.0:
            raise InputError(f"poison_rate must lie in [0, 1), got {self.poison_rate}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["noise_sigmas"] = list(self.noise_sigmas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class Experiment:
    """The data, attack and triggered test set that a run's config determines."""

    config: TrainConfig
    splits: Any
    attack: Any
    poisoned: Any
    triggered: Any
    test_trigger_norms: torch.Tensor


def prepare(config: TrainConfig, *, download: bool = False) -> Experiment:
    """Load the dataset, poison its training set and build the triggered test set (deterministic)."""
    from .attacks import make_attack, triggered_test_set
    from .data import load_dataset

    splits = load_dataset(config.dataset, root=config.data_root, download=download, seed=config.seed)
    if not 0 <= config.target < splits.num_classes:
        raise InputError(f"target class {config.target} is out of range for {splits.num_classes} classes")
    attack = make_attack(config.attack, **config.attack_params)
    poisoned = attack.poison(splits.train, rate=config.poison_rate, target=config.target, seed=config.seed)
    triggered = triggered_test_set(attack, splits.test, config.target)
    norms = attack.trigger_norms(splits.test.x)
    return Experiment(config, splits, attack, poisoned, triggered, norms)


def train_run(run: RunDirectory, *, device: str = "auto", progress: bool = True, download: bool = False,
              log: Any = print) -> dict[str, dict[str, Any]]:
    """Train every model of the run that is not already saved; return their empirical metrics.

    The metrics (CA, ASR, RA) are also written to ``summary.json`` under ``"empirical"``.
    """
    from .models import build_model
    from .training import train_model

    cfg = TrainConfig.from_dict(run.config["train"])
    exp = prepare(cfg, download=download)
    run.record_data_hash("train", exp.splits.train.sha256())
    run.record_data_hash("test", exp.splits.test.sha256())
    run.record_data_hash("poisoned_train", exp.poisoned.dataset.sha256())
    run.record_seed("train", cfg.seed)
    results: dict[str, dict[str, Any]] = {}
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
            run.save_model(name, model, model.certkit_spec)
            run.record_timing(f"train/{name}", time.perf_counter() - t0)
            run.mark_done(f"train/{name}", final_loss=history.loss[-1] if history.loss else None)
        m = empirical_metrics(model, exp.splits.test.x, exp.splits.test.y, exp.triggered, device=device)
        results[name] = {"noise_sigma": sigma, **m.to_dict()}
        log(f"[train] {name}: CA {m.clean_accuracy:.3f}  ASR {m.attack_success_rate:.3f}  RA {m.robust_accuracy:.3f}")
    summary = _read_summary(run)
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
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    seed: int = 0
    batch_size: int = 2000
    max_points: int | None = None
    radii: tuple[float, ...] = DEFAULT_RADII
    dataset: str | None = None  # certify on another dataset than the run's (same shape and classes)
    data_root: str | None = None
    sigma_modes: tuple[str, ...] = ("fixed",)
    sigma_steps: int = 1000
    sigma_lr: float = 1e-4

    def __post_init__(self) -> None:
        from ._validation import check_choice, check_positive_int

        self.sigma_modes = tuple(self.sigma_modes)
        if not self.sigma_modes:
            raise InputError("sigma_modes must name at least one of " + ", ".join(SIGMA_MODES))
        for m in self.sigma_modes:
            check_choice(m, SIGMA_MODES, "sigma mode")
        check_positive_int(self.sigma_steps, "sigma_steps")
        if not (math.isfinite(self.sigma_lr) and self.sigma_lr > 0):
            raise InputError(f"sigma_lr must be a positive finite number, got {self.sigma_lr}")


def _check_compatible(spec: dict[str, Any], splits: Any, model_name: str) -> None:
    """Refuse to certify a model on data of another shape or number of classes."""
    kw = spec.get("kwargs", {})
    want = (kw.get("num_classes"), tuple(kw.get("input_shape", ())))
    have = (splits.num_classes, tuple(splits.input_shape))
    if want != have:
        raise InputError(f"model {model_name!r} expects {want[0]} classes and inputs {want[1]}, but dataset "
                         f"{splits.name!r} has {have[0]} classes and inputs {have[1]}")


def _read_summary(run: RunDirectory) -> dict[str, Any]:
    try:
        return run.read_json("summary.json")
    except (RecordError, FileNotFoundError, OSError):
        return {}


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


SIGMA_MODES = ("fixed", "sample-specific")


def certify_run(run: RunDirectory, cfg: CertifyConfig, *, device: str = "auto", progress: bool = True,
                download: bool = False, log: Any = print) -> list[dict[str, Any]]:
    """Certify each (model, sigma) of ``cfg`` on the clean and the triggered test sets, in each sigma mode.

    ``fixed``: Cohen CERTIFY at ``sigma``. ``sample-specific`` (Cert-SSB / DDRS): per-point sigmas from
    :func:`certkit.optimize_sigma` started at ``sigma`` on the clean test image (reused for its triggered
    copy, as Cert-SSB does), CERTIFY with each point's own sigma (the sigma that samples the noise is the
    one in the radius), then :class:`certkit.StorageCertifier` in the test set's order, whose store
    (``stores/*.npz``) is part of the certified classifier: inside a stored ball it answers the stored label.

    Writes ``certificates/*.csv``, ``points.csv`` (every row, with ``model``, ``sigma_mode`` and ``set``
    columns), ``summary.json`` (``"certified"`` rows) and ``plots/certified_accuracy.png``.
    """
    from .smoothing import RandomizedSmoothing

    train_cfg = TrainConfig.from_dict(run.config["train"])
    if cfg.dataset is not None:
        train_cfg = replace(train_cfg, dataset=cfg.dataset, data_root=cfg.data_root)
    exp = prepare(train_cfg, download=download)
    test, trig = exp.splits.test, exp.triggered
    if cfg.max_points is not None:  # a fixed-seed subsample of the test set, the same for every model
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.permutation(len(test))[: cfg.max_points])
        keep_trig = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    else:
        keep, keep_trig = np.arange(len(test)), np.arange(len(trig.x))
    # position in `keep` of each kept triggered input's clean counterpart (its sample-specific sigma)
    clean_pos = np.searchsorted(keep, np.asarray(trig.indices)[keep_trig])
    rows: list[dict[str, Any]] = []
    frames: list[pd.DataFrame] = []
    clean_results: list[CertificationResult] = []
    named_results: list[tuple[str, CertificationResult]] = []
    for model_name, sigma in cfg.pairs:
        model = run.load_model(model_name, builder=_build_saved_model, device="cpu")
        _check_compatible(run.model_spec(model_name), exp.splits, model_name)
        base = {"model": model_name, "model_sha256": run.manifest["models"][model_name]["sha256"],
                "sigma": sigma, "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed,
                "max_points": cfg.max_points, "dataset": train_cfg.dataset, "test_sha256": test.sha256()}
        for mode in cfg.sigma_modes:
            t0 = time.perf_counter()
            tag = "" if mode == "fixed" else "__ssb"
            label = f"{model_name}, sigma={sigma:g}" + ("" if mode == "fixed" else " (sample-specific)")
            settings = dict(base, sigma_mode=mode)
            storage_counts: dict[str, int] | None = None
            if mode == "fixed":
                clean_sigma: Any = sigma
                trig_sigma: Any = sigma
            else:
                settings.update(sigma_steps=cfg.sigma_steps, sigma_lr=cfg.sigma_lr)
                sig = _sample_specific_sigmas(run, model, model_name, sigma, test.x[keep], settings, cfg, device,
                                              progress)
                clean_sigma, trig_sigma = torch.as_tensor(sig), torch.as_tensor(sig[clean_pos])
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
                        ids=torch.as_tensor(np.asarray(trig.indices)[keep_trig]) + len(test), triggered=True,
                        trigger_norm=trig.trigger_norms[keep_trig], name=label))
            deployed_trig = triggered.prediction
            if mode == "sample-specific":
                clean, storage_counts, deployed_trig = _storage_update(run, model_name, sigma, test.x[keep], clean,
                                                                       trig.x[keep_trig], triggered)
            run.record_timing(f"certify/{model_name}/sigma-{sigma:g}/{mode}", time.perf_counter() - t0)
            clean.meta["name"] = label
            clean_results.append(clean)
            if mode == "fixed":
                named_results.append((model_name, clean))
            rows.append(_summary_row(model_name, sigma, mode, clean, triggered, deployed_trig, train_cfg.target,
                                     cfg, storage_counts))
            r = rows[-1]
            log(f"[certify] {label}: certified acc@0 {r['smoothed_clean_accuracy']:.3f}  ACR {r['acr']:.3f}  "
                f"CTR {r['certified_trigger_robustness']:.3f}  smoothed ASR {r['smoothed_asr']:.3f}"
                + (f"  store: {storage_counts}" if storage_counts else ""))
            for res, which in ((clean, "clean"), (triggered, "triggered")):
                f = res.to_frame()
                f.insert(0, "set", which)
                f.insert(0, "base_sigma", sigma)
                f.insert(0, "sigma_mode", mode)
                f.insert(0, "model", model_name)
                frames.append(f)
    if frames:
        run.write_frame("points.csv", pd.concat(frames, ignore_index=True))
    summary = _read_summary(run)
    summary["certified"] = rows
    summary["certify_settings"] = {"n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed,
                                   "max_points": cfg.max_points, "radii": list(cfg.radii),
                                   "sigma_modes": list(cfg.sigma_modes)}
    run.write_json("summary.json", summary)
    if clean_results:
        norms = trig.trigger_norms.double()
        write_plots(run, clean_results, float(norms.median()) if len(norms) else None)
        from .purify_runs import write_purified_plot

        write_purified_plot(run, named_results, float(norms.median()) if len(norms) else None)
    return rows


def _build_saved_model(spec: dict[str, Any]) -> Any:
    """Builder for :meth:`RunDirectory.load_model` that also rebuilds purified models with inserted layers."""
    from .purify_runs import build_model_from_spec

    return build_model_from_spec(spec)


def _summary_row(model_name: str, sigma: float, mode: str, clean: CertificationResult,
                 triggered: CertificationResult, deployed_trig: np.ndarray, target: int, cfg: CertifyConfig,
                 storage_counts: dict[str, int] | None) -> dict[str, Any]:
    ctr = certified_trigger_robustness(clean, target=target)
    return {
        "model": model_name, "sigma": sigma, "sigma_mode": mode, "n_clean": len(clean),
        "n_triggered": len(triggered), "smoothed_clean_accuracy": clean.accuracy(), "acr": clean.acr(),
        "abstain_rate": clean.abstain_rate(),
        "certified_accuracy": {f"{r:g}": float(a) for r, a in
                               zip(cfg.radii, np.atleast_1d(clean.certified_accuracy(list(cfg.radii))))},
        "certified_trigger_robustness": ctr,
        "certified_asr_upper_bound": (1.0 - ctr) if not math.isnan(ctr) else None,
        "smoothed_asr": float(np.mean(deployed_trig == target)) if len(triggered) else float("nan"),
        "smoothed_robust_accuracy": float(np.mean(deployed_trig == triggered.label)) if len(triggered) else float("nan"),
        "triggered_abstain_rate": float(np.mean(deployed_trig < 0)) if len(triggered) else float("nan"),
        "sigma_mean": float(np.mean(clean.sigma)) if len(clean) else float("nan"),
        "storage": storage_counts,
        "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
    }


def _sample_specific_sigmas(run: RunDirectory, model: Any, model_name: str, sigma: float, x: torch.Tensor,
                            settings: dict[str, Any], cfg: CertifyConfig, device: str, progress: bool) -> np.ndarray:
    """Per-point sigmas by SGA (cached in ``sigmas/`` while the settings match)."""
    from .sigma import SigmaResult, optimize_sigma

    rel = f"sigmas/{model_name}__sigma-{sigma:g}.npz"
    meta_rel = rel.replace(".npz", ".json")
    want = json.loads(json.dumps({k: settings[k] for k in ("model_sha256", "sigma", "seed", "max_points",
                                                            "test_sha256", "sigma_steps", "sigma_lr")}))
    try:
        if run.read_json(meta_rel) == want:
            run.read_bytes(rel)  # hash check
            return SigmaResult.load(run.file(rel)).sigma
    except (RecordError, FileNotFoundError, OSError, ValueError):
        pass
    res = optimize_sigma(model, x, base_sigma=sigma, steps=cfg.sigma_steps, lr=cfg.sigma_lr, seed=cfg.seed,
                         device=device, progress=progress)
    res.save(run.file(rel))
    run.record_file(rel)
    run.write_json(meta_rel, want)
    return np.asarray(res.sigma, dtype=np.float64)


def _storage_update(run: RunDirectory, model_name: str, sigma: float, x_clean: torch.Tensor,
                    clean: CertificationResult, x_trig: torch.Tensor, triggered: CertificationResult
                    ) -> tuple[CertificationResult, dict[str, int], np.ndarray]:
    """Storage-update the clean certificates (test-set order), save the store, and answer the triggered
    inputs as the deployed memory classifier does (stored label inside a stored ball, else smoothed)."""
    from .storage import StorageCertifier

    out = StorageCertifier(order="given").certify(x_clean, clean)
    rel = f"stores/{model_name}__sigma-{sigma:g}.npz"
    out.store.save(run.file(rel))
    run.record_file(rel)
    labels, covered = out.store.predict(x_trig)
    deployed = np.where(covered, labels, triggered.prediction)
    return out.result, out.counts(), deployed


def write_plots(run: RunDirectory, clean_results: Sequence[CertificationResult],
                trigger_norm: float | None = None) -> Path:
    """``plots/certified_accuracy.png``: clean-set curves, with the (median) trigger norm marked."""
    from .plots import plot_certified_accuracy, save_figure

    markers = [trigger_norm] if trigger_norm is not None and math.isfinite(trigger_norm) else None
    ax = plot_certified_accuracy(list(clean_results), markers=markers, marker_label="trigger l2 norm (median)",
                                 title="Test-time smoothing: clean test set")
    if markers:
        ax.set_xlim(0, max(ax.get_xlim()[1], markers[0] * 1.1))
    return save_figure(ax, run.file("plots/certified_accuracy.png"))


def report_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the run's empirical and certified metrics."""
    lines: list[str] = []
    att = summary.get("attack", {})
    if att:
        tn = att.get("trigger_norm_mean")
        lines.append(f"attack {att.get('name')} -> target {att.get('target')}, poison rate {att.get('poison_rate')}, "
                     f"{att.get('n_poisoned')} poisoned; mean trigger l2 norm "
                     f"{tn:.3f}" if tn is not None else "")
    emp = summary.get("empirical", {})
    if emp:
        lines.append("")
        lines.append(f"{'model':<16}{'train sigma':>12}{'CA':>8}{'ASR':>8}{'RA':>8}")
        for name, m in emp.items():
            lines.append(f"{name:<16}{m['noise_sigma']:>12g}{m['clean_accuracy']:>8.3f}"
                         f"{m['attack_success_rate']:>8.3f}{m['robust_accuracy']:>8.3f}")
    cert = summary.get("certified", [])
    if cert:
        radii = list(cert[0]["certified_accuracy"].keys())
        lines.append("")
        w = max([16] + [len(r["model"]) + 2 for r in cert])
        head = f"{'model':<{w}}{'sigma':>7}" + "".join(f"{'CA@' + r:>9}" for r in radii)
        head += f"{'ACR':>8}{'abstain':>9}{'CTR':>7}{'ASR<=':>7}{'sm.ASR':>8}"
        lines.append(head)
        for row in cert:
            name = row["model"] + ("*" if row.get("sigma_mode", "fixed") != "fixed" else "")
            line = f"{name:<{w}}{row['sigma']:>7g}"
            line += "".join(f"{row['certified_accuracy'][r]:>9.3f}" for r in radii)
            bound = row.get("certified_asr_upper_bound")
            line += (f"{row['acr']:>8.3f}{row['abstain_rate']:>9.3f}{row['certified_trigger_robustness']:>7.3f}"
                     f"{(bound if bound is not None else float('nan')):>7.3f}{row['smoothed_asr']:>8.3f}")
            lines.append(line)
        lines.append("CA@r: certified accuracy at radius r (clean test set); CTR: certified trigger robustness "
                     "(non-target points certified beyond the trigger's norm); ASR<=: 1 - CTR, a certified bound "
                     "on the smoothed ASR; sm.ASR: measured ASR of the smoothed classifier.")
        ssb = [r for r in cert if r.get("sigma_mode", "fixed") != "fixed"]
        if ssb:
            lines.append("*: sample-specific sigma (Cert-SSB SGA from the base sigma) + storage-update "
                         "certification; store counts: " + "; ".join(
                             f"{r['model']}@{r['sigma']:g}: mean sigma {r['sigma_mean']:.3f}, "
                             + ", ".join(f"{k[2:]} {v}" for k, v in (r.get("storage") or {}).items()) for r in ssb))
    if summary.get("purified"):
        from .purify_runs import purified_table

        lines.extend(["", purified_table(summary)])
    return "\n".join(lines)


def report(run_dir: str | Path, *, replot: bool = True) -> str:
    """Read a run directory, verify it, optionally redraw its plots, and return the text table."""
    run = RunDirectory.open(run_dir)
    problems = run.verify()
    if problems:
        raise RecordError(f"run directory {run.path} failed verification: " + "; ".join(problems))
    summary = _read_summary(run)
    if run.kind == "ensemble":
        from .ensemble_runs import ensemble_report_table

        if not summary:
            raise RecordError(f"ensemble run {run.path} has no summary.json yet: run `certkit ensemble certify` first")
        return ensemble_report_table(summary)
    if not summary:
        raise RecordError(f"run directory {run.path} has no summary.json yet: run `certkit train` first")
    if replot and summary.get("certified"):
        frame = run.read_frame("points.csv")
        results = []
        trig_rows = frame[frame["set"] == "triggered"]
        norm = float(trig_rows["trigger_norm"].median()) if len(trig_rows) else None
        named = []
        for row in summary["certified"]:
            mode = row.get("sigma_mode", "fixed")
            sel = frame[(frame["model"] == row["model"]) & (frame["set"] == "clean")
                        & np.isclose(frame["base_sigma"] if "base_sigma" in frame else frame["sigma"], row["sigma"])
                        & ((frame["sigma_mode"] == mode) if "sigma_mode" in frame else True)]
            suffix = "" if mode == "fixed" else " (sample-specific)"
            results.append(CertificationResult.from_frame(sel, meta={"name": f"{row['model']}, sigma={row['sigma']:g}{suffix}"}))
            if mode == "fixed":
                named.append((row["model"], results[-1]))
        write_plots(run, results, norm)
        from .purify_runs import write_purified_plot

        write_purified_plot(run, named, norm)
    return report_table(summary)


DEMO_SIGMAS = (0.12, 0.25, 0.5)


def run_demo(out: str | Path, *, sigmas: Sequence[float] = DEMO_SIGMAS, attack: str = "badnets",
             attack_params: dict[str, Any] | None = None, poison_rate: float = 0.1, target: int = 0,
             epochs: int = 30, n0: int = 100, n: int = 1000, alpha: float = 0.001, seed: int = 0,
             max_points: int | None = None, device: str = "auto", progress: bool = True,
             log: Any = print) -> str:
    """The digits walk-through: train a backdoored CNN (and one noise-trained CNN per sigma), measure CA and
    ASR, certify the clean and triggered test sets with test-time smoothing at each sigma, write the run
    directory (``summary.json``, ``points.csv``, ``plots/certified_accuracy.png``) and return the table."""
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise InputError(f"demo sigmas must be positive and finite, got {sigmas}")
    cfg = TrainConfig(dataset="digits", model="digits-cnn", attack=attack, attack_params=dict(attack_params or {}),
                      poison_rate=poison_rate, target=target, epochs=epochs, noise_sigmas=(0.0, *sigmas), seed=seed)
    run = RunDirectory.create(out, {"train": cfg.to_dict()}, kind=RUN_KIND)
    t0 = time.perf_counter()
    train_run(run, device=device, progress=progress, log=log)
    certify_run(run, CertifyConfig(pairs=tuple((model_name_for(s), s) for s in sigmas), n0=n0, n=n, alpha=alpha,
                                   seed=seed, max_points=max_points),
                device=device, progress=progress, log=log)
    run.record_timing("demo/total", time.perf_counter() - t0)
    return report(run.path, replot=False)
