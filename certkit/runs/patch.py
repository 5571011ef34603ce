"""Patch certificates (Mode C) of a run's models: de-randomized smoothing models trained with band or block
ablation, and PatchCleanser over any model of the run (undefended, noise-trained or purified).

A patch certificate at a triggered input ``x + t`` with the true label proves that *no* patch of side
``<= m`` anywhere, with any content, changes the prediction there: with ``m`` at least the trigger's side
(:meth:`certkit.backdoor.attacks.Attack.patch_side`) the real trigger provably fails, whatever the poisoning
was (reference: shared/reference/patch-certificates.md, section 0). The certificates are deterministic (no
alpha), so a fraction over the test set is an exact statement about those points. Global triggers (Blended,
WaNet, SIG) are not patches: their patch CTR is "not applicable", never 0.

Records: ``summary.json`` gets a ``"patch"`` list (one row per model and certificate setting; a second call
replaces the rows it recomputes and keeps the others), ``patch_points.csv`` one row per certified point,
``plots/patch_certified_accuracy.png`` (certified accuracy against patch side; l2 radii are never put on
this axis).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from certkit._validation import check_choice, check_float, check_positive_int, check_seed
from certkit.backdoor.prepare import PreparedData, prepare_data
from certkit.backdoor.training import train_model
from certkit.certify.patch import (
    RULES,
    THREAT_MODEL,
    CutoutTransform,
    PatchCertificate,
    derandomized_certify,
    patch_trigger_robustness,
    patchcleanser_certify,
    patchcleanser_masks,
)
from certkit.certify.plots import _pyplot, add_caption, save_figure, settings_caption, style
from certkit.errors import InputError
from certkit.runs.models import build_model_from_spec
from certkit.runs.rundir import RunDirectory
from certkit.runs.single import RUN_KIND, TrainConfig
from certkit.runs.tables import curve_cells, curve_header, number_or

__all__ = ["CERTIFICATES", "PatchCertifyConfig", "certify_patch_run", "certify_patches", "patch_table"]

#: the patch certificates a run can compute
CERTIFICATES = ("patch", "patchcleanser")


@dataclass
class PatchCertifyConfig:
    """What ``certkit certify RUN --certificate patch|patchcleanser`` computes.

    Attributes:
        certificate: ``"patch"`` (de-randomized smoothing of the run's ablation models) or ``"patchcleanser"``.
        models: model names (default: every ablation model for ``patch``; ``undefended`` for PatchCleanser).
        patch_sizes: patch sides to report (default: 1 .. the image side for ``patch``; required for
            PatchCleanser, whose certificate is per patch size).
        theta, rule: de-randomized smoothing's vote rule (softmax >= theta, or argmax).
        masks: PatchCleanser's masks per axis ``k`` (default: ``min(6, L - p + 1)``).
        cutout_finetune: PatchCleanser only: fine-tune each model this many epochs with Cutout (two masks of
            PatchCleanser's mask side per image; Xiang et al.'s recipe) on the defender's clean data (20% of
            the clean training set, the draw ``certkit purify`` uses), save it as ``<model>-cutout<E>`` and
            certify that copy (``None``: certify the model as it is).
        cutout_lr: Adam learning rate of the Cutout fine-tune.
        max_points, seed: a fixed-seed subsample of the test set (the same for every certificate).
        batch_size: rows per forward pass.
    """

    certificate: str = "patch"
    models: tuple[str, ...] | None = None
    patch_sizes: tuple[int, ...] | None = None
    theta: float = 0.2
    rule: str = "threshold"
    masks: int | None = None
    cutout_finetune: int | None = None
    cutout_lr: float = 5e-4
    max_points: int | None = None
    seed: int = 0
    batch_size: int = 512
    radii_note: str = field(default="patch side (pixels)", repr=False)

    def __post_init__(self) -> None:
        check_choice(self.certificate, CERTIFICATES, "certificate")
        if self.models is not None:
            self.models = tuple(str(m) for m in self.models)
        if self.patch_sizes is not None:
            self.patch_sizes = tuple(sorted({check_positive_int(p, "patch size") for p in self.patch_sizes}))
        if self.certificate == "patchcleanser" and (not self.patch_sizes or len(self.patch_sizes) != 1):
            raise InputError("PatchCleanser certifies one patch size at a time: give one --patch-size P")
        self.theta = check_float(self.theta, "theta", strict=True, maximum=1.0)
        check_choice(self.rule, RULES, "rule")
        if self.masks is not None:
            self.masks = check_positive_int(self.masks, "masks", minimum=2)
        if self.cutout_finetune is not None:
            if self.certificate != "patchcleanser":
                raise InputError("the Cutout fine-tune applies to --certificate patchcleanser only")
            self.cutout_finetune = check_positive_int(self.cutout_finetune, "cutout_finetune")
        self.cutout_lr = check_float(self.cutout_lr, "cutout_lr", strict=True)
        if self.max_points is not None:
            self.max_points = check_positive_int(self.max_points, "max_points")
        self.seed = check_seed(self.seed)
        self.batch_size = check_positive_int(self.batch_size, "batch_size")


def _models(run: RunDirectory, cfg: PatchCertifyConfig) -> list[str]:
    ablated = [m for m in run.models() if "ablation" in run.model_spec(m)]
    if cfg.models is None:
        names = ablated if cfg.certificate == "patch" else ["undefended"]
        if not names:
            raise InputError(f"run {run.path} has no model trained with ablation: train one with `certkit train "
                             "--ablation column --band B`, or use --certificate patchcleanser on any model")
        return names
    for m in cfg.models:
        if m not in run.manifest["models"]:
            raise InputError(f"model {m!r} is not in run {run.path}; available: {', '.join(run.models())}")
        if cfg.certificate == "patch" and m not in ablated:
            raise InputError(f"model {m!r} was not trained with ablation, so de-randomized smoothing cannot "
                             "certify it: use --certificate patchcleanser (any model) or train with --ablation")
        if cfg.certificate == "patchcleanser" and m in ablated:
            raise InputError(f"model {m!r} takes ablated (x, 1 - x) inputs; PatchCleanser needs a plain model")
    return list(cfg.models)


def _certify(model: Any, spec: dict[str, Any], x: torch.Tensor, y: torch.Tensor, cfg: PatchCertifyConfig,
             device: str) -> PatchCertificate:
    h, w = int(x.shape[2]), int(x.shape[3])
    if cfg.certificate == "patch":
        abl = spec["ablation"]
        sides = cfg.patch_sizes or tuple(range(1, min(h, w) + 1))
        return derandomized_certify(model, x, y, kind=abl["kind"], band=abl["band"], patch_sizes=sides,
                                    theta=cfg.theta, rule=cfg.rule, batch_size=cfg.batch_size, device=device)
    (p,) = cfg.patch_sizes
    k = cfg.masks if cfg.masks is not None else min(6, min(h, w) - p + 1)
    return patchcleanser_certify(model, x, y, patch_size=p, k=k, batch_size=cfg.batch_size, device=device)


def _row(name: str, cfg: PatchCertifyConfig, spec: dict[str, Any], clean: PatchCertificate,
         triggered: PatchCertificate, data: PreparedData, target: int, seconds: float) -> dict[str, Any]:
    side = data.attack.patch_side(data.input_shape)
    sides = list(clean.patch_sizes) if len(clean.patch_sizes) else [int(clean.meta.get("patch_size", 1))]
    non_target = triggered.label != target
    if side is None:
        ctr, note = None, f"not applicable: {data.attack.name} is a global trigger, not a patch"
    else:
        ctr, note = patch_trigger_robustness(triggered, side, target), (
            f"non-target triggered inputs predicted correctly and certified at patch side >= {side}")
    certificate = (f"{spec['ablation']['kind']}-smoothing" if cfg.certificate == "patch" else "patchcleanser")
    return {
        "model": name, "certificate": certificate, "unit": "patch side (pixels)", "threat_model": THREAT_MODEL,
        "settings": {k: v for k, v in clean.meta.items() if k in ("kind", "band", "theta", "rule", "patch_size",
                                                                  "k", "masks", "fill")},
        "n_clean": len(clean), "n_triggered": len(triggered), "clean_accuracy": clean.accuracy(),
        "certified_accuracy": {str(m): float(clean.certified_accuracy(m)) for m in sides},
        "triggered_accuracy": triggered.accuracy(),
        "asr": float(np.mean(triggered.prediction[non_target] == target)) if non_target.any() else float("nan"),
        "trigger_patch_side": side, "patch_ctr": ctr, "patch_ctr_meaning": note, "seconds": seconds,
    }


#: share of the clean training set the Cutout fine-tune uses (the defender's clean data of ``certkit purify``)
CUTOUT_CLEAN_FRACTION = 0.2


def _cutout_copy(run: RunDirectory, name: str, cfg: PatchCertifyConfig, data: PreparedData, train_cfg: TrainConfig,
                 device: str, log: Any) -> str:
    """``<name>-cutout<E>``: ``name`` fine-tuned ``cfg.cutout_finetune`` epochs with Cutout at PatchCleanser's
    mask side (trained and saved on the first call, reused afterwards)."""
    out = f"{name}-cutout{cfg.cutout_finetune}"
    if run.has_model(out):
        return out
    h, w = data.input_shape[1:]
    (p,) = cfg.patch_sizes
    k = cfg.masks if cfg.masks is not None else min(6, min(h, w) - p + 1)
    side = int(patchcleanser_masks((h, w), p, k)[0].sum(dim=1).max())  # the mask side along rows
    model = run.load_model(name, builder=build_model_from_spec, device="cpu")
    clean = data.defender_clean(CUTOUT_CLEAN_FRACTION)
    t0 = time.perf_counter()
    train_model(model, clean, epochs=cfg.cutout_finetune, lr=cfg.cutout_lr, batch_size=train_cfg.batch_size,
                seed=cfg.seed, device=device, progress=False, desc=f"cutout {name}",
                input_transform=CutoutTransform(side, cfg.seed, masks=2))
    seconds = time.perf_counter() - t0
    run.save_model(out, model.cpu(), run.model_spec(name), step=f"cutout/{out}", seconds=seconds, base=name,
                   epochs=cfg.cutout_finetune, lr=cfg.cutout_lr, mask_side=side, masks_per_image=2,
                   clean_samples=len(clean), clean_sha256=clean.sha256())
    log(f"[patch] {out}: {name} fine-tuned {cfg.cutout_finetune} epochs with Cutout ({side}x{side} masks) on "
        f"{len(clean)} clean samples ({seconds:.1f} s)")
    return out


def certify_patch_run(run: RunDirectory, cfg: PatchCertifyConfig, *, device: str = "cpu", progress: bool = True,
                      log: Any = print) -> list[dict[str, Any]]:
    """Patch-certify the chosen models of a single-model run on its clean and triggered test sets; write
    ``summary.json["patch"]``, ``patch_points.csv`` and ``plots/patch_certified_accuracy.png``."""
    if run.kind != RUN_KIND:
        raise InputError(f"{run.path} is a {run.kind!r} run; patch certificates work on single-model runs")
    train_cfg = TrainConfig.from_dict(run.config["train"])
    data = prepare_data(train_cfg)
    names = _models(run, cfg)
    test, trig = data.splits.test, data.triggered
    if cfg.max_points is not None and cfg.max_points < len(test):  # the same subsample as `certkit certify`
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(test))[: cfg.max_points])
        keep_t = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    else:
        keep, keep_t = np.arange(len(test)), np.arange(len(trig.x))
    rows, frames = [], []
    for name in names:
        if cfg.cutout_finetune:  # certify the Cutout fine-tuned copy (made once, kept in the run)
            name = _cutout_copy(run, name, cfg, data, train_cfg, device, log)
        spec = run.model_spec(name)
        model = run.load_model(name, builder=build_model_from_spec, device="cpu")
        t0 = time.perf_counter()
        clean = _certify(model, spec, test.x[keep], test.y[keep], cfg, device)
        triggered = _certify(model, spec, trig.x[keep_t], trig.y_true[keep_t], cfg, device)
        rows.append(_row(name, cfg, spec, clean, triggered, data, train_cfg.target, time.perf_counter() - t0))
        r = rows[-1]
        log(f"[patch] {name} ({r['certificate']}): clean acc {r['clean_accuracy']:.3f}  certified "
            + "  ".join(f"@{m} {a:.3f}" for m, a in r["certified_accuracy"].items())
            + f"  patch CTR {r['patch_ctr'] if r['patch_ctr'] is not None else 'n/a'}")
        for res, which, ids in ((clean, "clean", keep), (triggered, "triggered",
                                                          np.asarray(trig.indices)[keep_t] + len(test))):
            f = res.to_frame()
            f["index"] = ids
            f.insert(0, "set", which)
            f.insert(0, "certificate", r["certificate"])
            f.insert(0, "model", name)
            frames.append(f[[c for c in f.columns if c != "counts"]])
    summary = run.read_summary()
    redone = {(r["model"], r["certificate"]) for r in rows}
    summary["patch"] = [r for r in summary.get("patch", []) if (r["model"], r["certificate"]) not in redone] + rows
    new = pd.concat(frames, ignore_index=True)
    if "patch_points.csv" in run.manifest["files"]:
        old = run.read_frame("patch_points.csv")
        old = old[[(m, c) not in redone for m, c in zip(old["model"], old["certificate"])]]
        new = pd.concat([old, new], ignore_index=True)
    run.write_frame("patch_points.csv", new)
    run.write_json("summary.json", summary)
    _plot(run, summary["patch"], data)
    return rows


def certify_patches(run_dir: str | Path | RunDirectory, cfg: PatchCertifyConfig, *, device: str = "cpu",
                    progress: bool = True, log: Any = print) -> RunDirectory:
    """``certkit certify RUN --certificate patch|patchcleanser``: :func:`certify_patch_run` on a run directory."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    certify_patch_run(run, cfg, device=device, progress=progress, log=log)
    return run


