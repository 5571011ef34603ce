"""Ensemble runs (``kind="ensemble"``): train a RAB ensemble, certify it, report (Mode B end to end).

An ensemble run directory holds the members (``models/member-XXXX.pt``), an ``undefended`` model trained on
the same poisoned data without noise (for the empirical ASR it is compared with), the members' votes on the
clean and triggered test sets (``votes/clean.npz``, ``votes/triggered.npz``), certificates, ``points.csv``,
``summary.json`` and ``plots/certified_accuracy.png``. Votes are reused while the test set and the member
checkpoints are unchanged, so certifying again for another alpha or bound needs no model.

Certified trigger robustness in Mode B (RAB's reading): a triggered non-target test input counts when the
ensemble certifies it *correct* with a radius larger than the attack's joint norm
``sqrt(sum_j ||Delta_j||^2 + ||t||^2)`` (``= sqrt(r + 1) ||t||`` for a constant-norm trigger on ``r``
poisoned points): its prediction is then provably the one the ensemble would make had no training input and
not the test input carried the trigger (labels as they are). The summary also gives the *test-time* figure:
clean inputs certified correct beyond ``||t||``, which bounds the ASR of the deployed (poisoned) ensemble.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .ensemble import EnsembleVotes, SmoothedEnsemble, certify_votes, joint_trigger_norms
from .errors import InputError, RecordError
from .metrics import certified_trigger_robustness
from .records import RunDirectory
from .results import CertificationResult

RUN_KIND = "ensemble"
DEFAULT_RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass
class EnsembleCertifyConfig:
    """How to turn an ensemble's votes into certificates."""

    alpha: float = 0.001
    bound: str = "clopper-pearson"
    selection_correction: bool = True
    max_points: int | None = None
    seed: int = 0
    batch_size: int = 1024
    radii: tuple[float, ...] = DEFAULT_RADII


def _votes(run: RunDirectory, ens: SmoothedEnsemble, x: torch.Tensor, which: str, test_sha: str,
           log: Any) -> EnsembleVotes:
    """The members' votes on ``x``, reused from ``votes/<which>.npz`` when still valid."""
    rel = f"votes/{which}.npz"
    want = {"test_sha256": test_sha, "member_sha256": ens.meta.get("member_sha256"), "points": int(x.shape[0])}
    path = run.file(rel)
    if path.exists():
        try:
            run.read_bytes(rel)  # hash check against the manifest
            old = EnsembleVotes.load(path)
            if all(old.meta.get(k) == v for k, v in want.items()):
                log(f"[ensemble] {which}: reusing saved votes of {old.members} members")
                return old
        except RecordError:
            pass
    votes = ens.votes(x)
    votes.meta.update(want)
    votes.save(path)
    run.record_file(rel)
    return votes


def prepare_data(spec: Any) -> Any:
    """The deterministic data of an ensemble spec (splits, attack, poisoned set, triggered test set)."""
    from .ensemble_training import prepare_ensemble_data

    return prepare_ensemble_data(spec)


def train_undefended(run: RunDirectory, spec: Any, data: Any, *, device: str, progress: bool, log: Any) -> Any:
    """Train (or reload) the noise-free model on the same poisoned data: the baseline ASR."""
    from .models import build_model
    from .training import train_model

    if run.has_model("undefended"):
        return run.load_model("undefended")
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_classes=data.splits.num_classes, input_shape=data.splits.input_shape,
                        mean=data.splits.mean, std=data.splits.std)
    t0 = time.perf_counter()
    train_model(model, data.poisoned.dataset, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                seed=spec.seed, device=device, progress=progress, desc="train undefended")
    run.save_model("undefended", model, model.certkit_spec)
    run.record_timing("train/undefended", time.perf_counter() - t0)
    log("[ensemble] trained the undefended baseline")
    return model


