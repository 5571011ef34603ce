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
clean inputs certified correct beyond ``||t||`` (each at ``1 - alpha`` on its own; the summary's ``asr_bound``
is the whole-test-set statement at 95%, in the Markov form because every point shares the members' noise).

Sample-specific runs (``noise="sample-specific"``; docs/design.md sections 3 and 10): the test sigma ``sigma_i``
of every test query is optimised on that query itself with
:func:`certkit.runs.ensemble_train.optimize_sample_sigmas` under the run's reference model (seed
``derive_seed(seed, STREAM_SIGMA_TEST, 0)``, the whole set in one call, so a point's sigma does not depend on
``max_points``): the clean test set into ``test_sigmas.npz``, the triggered queries into
``test_sigmas_triggered.npz`` (a triggered query never borrows its clean twin's sigma: a deployed system only
sees ``x + t``). Each file holds ``sigma`` plus a JSON ``meta`` naming the inputs' and reference model's
hashes and the SGA settings; reused while they match. The votes are sampled with these sigmas.

What is certified, and what is only conditional:

* The training scales ``s_j`` are chosen from the (possibly poisoned) training set, so the smoothing
  distribution is itself a function of what the attacker controls. Every guarantee against *training-set*
  perturbations (the joint l2 radius, the weighted condition, the joint CTR) holds only for the scales held
  fixed: it goes to columns named ``*_conditional_on_scales`` and is never reported as certified accuracy or
  CTR. No guarantee against poisoning holds whatever scales the attacker induces, so the unconditional joint
  CTR of a sample-specific run is ``None``.
* ``certified_accuracy``/``acr`` (test-sigma units, ``sigma_i * gap / 2``) perturb only the test input with
  the deployed members fixed: they do not depend on the training set's counterfactual. With per-input test
  sigmas they are storage-update certificates (transductive, order-dependent; the clean test queries in
  test order, the store ``store.npz`` is part of the classifier). The test-time CTR processes the triggered
  queries as they arrive in deployment, before (without) their clean twins (``store_triggered_first.npz``).
* No joint-l2 radius is given on rows the storage update changed: the store depends on the training set.
"""


from __future__ import annotations

import io
import json
import math
import os
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from certkit._validation import check_alpha, check_choice, check_positive_int
from certkit.backdoor.metrics import empirical_metrics
from certkit.backdoor.models import build_model
from certkit.backdoor.prepare import PreparedData, prepare_data
from certkit.backdoor.training import train_model
from certkit.certify.ensemble import (
    BOUNDS,
    EnsembleVotes,
    SmoothedEnsemble,
    attack_covered,
    certify_votes,
    joint_l2_radius,
    joint_trigger_norms,
    poison_weighted_sq_sum,
    vote_gap,
    weighted_joint_norms,
)
from certkit.certify.metrics import (
    certified_trigger_robustness,
    certified_triggered_accuracy,
    simultaneous_asr_bound,
)
from certkit.certify.plots import plot_certified_accuracy, save_figure, settings_caption
from certkit.certify.results import CertificationResult
from certkit.certify.storage import StorageCertifier
from certkit.devices import resolve_device
from certkit.errors import InputError, RecordError
from certkit.io import sha256_tensor
from certkit.runs.defaults import ENSEMBLE_CERTIFY, ENSEMBLE_DEMO
from certkit.runs.ensemble_train import (
    REFERENCE_MODEL,
    SAMPLE_SPECIFIC_ASSUMPTION,
    STREAM_SIGMA_TEST,
    EnsembleSpec,
    announce_member_passes,
    check_scales,
    load_ensemble,
    load_training_scales,
    optimize_sample_sigmas,
    train_ensemble,
)
from certkit.runs.rundir import RunDirectory
from certkit.seeding import derive_seed

RUN_KIND = "ensemble"
DEFAULT_RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass
class EnsembleCertifyConfig:
    """How to turn an ensemble's votes into certificates."""

    alpha: float = ENSEMBLE_CERTIFY["alpha"]
    bound: str = ENSEMBLE_CERTIFY["bound"]
    selection_correction: bool = True
    max_points: int | None = None
    seed: int = 0
    batch_size: int = ENSEMBLE_CERTIFY["batch_size"]
    radii: tuple[float, ...] = DEFAULT_RADII


