"""Poisoning-count certificates of an aggregation ensemble run (Mode D): evaluate once, certify offline.

``certkit ensemble train --layout partition|finite-aggregation|bootstrap`` trains the members
(:mod:`certkit.runs.ensemble_train`, :mod:`certkit.runs.layouts`). This module then

1. **evaluates** every member once on the clean test set and on the triggered non-target test inputs and
   saves their outputs as ``member_outputs.npz`` (float32 logits ``[K, N, C]``; for members trained with an
   ablation the de-randomized smoothing vote counts instead, plus each member's prediction and largest
   certified patch side), with the members' and test sets' hashes and the layout in its ``meta``;
2. **certifies** from that file alone, without any model (:func:`certify_outputs`): DPA, DPA + ROE, FA,
   FA + ROE, bagging or the joint certificate of :mod:`certkit.certify.aggregation`, each refused for
   outputs of another layout, another set of members or another test set.

Results go to ``aggregation/<key>.csv`` (one row per point: set, index, label, prediction, radius, correct)
and to ``summary.json["aggregation"][<key>]`` (added to the certificates already there, never replacing
another key), with the plot ``plots/aggregation_certified_accuracy.png``. Radii are in each certificate's
own unit (:data:`~certkit.certify.aggregation.SYMMETRIC_UNIT` for DPA/ROE/FA/joint: a modified sample counts
2; :data:`~certkit.certify.aggregation.BAGGING_UNIT` for bagging), never mixed on one axis.

**CTR in samples.** A triggered non-target input ``x + t`` that the deployed aggregate classifies correctly
with radius ``>= 2 * n_poisoned`` (``n_poisoned`` for bagging) is provably not flipped by *any* poisoning of
``n_poisoned`` samples, the attack's own included (certkit's attacks modify existing samples). The DPA/FA/ROE
figure is deterministic and holds for every such point at once; bagging's holds with probability
``1 - alpha`` per point (``bonferroni=True``: for all points together); the joint certificate also covers
any patch of side ``<= patch_size`` at test time (docs/design.md section 1).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from certkit._validation import check_alpha, check_choice, check_positive_int
from certkit.backdoor.metrics import empirical_metrics
from certkit.backdoor.models import predict_logits
from certkit.backdoor.prepare import PreparedData, prepare_data
from certkit.certify.aggregation import (
    CERTIFICATE_LAYOUT,
    AggregationCertificate,
    Layout,
    bagging_certify,
    check_layout,
    dpa_certify,
    fa_certify,
    fa_roe_certify,
    joint_certify,
    poisoning_trigger_robustness,
    roe_certify,
)
from certkit.certify.patch import derandomized_certify
from certkit.certify.plots import _pyplot, add_caption, save_figure, settings_caption, style
from certkit.errors import InputError, RecordError
from certkit.io import sha256_tensor
from certkit.runs.ensemble_certify import EnsembleCertifyConfig, certify_ensemble
from certkit.runs.ensemble_train import (
    RUN_KIND,
    EnsembleSpec,
    announce_member_passes,
    member_name,
    read_layout,
)
from certkit.runs.models import load_run_model
from certkit.runs.rundir import RunDirectory
from certkit.runs.tables import curve_cells, curve_header, number_or

__all__ = [
    "CERTIFICATES",
    "CERTIFY_SETTINGS",
    "DEFAULT_CERTIFICATE",
    "MEMBER_OUTPUTS",
    "AggregationCertifyConfig",
    "aggregation_table",
    "certificate_of",
    "certify_aggregation",
    "certify_ensemble_any",
    "certify_outputs",
    "check_certify_settings",
    "evaluate_members",
    "read_member_outputs",
]

#: run-directory file of the members' saved outputs
MEMBER_OUTPUTS = "member_outputs.npz"
#: ``certkit ensemble certify --certificate`` values of aggregation runs
CERTIFICATES: tuple[str, ...] = tuple(CERTIFICATE_LAYOUT)
#: the certificate used when none is named, per layout
DEFAULT_CERTIFICATE = {"partition": "dpa", "finite-aggregation": "fa", "bootstrap": "bagging"}
#: radii (in the certificate's unit) of the certified-accuracy columns
DEFAULT_RADII: tuple[int, ...] = (0, 1, 2, 3, 5, 10, 15, 20)
_FORMAT = 1


@dataclass
class AggregationCertifyConfig:
    """How to certify an aggregation run.

    Attributes:
        certificate: one of :data:`CERTIFICATES`; ``None`` picks the layout's own (:data:`DEFAULT_CERTIFICATE`).
        alpha: bagging's error level in ``(0, 1)`` (the other certificates are deterministic).
        bonferroni: bagging: divide ``alpha`` by the number of points certified together (simultaneous).
        patch_size: joint: the patch side ``m`` each member must be certified at (default: the attack's
            trigger side).
        radii: radii (certificate unit) of the certified-accuracy columns.
        batch_size: rows per forward pass while the members are evaluated.
    """

    certificate: str | None = None
    alpha: float = 0.001
    bonferroni: bool = False
    patch_size: int | None = None
    radii: tuple[int, ...] = DEFAULT_RADII
    batch_size: int = 512

    def __post_init__(self) -> None:
        if self.certificate is not None:
            check_choice(self.certificate, CERTIFICATES, "certificate")
        self.alpha = check_alpha(self.alpha)
        if not isinstance(self.bonferroni, (bool, np.bool_)):
            raise InputError(f"bonferroni must be True or False, got {self.bonferroni!r}")
        if self.patch_size is not None:
            self.patch_size = check_positive_int(self.patch_size, "patch_size")
        self.radii = tuple(check_positive_int(r, "radii", minimum=0) for r in self.radii)
        if not self.radii:
            raise InputError("radii must hold at least one radius")
        self.batch_size = check_positive_int(self.batch_size, "batch_size")


# ------------------------------------------------------------------------------------------ evaluation
def _open(run_dir: RunDirectory | str | Path) -> tuple[RunDirectory, EnsembleSpec]:
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    if run.kind != RUN_KIND:
        raise RecordError(f"{run.path} is a {run.kind!r} run, not an ensemble run (`certkit ensemble certify` needs one)")
    spec = EnsembleSpec.from_run(run)
    return run, spec


def _expected_meta(run: RunDirectory, spec: EnsembleSpec, data: PreparedData) -> dict[str, Any]:
    names = [member_name(m) for m in range(spec.members)]
    missing = [nm for nm in names if nm not in run.manifest["models"]]
    if missing:
        raise RecordError(f"ensemble run {run.path} lacks {len(missing)} of {spec.members} members (first: "
                          f"{missing[0]}); resume training with `certkit ensemble train`")
    return {"format": _FORMAT, "layout": read_layout(run).to_dict(),
            "member_sha256": [run.manifest["models"][nm]["sha256"] for nm in names],
            "test_sha256": data.splits.test.sha256(), "triggered_sha256": sha256_tensor(data.triggered.x),
            "ablation": spec.ablation, "band": spec.band, "num_classes": data.num_classes}


def read_member_outputs(run_dir: RunDirectory | str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and ``meta`` of a run's ``member_outputs.npz`` (hash-checked against the manifest)."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    if MEMBER_OUTPUTS not in run.manifest["files"]:
        raise RecordError(f"{run.path} has no {MEMBER_OUTPUTS}; run `certkit ensemble certify` to evaluate the members")
    raw = run.read_bytes(MEMBER_OUTPUTS)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: np.array(z[k]) for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"]))
    except (ValueError, KeyError, OSError) as exc:
        raise RecordError(f"{run.path / MEMBER_OUTPUTS} is not a member-outputs file: {exc}") from exc
    return arrays, meta


def evaluate_members(run_dir: RunDirectory | str | Path, *, batch_size: int = 512, device: str = "cpu",
                     progress: bool = True, log: Callable[[str], Any] = print) -> tuple[dict[str, np.ndarray], dict]:
    """Every member's outputs on the clean and triggered test sets, computed once and saved as
    ``member_outputs.npz`` (reused while the members, the layout and the test sets are unchanged).

    Plain members: float32 logits. Members trained with an ablation: their de-randomized smoothing vote
    counts (float32; the argmax, smaller class first, is the member's prediction) plus ``*_pred`` and
    ``*_side`` (largest certified patch side) per member and point.
    """
    run, spec = _open(run_dir)
    if not spec.aggregation:
        raise InputError(f"{run.path} is a full-noise (RAB) ensemble: certify it with `certkit ensemble certify` "
                         "(l2 certificate); the aggregation certificates need a partition, finite-aggregation or "
                         "bootstrap layout")
    data = prepare_data(spec)
    want = _expected_meta(run, spec, data)
    if MEMBER_OUTPUTS in run.manifest["files"]:
        try:
            arrays, meta = read_member_outputs(run)
            if meta == json.loads(json.dumps(want)):
                log(f"[aggregation] reusing the saved outputs of {spec.members} members")
                return arrays, meta
        except RecordError as exc:
            log(f"[aggregation] re-evaluating the members: {exc}")
    sets = {"clean": data.splits.test.x, "triggered": data.triggered.x}
    announce_member_passes(run, spec, sum(len(x) for x in sets.values()), batch_size=batch_size, device=device,
                           log=log, what="evaluate members", note="the outputs are saved and reused")
    out: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    for m in tqdm(range(spec.members), desc="evaluate members", unit="member", disable=not progress,
                  dynamic_ncols=True):
        model = load_run_model(run, member_name(m), device="cpu")
        for which, x in sets.items():
            if spec.ablation is None:
                logits = predict_logits(model, x, batch_size=batch_size, device=device).float().numpy()
                out.setdefault(f"{which}_logits", []).append(logits)
                continue
            cert = derandomized_certify(model, x, kind=spec.ablation, band=spec.band, batch_size=batch_size,
                                        device=device)
            out.setdefault(f"{which}_logits", []).append(cert.counts.astype(np.float32))
            out.setdefault(f"{which}_pred", []).append(cert.prediction)
            out.setdefault(f"{which}_side", []).append(cert.certified_side)
    arrays = {k: np.stack(v).astype(np.float32 if k.endswith("logits") else np.int64) for k, v in out.items()}
    arrays["clean_labels"] = data.splits.test.y.numpy().astype(np.int64)
    arrays["triggered_labels"] = data.triggered.y_true.numpy().astype(np.int64)
    arrays["triggered_index"] = np.asarray(data.triggered.indices, dtype=np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(want)), **arrays)
    run.write_bytes(MEMBER_OUTPUTS, buf.getvalue())
    seconds = time.perf_counter() - t0
    run.record_timing("aggregation/evaluate", seconds)
    run.mark_done("aggregation/evaluate", members=spec.members, sha256=run.manifest["files"][MEMBER_OUTPUTS]["sha256"],
                  seconds=seconds)
    log(f"[aggregation] evaluated {spec.members} members on {len(data.splits.test)} clean and "
        f"{len(data.triggered)} triggered inputs in {seconds:.1f} s")
    return arrays, json.loads(json.dumps(want))


# ------------------------------------------------------------------------------------------ certificates
def certify_outputs(arrays: dict[str, np.ndarray], layout: Layout, certificate: str, which: str = "clean", *,
                    alpha: float = 0.001, n_test: int | None = None,
                    patch_size: int | None = None) -> AggregationCertificate:
    """One certificate of saved member outputs (``which``: ``"clean"`` or ``"triggered"``), refused unless
    ``layout`` is the one ``certificate`` is sound for (:func:`~certkit.certify.aggregation.check_layout`).

    >>> logits = np.eye(3, dtype=np.float32)[[0, 0, 0, 1, 2]][:, None, :]          # 5 members, 1 point
    >>> cert = certify_outputs({"clean_logits": logits, "clean_labels": np.array([0])}, Layout.dpa(5), "dpa")
    >>> int(cert.prediction[0]), int(cert.radius[0])
    (0, 1)
    """
    check_choice(certificate, CERTIFICATES, "certificate")
    check_choice(which, ("clean", "triggered"), "which")
    layout = check_layout(layout, certificate)
    logits, labels = arrays[f"{which}_logits"], arrays[f"{which}_labels"]
    if certificate == "dpa":
        return dpa_certify(logits, labels, layout=layout)
    if certificate == "roe":
        return roe_certify(logits, labels, layout=layout)
    if certificate == "fa":
        return fa_certify(logits, layout, labels)
    if certificate == "fa-roe":
        return fa_roe_certify(logits, layout, labels)
    if certificate == "bagging":
        votes = logits.argmax(axis=2)                                            # [K, N]
        c = logits.shape[2]
        counts = np.stack([(votes == j).sum(axis=0) for j in range(c)], axis=1)
        return bagging_certify(counts, n=layout.n_train, k=layout.bootstrap_size, alpha=alpha, num_classes=c,
                               n_test=n_test, labels=labels, layout=layout)
    if f"{which}_side" not in arrays:
        raise InputError("the joint certificate needs members trained with an ablation (`certkit ensemble train "
                         "--layout partition --ablation column --band B`); these members have none")
    if patch_size is None:
        raise InputError("the joint certificate needs patch_size, the patch side every member must be certified at")
    votes = np.where(arrays[f"{which}_side"] >= patch_size, arrays[f"{which}_pred"], -1)
    cert = joint_certify(votes, logits.shape[2], labels, layout=layout)
    cert.meta["patch_size"] = int(patch_size)
    return cert


def _key(certificate: str, cfg: AggregationCertifyConfig, patch_size: int | None) -> str:
    if certificate == "joint":
        return f"joint-m{patch_size}"
    if certificate == "bagging":
        return f"bagging-a{cfg.alpha:g}" + ("-bonferroni" if cfg.bonferroni else "")
    return certificate


def _frame(clean: AggregationCertificate, trig: AggregationCertificate, trig_index: np.ndarray) -> pd.DataFrame:
    frames = []
    for which, cert, index in (("clean", clean, np.arange(len(clean))), ("triggered", trig, trig_index)):
        frames.append(pd.DataFrame({"set": which, "index": index, "label": cert.label, "prediction": cert.prediction,
                                    "radius": cert.radius, "correct": cert.correct}))
    return pd.concat(frames, ignore_index=True)


def certify_aggregation(run_dir: RunDirectory | str | Path, cfg: AggregationCertifyConfig | None = None, *,
                        device: str = "cpu", progress: bool = True,
                        log: Callable[[str], Any] = print) -> dict[str, Any]:
    """``certkit ensemble certify RUN --certificate C`` on an aggregation run: evaluate the members (once),
    certify the clean and triggered test sets, add the row to ``summary.json["aggregation"]``, write the
    per-point CSV and the plot. Returns the row."""
    cfg = cfg or AggregationCertifyConfig()
    run, spec = _open(run_dir)
    if not spec.aggregation:
        want = cfg.certificate or "dpa"
        raise InputError(f"the {want!r} certificate is valid only for a {CERTIFICATE_LAYOUT[want]!r} layout, but "
                         f"{run.path} is a 'full-noise' (RAB) ensemble; refusing (certify it without --certificate "
                         "for its l2 certificate)")
    certificate = cfg.certificate or DEFAULT_CERTIFICATE[spec.layout]
    layout = check_layout(read_layout(run), certificate)  # before any evaluation: a wrong layout costs nothing
    if certificate == "joint" and spec.ablation is None:
        raise InputError(f"the joint certificate needs members trained with an ablation; {run.path} was trained "
                         "without (`certkit ensemble train --layout partition --ablation column --band B`)")
    data = prepare_data(spec)
    trigger_side = data.attack.patch_side(data.input_shape)
    patch_size = cfg.patch_size if cfg.patch_size is not None else trigger_side
    if certificate == "joint" and patch_size is None:
        raise InputError(f"the {data.attack.name} trigger is not a patch: give the joint certificate a patch_size")
    arrays, meta = evaluate_members(run, batch_size=cfg.batch_size, device=device, progress=progress, log=log)
    if meta["layout"] != layout.to_dict():
        raise RecordError(f"{MEMBER_OUTPUTS} of {run.path} comes from another layout than the run's layout.json")
    t0 = time.perf_counter()
    n_all = len(arrays["clean_labels"]) + len(arrays["triggered_labels"])
    kw = {"alpha": cfg.alpha, "n_test": n_all if cfg.bonferroni else None, "patch_size": patch_size}
    clean = certify_outputs(arrays, layout, certificate, "clean", **kw)
    trig = certify_outputs(arrays, layout, certificate, "triggered", **kw)
    seconds = time.perf_counter() - t0
    # the ASR of the deployed aggregate: the joint certificate's verified-votes plurality is not what is
    # deployed (its members vote their plain smoothed prediction), so its ASR is DPA's plurality
    deployed = dpa_certify(arrays["triggered_logits"], arrays["triggered_labels"]) if certificate == "joint" else trig
    n_poisoned = int(len(data.poisoned.poison_indices))
    target = spec.target
    ctr = poisoning_trigger_robustness(trig, n_poisoned, target) if len(trig) else float("nan")
    if certificate == "joint" and trigger_side is not None and patch_size < trigger_side:
        ctr = float("nan")  # the members are not certified at the trigger's size: the joint CTR does not apply
    per_sample = 1 if certificate == "bagging" else 2
    key = _key(certificate, cfg, patch_size)
    row = {
        "certificate": certificate, "key": key, "unit": clean.unit, "layout": layout.kind, "k": layout.k,
        "d": layout.d, "versions": layout.versions, "members": spec.members, "n_clean": len(clean),
        "n_triggered": len(trig),
        "clean_accuracy": float(clean.correct.mean()),
        "asr": float(np.mean(deployed.prediction == target)) if len(trig) else float("nan"),
        "certified_accuracy": {str(r): float(a) for r, a in
                               zip(cfg.radii, np.atleast_1d(clean.certified_accuracy(list(cfg.radii))))},
        "median_radius": float(np.median(clean.certified_radius)),
        "n_poisoned": n_poisoned, "poisoned_in_unit": per_sample * n_poisoned,
        "ctr_samples": ctr, "seconds": seconds,
        "deterministic": certificate != "bagging",
        "alpha": cfg.alpha if certificate == "bagging" else None,
        "bonferroni": cfg.bonferroni if certificate == "bagging" else None,
        "patch_size": patch_size if certificate == "joint" else None,
        "trigger_side": trigger_side,
        "threat_model": _threat_model(certificate, cfg, patch_size),
    }
    run.write_frame(f"aggregation/{key}.csv", _frame(clean, trig, arrays["triggered_index"]))
    summary = run.read_summary() if "summary.json" in run.manifest["files"] else {}
    summary.setdefault("kind", RUN_KIND)
    summary["attack"] = {**data.attack.config(), "target": target, "poison_rate": spec.poison_rate,
                         "n_poisoned": n_poisoned, "patch_side": trigger_side}
    summary["dataset"] = {"name": data.splits.name, "n_train": len(data.splits.train),
                          "n_test": len(data.splits.test), "num_classes": data.num_classes}
    summary["layout"] = layout.to_dict()
    if run.has_model("undefended") and "undefended" not in summary:  # the baseline trained with the members
        summary["undefended"] = empirical_metrics(run.load_model("undefended"), data.splits.test.x,
                                                  data.splits.test.y, data.triggered, device=device).to_dict()
    summary.setdefault("aggregation", {})[key] = row
    run.write_json("summary.json", summary)
    _plot(run, summary["aggregation"], data)
    run.record_timing(f"aggregation/{key}", seconds)
    log(f"[aggregation] {key}: clean acc {row['clean_accuracy']:.3f}  median radius {row['median_radius']:g}  "
        f"CTR(samples) {ctr:.3f} at {row['poisoned_in_unit']} ({clean.unit})")
    return row


def _threat_model(certificate: str, cfg: AggregationCertifyConfig, patch_size: int | None) -> str:
    if certificate == "bagging":
        scope = "for all certified points together" if cfg.bonferroni else "per point"
        return (f"any modification, insertion or deletion of <= r training samples; holds with probability >= "
                f"{1 - cfg.alpha:g} {scope} over the bootstrap draws")
    base = "any insertion or deletion of training samples totalling <= r (a modified sample counts 2); deterministic"
    if certificate == "joint":
        return base + f", together with any test-time patch of side <= {patch_size} pixels"
    return base


def _plot(run: RunDirectory, rows: dict[str, dict[str, Any]], data: PreparedData) -> Path:
    plt = _pyplot()
    units = sorted({r["unit"] for r in rows.values()})
    fig, axes = plt.subplots(1, len(units), figsize=(6.5 * len(units), 4.5), squeeze=False)
    keys = list(rows)  # one style per certificate, the same in every panel
    for ax, unit in zip(axes[0], units):
        mine = [r for r in rows.values() if r["unit"] == unit]
        for r in mine:
            radii = [int(x) for x in r["certified_accuracy"]]
            ax.plot(radii, list(r["certified_accuracy"].values()), drawstyle="steps-post", markersize=5,
                    linewidth=1.6, label=f"{r['key']} (k={r['k'] or r['members']}" + (f"x{r['versions']}" if r.get("versions") else "") + ")", **style(keys.index(r["key"])))
        need = mine[0]["poisoned_in_unit"]
        ax.axvline(need, color="0.45", linestyle=":", linewidth=1.6,
                   label=f"this attack: {mine[0]['n_poisoned']} poisoned = {need}")
        ax.set_xlabel(f"r ({unit})")
        ax.set_ylabel("certified accuracy (clean test set)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Poisoning-count certificates")
    alphas = [r["alpha"] for r in rows.values() if r.get("alpha") is not None]
    add_caption(fig, settings_caption(
        dataset=data.splits.name, points=[r["n_clean"] for r in rows.values()], alpha=alphas or None,
        extra="bagging: holds with probability >= 1 - α" if alphas else "deterministic"))
    return save_figure(axes[0][0], run.file("plots/aggregation_certified_accuracy.png"))


def aggregation_table(summary: dict[str, Any]) -> str:
    """Plain-text table of a run's aggregation certificates (``summary.json["aggregation"]``)."""
    rows = list((summary.get("aggregation") or {}).values())
    if not rows:
        return ""
    radii = sorted({int(r) for row in rows for r in row["certified_accuracy"]})
    w = max([14] + [len(r["key"]) + 2 for r in rows])
    lines = [f"{'certificate':<{w}}{'k':>6}{'clean':>7}" + curve_header(radii)
             + f"{'median':>8}{'ASR':>7}{'CTR':>7}{'at':>6}"]
    for r in rows:
        k = f"{r['k']}x{r['versions']}" if r.get("versions") else str(r["k"] or r["members"])
        lines.append(f"{r['key']:<{w}}{k:>6}{r['clean_accuracy']:>7.3f}"
                     + curve_cells(r["certified_accuracy"], radii) + f"{r['median_radius']:>8g}{r['asr']:>7.3f}"
                     + number_or(r["ctr_samples"], 7) + f"{r['poisoned_in_unit']:>6}")
    lines.append("@r: certified accuracy at r in each certificate's unit (dpa/roe/fa/joint: inserted + deleted "
                 "samples, a modified sample counts 2; bagging: modified samples, probabilistic); CTR: non-target "
                 "triggered inputs predicted correctly with radius >= the attack's poisoned count ('at', same unit)."
                 + (" k: partitions (KxV: V seeded versions per partition, averaged, DPA*)."
                    if any(r.get("versions") for r in rows) else ""))
    return "\n".join(lines)


#: the ``certkit ensemble certify`` settings each certificate uses (any other given setting is refused)
CERTIFY_SETTINGS: dict[str, frozenset[str]] = {
    "l2": frozenset({"alpha", "bound", "selection_correction", "max_points", "batch_size"}),
    "bagging": frozenset({"alpha", "bonferroni", "batch_size"}),
    "joint": frozenset({"patch_size", "batch_size"}),
    **{c: frozenset({"batch_size"}) for c in ("dpa", "roe", "fa", "fa-roe")},
}


def check_certify_settings(certificate: str, given: Iterable[str], flag: Callable[[str], str] = str) -> None:
    """Refuse settings the certificate does not use (an :class:`InputError` naming them and the certificates
    that do), instead of silently ignoring them (e.g. ``--max-points`` on a DPA run, which certifies every
    saved point). ``flag`` turns a setting name into what the user typed.

    >>> check_certify_settings("dpa", ["batch_size"])
    >>> check_certify_settings("dpa", ["max_points", "alpha"])
    Traceback (most recent call last):
    ...
    certkit.errors.InputError: alpha, max_points do not apply to the 'dpa' certificate (alpha: bagging, l2; max_points: l2)
    """
    unused = sorted(set(given) - CERTIFY_SETTINGS[certificate])
    if unused:
        users = "; ".join(f"{flag(u)}: {', '.join(sorted(c for c, s in CERTIFY_SETTINGS.items() if u in s))}"
                          for u in unused)
        raise InputError(f"{', '.join(flag(u) for u in unused)} do{'es' if len(unused) == 1 else ''} not apply to "
                         f"the {certificate!r} certificate ({users})")


def certificate_of(run_dir: RunDirectory | str | Path, certificate: str | None = None) -> str:
    """The certificate ``certkit ensemble certify`` would compute on ``run_dir``: ``certificate`` when given,
    else the run's own (``l2`` for a full-noise run, the layout's default otherwise)."""
    if certificate is not None:
        return check_choice(certificate, ("l2", *CERTIFICATES), "certificate")
    _, spec = _open(run_dir)
    return DEFAULT_CERTIFICATE[spec.layout] if spec.aggregation else "l2"


def certify_ensemble_any(run_dir: RunDirectory | str | Path, certificate: str | None = None, *,
                         l2: EnsembleCertifyConfig | None = None, aggregation: AggregationCertifyConfig | None = None,
                         device: str = "cpu", progress: bool = True, log: Callable[[str], Any] = print) -> str:
    """``certkit ensemble certify``: the l2 certificate of a full-noise (RAB) run
    (:func:`~certkit.runs.ensemble_certify.certify_ensemble`) or a poisoning-count certificate of an
    aggregation run (:func:`certify_aggregation`); ``certificate=None`` picks the run's own. Returns the
    report table. A certificate of another layout is refused, naming both."""
    run, spec = _open(run_dir)
    if certificate is not None:
        check_choice(certificate, ("l2", *CERTIFICATES), "certificate")
    if not spec.aggregation:
        if certificate not in (None, "l2"):
            raise InputError(f"the {certificate!r} certificate is valid only for a "
                             f"{CERTIFICATE_LAYOUT[certificate]!r} layout, but {run.path} is a 'full-noise' (RAB) "
                             "ensemble; refusing (its certificate is 'l2')")
        return certify_ensemble(run, l2 or EnsembleCertifyConfig(), device=device, progress=progress, log=log)
    if certificate == "l2":
        raise InputError(f"the 'l2' certificate is valid only for a 'full-noise' layout, but {run.path} has a "
                         f"{spec.layout!r} layout; refusing (use --certificate "
                         f"{DEFAULT_CERTIFICATE[spec.layout]})")
    cfg = aggregation or AggregationCertifyConfig()
    if certificate is not None:
        cfg = replace(cfg, certificate=certificate)
    certify_aggregation(run, cfg, device=device, progress=progress, log=log)
    return aggregation_table(run.read_summary())