def _plot(run: RunDirectory, rows: list[dict[str, Any]], data: PreparedData) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        sides = [int(m) for m in r["certified_accuracy"]]
        acc = list(r["certified_accuracy"].values())
        ax.plot(sides, acc, drawstyle="steps-post" if len(sides) > 1 else None, markersize=5, linewidth=1.6,
                label=f"{r['model']} ({r['certificate']})", **style(i))
    side = data.attack.patch_side(data.input_shape)
    if side is not None:
        ax.axvline(side, color="0.45", linestyle=":", linewidth=1.6, label=f"trigger side ({side} px)")
    ax.set_xlabel("patch side m (pixels): certified against any patch of side <= m")
    ax.set_ylabel("certified accuracy (clean test set)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    ax.set_title("Patch certificates (deterministic)")
    settings = "; ".join(dict.fromkeys(", ".join(f"{k}={v}" for k, v in r["settings"].items())
                                       for r in rows if r.get("settings")))
    add_caption(fig, settings_caption(dataset=data.splits.name, points=[r["n_clean"] for r in rows],
                                      extra=settings or None))
    return save_figure(ax, run.file("plots/patch_certified_accuracy.png"))


def patch_table(summary: dict[str, Any]) -> str:
    """Plain-text table of a run's patch certificates."""
    rows = summary.get("patch") or []
    if not rows:
        return ""
    sides = sorted({int(m) for r in rows for m in r["certified_accuracy"]})
    w = max([24] + [len(r["model"]) + 2 for r in rows])
    lines = [f"{'model':<{w}}{'certificate':>18}{'clean':>7}" + curve_header(sides) + f"{'ASR':>7}{'patch CTR':>11}"]
    for r in rows:
        lines.append(f"{r['model']:<{w}}{r['certificate']:>18}{r['clean_accuracy']:>7.3f}"
                     + curve_cells(r["certified_accuracy"], sides) + f"{r['asr']:>7.3f}" + number_or(r["patch_ctr"], 11))
    lines.append("@m: certified accuracy against any patch of side <= m (pixels; deterministic, exact for these "
                 "points); patch CTR: non-target triggered inputs predicted correctly and certified at a side "
                 ">= the trigger's (n/a for a global trigger).")
    return "\n".join(lines)