def certify_ensemble_run(run: RunDirectory, cfg: EnsembleCertifyConfig, *, device: str = "auto",
                         progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Collect (or reuse) votes, certify the clean and triggered test sets, write summary, points, plot."""
    from .ensemble_training import EnsembleSpec
    from .metrics import empirical_metrics

    if run.kind != RUN_KIND:
        raise RecordError(f"{run.path} is a {run.kind!r} run; `certkit ensemble certify` needs an ensemble run")
    spec = EnsembleSpec.from_dict(run.config["ensemble"])
    data = prepare_data(spec)
    test, trig = data.splits.test, data.triggered
    if cfg.max_points is not None:
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.permutation(len(test))[: cfg.max_points])
        keep_t = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    else:
        keep, keep_t = np.arange(len(test)), np.arange(len(trig.x))
    ens = SmoothedEnsemble.from_run(run, batch_size=cfg.batch_size, device=device, progress=progress)
    t0 = time.perf_counter()
    v_clean = _votes(run, ens, test.x[keep], "clean", test.subset(keep).sha256(), log)
    trig_x = trig.x[keep_t]
    v_trig = _votes(run, ens, trig_x, "triggered",
                    _tensor_sha(trig_x), log)
    run.record_timing("ensemble/votes", time.perf_counter() - t0)

    test_norms = data.attack.trigger_norms(test.x[keep])
    delta_sq = float(((data.poisoned.dataset.x - data.splits.train.x) ** 2).sum())
    joint = joint_trigger_norms(delta_sq, trig.trigger_norms[keep_t])
    common = {"sigma": spec.sigma, "alpha": cfg.alpha, "bound": cfg.bound, "selection_correction": cfg.selection_correction}
    name = f"RAB ensemble, M={spec.members}, sigma={spec.sigma:g}"
    clean = certify_votes(v_clean, test.y[keep], ids=keep, trigger_norm=test_norms, name=name, **common)
    triggered = certify_votes(v_trig, trig.y_true[keep_t], ids=np.asarray(trig.indices)[keep_t] + len(test),
                              triggered=True, trigger_norm=joint, name=name, **common)

    target = spec.target
    ctr_joint = certified_trigger_robustness(triggered, target=target)  # rows are non-target already
    ctr_test_time = certified_trigger_robustness(clean, target=target)
    majority_clean = v_clean.counts().argmax(1)
    majority_trig = v_trig.counts().argmax(1)
    undefended = run.load_model("undefended") if run.has_model("undefended") else None
    emp = (empirical_metrics(undefended, test.x, test.y, trig, device=device).to_dict()
           if undefended is not None else None)
    row = {
        "members": spec.members, "sigma": spec.sigma, "n_clean": len(clean), "n_triggered": len(triggered),
        "ensemble_clean_accuracy": float(np.mean(majority_clean == test.y[keep].numpy())),
        "ensemble_asr": float(np.mean(majority_trig == target)) if len(triggered) else float("nan"),
        "certified_accuracy": {f"{r:g}": float(a) for r, a in
                               zip(cfg.radii, np.atleast_1d(clean.certified_accuracy(list(cfg.radii))))},
        "acr": clean.acr(), "abstain_rate": clean.abstain_rate(),
        "certified_trigger_robustness": ctr_joint,
        "joint_trigger_norm_median": float(np.median(joint)) if len(joint) else None,
        "certified_trigger_robustness_test_time": ctr_test_time,
        "poisoned_training_points": int(len(data.poisoned.poison_indices)),
        **common,
    }
    summary = {
        "kind": RUN_KIND,
        "attack": {**data.attack.config(), "target": target, "poison_rate": spec.poison_rate,
                   "n_poisoned": int(len(data.poisoned.poison_indices)),
                   "trigger_norm_mean": float(trig.trigger_norms.double().mean()) if len(trig.x) else None},
        "dataset": {"name": data.splits.name, "n_train": len(data.splits.train), "n_test": len(test),
                    "num_classes": data.splits.num_classes},
        "undefended": emp,
        "ensemble": row,
        "training_assumption": "training noise is a fixed Gaussian draw per member and training input (RAB); "
                               "certificates cover feature perturbations with labels as they are",
    }
    frames = []
    for res, which in ((clean, "clean"), (triggered, "triggered")):
        f = res.to_frame()
        f.insert(0, "set", which)
        f.insert(0, "model", "ensemble")
        frames.append(f)
    run.write_frame("points.csv", pd.concat(frames, ignore_index=True))
    run.write_json("summary.json", summary)
    _plot(run, clean, float(np.median(test_norms[test.y[keep].numpy() != target])) if len(keep) else None)
    log(f"[ensemble] certified acc@0 {clean.accuracy():.3f}  ACR {clean.acr():.3f}  CTR(joint) {ctr_joint:.3f}  "
        f"CTR(test-time) {ctr_test_time:.3f}  ensemble ASR {row['ensemble_asr']:.3f}")
    return summary


def _tensor_sha(x: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _plot(run: RunDirectory, clean: CertificationResult, norm: float | None) -> None:
    from .plots import plot_certified_accuracy, save_figure

    markers = [norm] if norm is not None and math.isfinite(norm) else None
    ax = plot_certified_accuracy([clean], markers=markers, marker_label="test trigger l2 norm (median)",
                                 title="Training-time smoothing (RAB ensemble): clean test set")
    save_figure(ax, run.file("plots/certified_accuracy.png"))
    run.record_file("plots/certified_accuracy.png")


def ensemble_report_table(summary: dict[str, Any]) -> str:
    """Plain-text table of an ensemble run's summary."""
    att, row, emp = summary.get("attack", {}), summary.get("ensemble"), summary.get("undefended")
    lines = [f"attack {att.get('name')} -> target {att.get('target')}, poison rate {att.get('poison_rate')}, "
             f"{att.get('n_poisoned')} poisoned; mean trigger l2 norm {att.get('trigger_norm_mean') or float('nan'):.3f}"]
    if emp:
        lines.append(f"undefended model (no noise): CA {emp['clean_accuracy']:.3f}  ASR {emp['attack_success_rate']:.3f}")
    if row:
        lines.append(f"ensemble (M={row['members']}, sigma={row['sigma']:g}, {row['bound']}, alpha={row['alpha']:g}): "
                     f"CA {row['ensemble_clean_accuracy']:.3f}  ASR {row['ensemble_asr']:.3f}")
        radii = list(row["certified_accuracy"])
        lines.append("".join(f"{'CA@' + r:>9}" for r in radii) + f"{'ACR':>8}{'abstain':>9}{'CTR':>7}{'CTR(test)':>11}")
        lines.append("".join(f"{row['certified_accuracy'][r]:>9.3f}" for r in radii)
                     + f"{row['acr']:>8.3f}{row['abstain_rate']:>9.3f}{row['certified_trigger_robustness']:>7.3f}"
                     f"{row['certified_trigger_robustness_test_time']:>11.3f}")
        lines.append(f"CTR: triggered non-target inputs certified correct beyond the joint norm (median "
                     f"{row['joint_trigger_norm_median'] or float('nan'):.3f} = sqrt(sum ||Delta_j||^2 + ||t||^2) over "
                     f"{row['poisoned_training_points']} poisoned points); CTR(test): clean inputs certified beyond ||t||.")
    return "\n".join(lines)


def check_ensemble_certify_config(cfg: EnsembleCertifyConfig) -> EnsembleCertifyConfig:
    """Validate settings early (before any vote is collected)."""
    from ._validation import check_alpha, check_choice, check_positive_int
    from .ensemble import BOUNDS

    check_alpha(cfg.alpha)
    check_choice(cfg.bound, BOUNDS, "bound")
    check_positive_int(cfg.batch_size, "batch_size")
    if cfg.max_points is not None:
        check_positive_int(cfg.max_points, "max_points")
    if any(not math.isfinite(r) or r < 0 for r in cfg.radii):
        raise InputError(f"radii must be finite and >= 0, got {cfg.radii}")
    return cfg


def run_ensemble_demo(out: str, *, sigma: float = 0.5, members: int = 50, attack: str = "badnets",
                      attack_params: dict[str, Any] | None = None, poison_rate: float = 0.02, target: int = 0,
                      epochs: int = 10, alpha: float = 0.001, seed: int = 0, max_points: int | None = None,
                      n_jobs: int = 2, device: str = "cpu", progress: bool = True, log: Any = print) -> str:
    """RAB on digits end to end: train M members (and the undefended baseline), certify, report."""
    from .ensemble_training import EnsembleSpec, train_ensemble

    spec = EnsembleSpec(dataset="digits", model="digits-cnn", attack=attack, attack_params=dict(attack_params or {}),
                        poison_rate=poison_rate, target=target, members=members, sigma=sigma, epochs=epochs, seed=seed)
    cfg = check_ensemble_certify_config(EnsembleCertifyConfig(alpha=alpha, max_points=max_points, seed=seed))
    t0 = time.perf_counter()
    run = train_ensemble(spec, out, n_jobs=n_jobs, device=device, progress=progress)
    train_undefended(run, spec, prepare_data(spec), device=device, progress=progress, log=log)
    summary = certify_ensemble_run(run, cfg, device=device, progress=progress, log=log)
    run.record_timing("demo/total", time.perf_counter() - t0)
    return ensemble_report_table(summary)