def _votes(run: RunDirectory, ens: SmoothedEnsemble, x: torch.Tensor, which: str, test_sha: str,
           log: Any, sigma: np.ndarray | None = None) -> EnsembleVotes:
    """The members' votes on ``x`` (per-point ``sigma`` if given), reused from ``votes/<which>.npz`` when
    still valid (same test points, members and sigmas)."""
    rel = f"votes/{which}.npz"
    want = {"test_sha256": test_sha, "member_sha256": ens.meta.get("member_sha256"), "points": int(x.shape[0])}
    path = run.file(rel)
    if path.exists():
        try:
            run.read_bytes(rel)  # hash check against the manifest
            old = EnsembleVotes.load(path)
            same_sigma = (old.sigma is None and sigma is None) or (
                old.sigma is not None and sigma is not None and np.array_equal(old.sigma, sigma))
            if same_sigma and all(old.meta.get(k) == v for k, v in want.items()):
                log(f"[ensemble] {which}: reusing saved votes of {old.members} members")
                return old
        except RecordError:
            pass
    votes = ens.votes(x, sigma=sigma)
    votes.meta.update(want)
    votes.save(path)
    run.record_file(rel)
    return votes


TEST_SIGMAS = "test_sigmas.npz"
TRIGGERED_SIGMAS = "test_sigmas_triggered.npz"


def optimized_test_sigmas(run: RunDirectory, spec: EnsembleSpec, test_x: torch.Tensor, *, device: str = "cpu",
                          log: Any = print, which: str = "clean") -> np.ndarray:
    """Per-point test sigmas ``[N]`` of a sample-specific run, each optimised on its own input ``test_x[i]``
    (``which``: ``"clean"`` test set, stored in ``test_sigmas.npz``, or ``"triggered"`` queries, stored in
    ``test_sigmas_triggered.npz``); reused while the inputs, the reference model and the SGA settings match
    (see the module docstring)."""
    if REFERENCE_MODEL not in run.models():
        raise RecordError(f"sample-specific run {run.path} has no reference model; train the ensemble first")
    seed = derive_seed(spec.seed, STREAM_SIGMA_TEST, 0)
    want = {"test_sha256": sha256_tensor(test_x), "reference_sha256": run.manifest["models"][REFERENCE_MODEL]["sha256"],
            "base_sigma": spec.sigma, "steps": spec.sigma_steps, "lr": spec.sigma_lr, "sigma_max": spec.sigma_max,
            "detach_model": spec.sigma_detach_model, "seed": seed}
    n = int(test_x.shape[0])
    rel = TEST_SIGMAS if which == "clean" else TRIGGERED_SIGMAS
    if rel in run.manifest["files"]:
        try:
            with np.load(io.BytesIO(run.read_bytes(rel)), allow_pickle=False) as z:
                sig, meta = np.array(z["sigma"], dtype=np.float64), json.loads(str(z["meta"]))
            if all(meta.get(k) == v for k, v in want.items()):
                log(f"[ensemble] reusing the {n} stored {which} test sigmas")
                return check_scales(sig, n, "stored test sigmas")
        except (RecordError, InputError, KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            warnings.warn(f"recomputing the test sigmas of {run.path}: {exc}", RuntimeWarning, stacklevel=2)
    model = run.load_model(REFERENCE_MODEL, device="cpu")  # verified against its sha256
    t0 = time.perf_counter()
    sig = optimize_sample_sigmas(spec, model, test_x, seed=seed, device=resolve_device(device))
    buf = io.BytesIO()
    np.savez_compressed(buf, sigma=sig, meta=np.array(json.dumps(want)))
    run.write_bytes(rel, buf.getvalue())
    run.record_timing(f"test_sigmas/{which}", time.perf_counter() - t0)
    log(f"[ensemble] optimised {n} {which} test sigmas (median {float(np.median(sig)):.4f})")
    return sig


def train_undefended(run: RunDirectory, spec: EnsembleSpec, data: PreparedData, *, device: str, progress: bool,
                     log: Any) -> torch.nn.Module:
    """Train (or reload) the noise-free model on the same poisoned data: the baseline ASR."""

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
    ens = load_ensemble(run, batch_size=cfg.batch_size, device=device, progress=progress)
    sig_clean = sig_trig = None
    if spec.sample_specific:  # per-query test sigma, each optimised on its own input (x, or x + t)
        sig_clean = optimized_test_sigmas(run, spec, test.x, device=device, log=log)[keep]
        sig_trig = optimized_test_sigmas(run, spec, trig.x, device=device, log=log, which="triggered")[keep_t]
    announce_member_passes(run, spec, len(keep) + len(keep_t), batch_size=cfg.batch_size, device=device, log=log,
                           what="ensemble certify", note="votes saved for the same points and members are reused")
    t0 = time.perf_counter()
    v_clean = _votes(run, ens, test.x[keep], "clean", test.subset(keep).sha256(), log, sigma=sig_clean)
    trig_x = trig.x[keep_t]
    v_trig = _votes(run, ens, trig_x, "triggered",
                    sha256_tensor(trig_x), log, sigma=sig_trig)
    run.record_timing("ensemble/votes", time.perf_counter() - t0)
    if spec.sample_specific:
        return _certify_sample_specific(run, cfg, spec, data, keep, keep_t, v_clean, v_trig, device=device, log=log)

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
    majority_clean = v_clean.prediction(cfg.bound)  # the aggregate the bound certifies (soft ranking: Hoeffding)
    majority_trig = v_trig.prediction(cfg.bound)
    undefended = run.load_model("undefended") if run.has_model("undefended") else None
    emp = (empirical_metrics(undefended, test.x, test.y, trig, device=device).to_dict()
           if undefended is not None else None)
    row = {
        "members": spec.members, "sigma": spec.sigma, "n_clean": len(clean), "n_triggered": len(triggered),
        "ensemble_clean_accuracy": float(np.mean(majority_clean == test.y[keep].numpy())),
        "ensemble_asr": float(np.mean(majority_trig == target)) if len(triggered) else float("nan"),
        "certified_accuracy": {f"{r:g}": float(a) for r, a in
                               zip(cfg.radii, np.atleast_1d(clean.certified_accuracy(list(cfg.radii))))},
        "acr": clean.acr(), "abstain_rate": clean.abstain_rate(), "radius_cap": clean.meta.get("radius_cap"),
        "certified_trigger_robustness": ctr_joint,
        "asr_bound": _asr_bound(ctr_joint, triggered, target, cfg.alpha),
        "joint_trigger_norm_median": float(np.median(joint)) if len(joint) else None,
        "certified_trigger_robustness_test_time": ctr_test_time,
        "poisoned_training_points": int(len(data.poisoned.poison_indices)),
        **common,
    }
    summary = _summary(spec, data, emp, row, "training noise is a fixed Gaussian draw per member and training "
                       "input (RAB); certificates cover feature perturbations with labels as they are")
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


def _certify_sample_specific(run: RunDirectory, cfg: EnsembleCertifyConfig, spec: EnsembleSpec, data: PreparedData,
                             keep: np.ndarray, keep_t: np.ndarray, v_clean: EnsembleVotes, v_trig: EnsembleVotes,
                             *, device: str, log: Any) -> dict[str, Any]:
    """The three quantities of docs/design.md section 3 for a sample-specific run (module docstring)."""

    test, trig, target = data.splits.test, data.triggered, spec.target
    scales = load_training_scales(run)
    bounds = {"alpha": cfg.alpha, "bound": cfg.bound, "selection_correction": cfg.selection_correction}
    name = f"sample-specific ensemble, M={spec.members}, base sigma={spec.sigma:g}"
    test_norms = data.attack.trigger_norms(test.x[keep])
    delta_sq = ((data.poisoned.dataset.x - data.splits.train.x).double() ** 2).flatten(1).sum(1).numpy()
    w = poison_weighted_sq_sum(delta_sq, scales)
    t_trig = np.asarray(trig.trigger_norms[keep_t].double().numpy(), dtype=np.float64)
    sig_trig = v_trig.sigma
    weighted = weighted_joint_norms(w, sig_trig, t_trig)
    clean = certify_votes(v_clean, test.y[keep], ids=keep, trigger_norm=test_norms, name=name, **bounds)
    triggered = certify_votes(v_trig, trig.y_true[keep_t], ids=np.asarray(trig.indices)[keep_t] + len(test),
                              triggered=True, trigger_norm=weighted, name=name, **bounds)
    gap_clean, gap_trig = vote_gap(v_clean, **bounds), vote_gap(v_trig, **bounds)
    joint_clean = joint_l2_radius(gap_clean, clean.sigma, scales)
    # Input-dependent test sigmas: the certified classifier is the memory-augmented one (storage update over
    # the clean test inputs in their order; the store is saved and deployed with the ensemble). The joint-l2
    # radius is kept no larger than the adjusted input radius, and 0 where the label was aligned.
    storage = StorageCertifier(order="given").certify(test.x[keep], clean)
    clean = storage.result
    storage.store.save(run.file("store.npz"))
    run.record_file("store.npz")
    adjusted = storage.aligned | storage.trimmed | storage.maximised | storage.adopted
    joint_clean = np.where(adjusted, np.nan, joint_clean)  # the store depends on the training set
    joint_trig = joint_l2_radius(gap_trig, triggered.sigma, scales)
    covered = attack_covered(gap_trig, triggered.sigma, w, t_trig)
    plain_joint = joint_trigger_norms(float(delta_sq.sum()), t_trig)
    non_target = triggered.label != target
    ctr = float(np.mean((triggered.correct & covered)[non_target])) if non_target.any() else float("nan")
    ctr_plain = (float(np.mean((triggered.correct & (joint_trig > plain_joint))[non_target]))
                 if non_target.any() else float("nan"))
    # test-time trigger robustness of the deployed memory classifier: the triggered queries in test order,
    # before (without) their clean twins; the clean-first figure is only a diagnostic
    deployed = StorageCertifier(order="given").certify(trig.x[keep_t], triggered)
    deployed.store.save(run.file("store_triggered_first.npz"))
    run.record_file("store_triggered_first.npz")
    ctr_test_time = certified_triggered_accuracy(deployed.result, target=target)
    ctr_test_time_diagnostic = certified_trigger_robustness(clean, target=target)
    joint_res = CertificationResult(label=clean.label, prediction=clean.prediction,
                                    radius=np.nan_to_num(joint_clean, nan=0.0), p_lower=clean.p_lower,
                                    sigma=clean.sigma)
    undefended = run.load_model("undefended") if run.has_model("undefended") else None
    emp = (empirical_metrics(undefended, test.x, test.y, trig, device=device).to_dict()
           if undefended is not None else None)

    def stats(a: np.ndarray) -> dict[str, float | None]:
        a = np.asarray(a, dtype=np.float64)
        if not a.size:
            return {"min": None, "median": None, "mean": None, "max": None}
        return {"min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()), "max": float(a.max())}

    radii = list(cfg.radii)
    row = {
        "members": spec.members, "sigma": spec.sigma, "noise": spec.noise, "n_clean": len(clean),
        "n_triggered": len(triggered),
        "ensemble_clean_accuracy": float(np.mean(v_clean.prediction(cfg.bound) == test.y[keep].numpy())),
        "ensemble_asr": float(np.mean(v_trig.prediction(cfg.bound) == target)) if len(triggered) else float("nan"),
        "radius_convention": "radius = sigma_i * gap / 2 (test-sigma units, Cert-SSB); "
                             "joint l2 radius = min(min_j s_j, sigma_i) * gap / 2",
        "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, np.atleast_1d(clean.certified_accuracy(radii)))},
        "acr": clean.acr(), "abstain_rate": clean.abstain_rate(),
        "certified_accuracy_joint_l2_conditional_on_scales": {
            f"{r:g}": float(a) for r, a in zip(radii, np.atleast_1d(joint_res.certified_accuracy(radii)))},
        "acr_joint_l2_conditional_on_scales": joint_res.acr(),
        "certified_trigger_robustness": None,  # no poisoning guarantee holds whatever scales the data induce
        "certified_trigger_robustness_conditional_on_scales": ctr,
        "certified_trigger_robustness_plain_joint_l2_conditional_on_scales": ctr_plain,
        "joint_trigger_norm_median": float(np.median(plain_joint)) if len(plain_joint) else None,
        "weighted_trigger_norm_median": float(np.median(weighted)) if len(weighted) else None,
        "weighted_poison_sum": w,
        "certified_trigger_robustness_test_time": ctr_test_time,
        "asr_bound_test_time": _asr_bound(ctr_test_time, deployed.result, target, cfg.alpha),
        "certified_trigger_robustness_test_time_clean_first_diagnostic": ctr_test_time_diagnostic,
        "poisoned_training_points": int(len(data.poisoned.poison_indices)),
        "training_scales": stats(scales), "test_sigmas": stats(clean.sigma),
        "storage": {"kind": "transductive, order-dependent", "clean_order": "clean test queries in test-set order",
                    "triggered_order": "triggered queries in test-set order, before (without) their clean twins",
                    "counts": storage.counts(), "triggered_counts": deployed.counts()},
        **bounds,
    }
    summary = _summary(spec, data, emp, row, SAMPLE_SPECIFIC_ASSUMPTION)
    frames = []
    for res, which, gap, joint in ((clean, "clean", gap_clean, joint_clean),
                                   (triggered, "triggered", gap_trig, joint_trig)):
        f = res.to_frame()
        f.insert(0, "set", which)
        f.insert(0, "model", "ensemble")
        f["gap"] = gap
        f["joint_l2_radius"] = joint
        f["attack_covered"] = covered if which == "triggered" else np.nan
        frames.append(f)
    run.write_frame("points.csv", pd.concat(frames, ignore_index=True))
    run.write_json("summary.json", summary)
    _plot(run, clean, float(np.median(test_norms[test.y[keep].numpy() != target])) if len(keep) else None,
          title="Training-time smoothing (sample-specific ensemble): clean test set, radius in test-sigma units")
    log(f"[ensemble] certified acc@0 {clean.accuracy():.3f}  ACR {clean.acr():.3f} (joint l2 {joint_res.acr():.3f})  "
        f"CTR(weighted) {ctr:.3f}  CTR(test-time) {ctr_test_time:.3f}  ensemble ASR {row['ensemble_asr']:.3f}")
    return summary


def _summary(spec: EnsembleSpec, data: PreparedData, undefended: dict[str, Any] | None, row: dict[str, Any],
             assumption: str) -> dict[str, Any]:
    """The ``summary.json`` of an ensemble run: attack, dataset, undefended baseline, ensemble row."""
    trig = data.triggered
    return {
        "kind": RUN_KIND,
        "attack": {**data.attack.config(), "target": spec.target, "poison_rate": spec.poison_rate,
                   "n_poisoned": int(len(data.poisoned.poison_indices)),
                   "trigger_norm_mean": float(trig.trigger_norms.double().mean()) if len(trig.x) else None},
        "dataset": {"name": data.splits.name, "n_train": len(data.splits.train), "n_test": len(data.splits.test),
                    "num_classes": data.splits.num_classes},
        "undefended": undefended,
        "ensemble": row,
        "training_assumption": assumption,
    }


def _plot(run: RunDirectory, clean: CertificationResult, norm: float | None,
          title: str = "Training-time smoothing (RAB ensemble): clean test set") -> None:

    markers = [norm] if norm is not None and math.isfinite(norm) else None
    summary = run.read_summary() if "summary.json" in run.manifest["files"] else {}
    row = summary.get("ensemble") or {}
    sigmas = np.unique(clean.sigma)
    caption = settings_caption(
        dataset=(summary.get("dataset") or {}).get("name"), points=len(clean), alpha=clean.meta.get("alpha"),
        sigma=float(sigmas[0]) if len(sigmas) == 1 else f"per point (base {row.get('sigma', float('nan')):g})",
        extra=f"{clean.meta.get('members', row.get('members'))} members, {clean.meta.get('bound', 'votes')} bound")
    ax = plot_certified_accuracy([clean], markers=markers, marker_label="test trigger l2 norm (median)",
                                 title=title, caption=caption)
    path = save_figure(ax, run.file("plots/certified_accuracy.png"))
    run.record_file(path.relative_to(run.path).as_posix())


def _asr_bound(ctr: float | None, triggered: CertificationResult, target: int, alpha: float) -> dict | None:
    """The whole-test-set ASR statement at 95% for a CTR over the non-target triggered rows. The members'
    noise is shared by every test point, so the certificates' failures are not independent: Markov form."""
    n = int((triggered.label != target).sum())
    if ctr is None or not n or math.isnan(ctr):
        return None
    return simultaneous_asr_bound(ctr, n, alpha, 0.05, independent=False).to_dict()


def _fmt(value: Any, width: int) -> str:
    return f"{value:>{width}.3f}" if isinstance(value, (int, float)) and not math.isnan(value) else f"{'n/a':>{width}}"


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
        bound = (row.get("asr_bound") or {}).get("bound")
        lines.append("".join(f"{'CA@' + r:>9}" for r in radii)
                     + f"{'ACR':>8}{'abstain':>9}{'CTR':>7}{'ASR<=95%':>10}{'CTR(test)':>11}")
        lines.append("".join(f"{row['certified_accuracy'][r]:>9.3f}" for r in radii)
                     + f"{row['acr']:>8.3f}{row['abstain_rate']:>9.3f}"
                     + _fmt(row["certified_trigger_robustness"], 7) + _fmt(bound, 10)
                     + _fmt(row["certified_trigger_robustness_test_time"], 11))
        conditional = row.get("certified_trigger_robustness_conditional_on_scales")
        if conditional is not None or "acr_joint_l2" in row:  # sample-specific scales (old runs: unlabelled keys)
            acr_c = row.get("acr_joint_l2_conditional_on_scales", row.get("acr_joint_l2"))
            ctr_c = conditional if conditional is not None else row.get("certified_trigger_robustness")
            lines.append(f"sample-specific scales: radius = sigma_i * gap / 2 (test-sigma units). CONDITIONAL on the "
                         f"data-chosen training scales (not certificates against poisoning, see "
                         f"training_assumption): joint l2 ACR {acr_c:.3f}, CTR by the weighted condition "
                         f"{ctr_c:.3f}. CTR(test) is transductive: triggered queries before their clean twins.")
        lines.append(f"CTR: triggered non-target inputs certified correct beyond the joint norm (median "
                     f"{row['joint_trigger_norm_median'] or float('nan'):.3f} = sqrt(sum ||Delta_j||^2 + ||t||^2) over "
                     f"{row['poisoned_training_points']} poisoned points); ASR<=95%: whole-test-set bound on the "
                     "ensemble's ASR at probability 0.95 (Markov form: the members' noise is shared by all points); "
                     "CTR(test): clean inputs certified beyond ||t||.")
    return "\n".join(lines)


def check_ensemble_certify_config(cfg: EnsembleCertifyConfig) -> EnsembleCertifyConfig:
    """Validate settings early (before any vote is collected)."""

    check_alpha(cfg.alpha)
    check_choice(cfg.bound, BOUNDS, "bound")
    check_positive_int(cfg.batch_size, "batch_size")
    if cfg.max_points is not None:
        check_positive_int(cfg.max_points, "max_points")
    if any(not math.isfinite(r) or r < 0 for r in cfg.radii):
        raise InputError(f"radii must be finite and >= 0, got {cfg.radii}")
    return cfg


def train_ensemble_run(spec: EnsembleSpec, out: str | os.PathLike, *, n_jobs: int = 1, scheduler: Any = None,
                       device: str = "auto", progress: bool = True, log: Any = print) -> RunDirectory:
    """``certkit ensemble train``: train (or resume) the members (:func:`~certkit.runs.ensemble_train.train_ensemble`)
    and the noise-free baseline on the same poisoned data; returns the run directory."""
    run = train_ensemble(spec, out, n_jobs=n_jobs, scheduler=scheduler, device=device, progress=progress, log=log)
    train_undefended(run, spec, prepare_data(spec), device=device, progress=progress, log=log)
    return run


def certify_ensemble(run_dir: str | os.PathLike | RunDirectory, cfg: EnsembleCertifyConfig, *,
                     device: str = "auto", progress: bool = True, log: Any = print) -> str:
    """``certkit ensemble certify``: :func:`certify_ensemble_run` on a run directory; returns the report table."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    summary = certify_ensemble_run(run, check_ensemble_certify_config(cfg), device=device, progress=progress,
                                   log=log)
    return ensemble_report_table(summary)


def run_ensemble_demo(out: str | os.PathLike = ENSEMBLE_DEMO["out"], *,
                      sigmas: Sequence[float] = ENSEMBLE_DEMO["sigmas"], members: int = ENSEMBLE_DEMO["members"],
                      attack: str = "badnets", attack_params: dict[str, Any] | None = None,
                      poison_rate: float = ENSEMBLE_DEMO["poison_rate"], target: int = 0,
                      epochs: int = ENSEMBLE_DEMO["epochs"], alpha: float = ENSEMBLE_CERTIFY["alpha"], seed: int = 0,
                      max_points: int | None = None, n_jobs: int = ENSEMBLE_DEMO["n_jobs"], device: str = "cpu",
                      progress: bool = True, log: Any = print) -> str:
    """RAB on digits end to end, one run directory per sigma (``out`` itself for a single sigma, else
    ``out/sigma-S``): train M members and the undefended baseline, certify, report. Returns the reports."""
    sigmas = tuple(sigmas)
    if not sigmas:
        raise InputError("the ensemble demo needs at least one sigma")
    specs = [EnsembleSpec(dataset="digits", model="digits-cnn", attack=attack,
                          attack_params=dict(attack_params or {}), poison_rate=poison_rate, target=target,
                          members=members, sigma=sigma, epochs=epochs, seed=seed) for sigma in sigmas]
    cfg = check_ensemble_certify_config(EnsembleCertifyConfig(alpha=alpha, max_points=max_points, seed=seed))
    texts = []
    for spec in specs:
        sub = Path(out) if len(sigmas) == 1 else Path(out) / f"sigma-{spec.sigma:g}"
        t0 = time.perf_counter()
        run = train_ensemble_run(spec, sub, n_jobs=n_jobs, device=device, progress=progress, log=log)
        summary = certify_ensemble_run(run, cfg, device=device, progress=progress, log=log)
        run.record_timing("demo/total", time.perf_counter() - t0)
        texts.append(ensemble_report_table(summary)
                     + f"\n\nrun directory: {sub}  (summary.json, points.csv, votes/, plots/certified_accuracy.png)")
    return "\n\n".join(texts)
