"""Comparison cells of the patch (Mode C) and poisoning-count (Mode D) certificates.

* PatchCleanser columns of the ``undefended`` and purifier cells (``spec.patchcleanser``): the defended model,
  certified by double masking (Xiang et al., USENIX Security 2022) at the trigger's patch side on the clean
  and triggered test inputs: ``patch_ca`` (clean points certified correct) and ``patch_ctr``.
* ``ds-column`` / ``ds-block``: a de-randomized smoothing model (Levine & Feizi, NeurIPS 2020) trained on the
  poisoned data with seeded column (block) ablation of width ``spec.ablation_band`` (side ``spec.block_band``),
  certified on every
  ablation: its vote accuracy and ASR, ``patch_ca`` and ``patch_ctr``.
* ``dpa`` / ``dpa-roe``: one Deep Partition Aggregation ensemble per attack (``spec.dpa_k`` hash partitions,
  :mod:`certkit.runs.aggregation`, shared by both cells), certified by DPA or DPA + Run-Off Election:
  ``ctr_samples`` (non-target triggered inputs certified correct at the attack's poisoned count, a modified
  sample counting 2).
* ``dpa-joint``: the same layout with column-ablated members; the joint certificate covers the poisoning and
  any patch of the trigger's side together (patch triggers only).

Patch figures are "not applicable" (empty, with the reason in ``note``) for global triggers, never 0.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from certkit.backdoor.metrics import defense_effectiveness_rating
from certkit.certify.patch import (
    derandomized_certify,
    patch_trigger_robustness,
    patchcleanser_certify,
)
from certkit.errors import InputError
from certkit.runs.aggregation import AggregationCertifyConfig, certify_aggregation
from certkit.runs.compare.spec import CompareSpec
from certkit.runs.ensemble_train import EnsembleSpec, train_ensemble
from certkit.runs.models import load_run_model, train_ablated_model
from certkit.runs.rundir import RunDirectory

__all__ = ["ABLATION_CELLS", "AGGREGATION_CELLS", "ablation_cell", "aggregation_cell", "patchcleanser_columns"]

#: de-randomized smoothing cells and their ablation kind
ABLATION_CELLS = {"ds-column": "column", "ds-block": "block"}
#: aggregation cells and their certificate
AGGREGATION_CELLS = {"dpa": "dpa", "dpa-roe": "roe", "dpa-joint": "joint"}


def _trigger_side(data: Any) -> int | None:
    return data.attack.patch_side(data.splits.input_shape)


def _not_a_patch(data: Any) -> str:
    return f"patch CTR not applicable: {data.attack.name} is a global trigger, not a patch"


def patchcleanser_columns(spec: CompareSpec, model: torch.nn.Module, data: Any, device: str) -> dict[str, Any]:
    """PatchCleanser at the trigger's patch side: ``patch_ca``, ``patch_ctr``, ``patch_certificate`` (empty
    figures and a ``patch_note`` for a global trigger)."""
    side = _trigger_side(data)
    if side is None:
        return {"patch_certificate": "patchcleanser", "patch_ctr": None, "patch_ca": None,
                "patch_note": _not_a_patch(data)}
    test, keep, trig = data.splits.test, data.keep, data.triggered
    h, w = data.splits.input_shape[1:]
    k = spec.patchcleanser_masks or min(6, min(h, w) - side + 1)
    t0 = time.perf_counter()
    clean = patchcleanser_certify(model, test.x[keep], test.y[keep], patch_size=side, k=k, device=device)
    keep_t = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    triggered = patchcleanser_certify(model, trig.x[keep_t], trig.y_true[keep_t], patch_size=side, k=k,
                                      device=device)
    return {"patch_certificate": "patchcleanser", "patch_ca": float(clean.certified_accuracy(side)),
            "patch_ctr": patch_trigger_robustness(triggered, side, spec.target),
            "patch_note": f"PatchCleanser, patch side {side}, {clean.meta['num_masks']} masks",
            "patch_s": time.perf_counter() - t0}


def ablation_cell(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, data: Any, before: Any,
                  device: str) -> dict[str, Any]:
    """A de-randomized smoothing cell: train on the poisoned data with ablation, certify every ablation."""
    kind = ABLATION_CELLS[cell["defense"]]
    name = f"{cell['attack_key']}__{cell['defense']}"
    h, w = data.splits.input_shape[1:]
    band = spec.ablation_band if kind == "column" else spec.block_band
    if band > (w if kind == "column" else min(h, w)):
        raise InputError(f"{'ablation_band' if kind == 'column' else 'block_band'} {band} is larger than the "
                         f"{h}x{w} images")
    t0 = time.perf_counter()
    if run.has_model(name):
        model = load_run_model(run, name)
    else:
        model, _ = train_ablated_model(spec.model, data.prepared, kind, band, epochs=spec.epochs, lr=spec.lr,
                                       batch_size=spec.batch_size, seed=spec.seed, device=device, desc=f"train {name}")
        run.save_model(name, model.cpu(), model.certkit_spec)
    test, keep, trig = data.splits.test, data.keep, data.triggered
    keep_t = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    clean = derandomized_certify(model, test.x[keep], test.y[keep], kind=kind, band=band, device=device)
    triggered = derandomized_certify(model, trig.x[keep_t], trig.y_true[keep_t], kind=kind, band=band,
                                     device=device)
    ca = clean.accuracy()
    asr = float(np.mean(triggered.prediction == spec.target)) if len(triggered) else float("nan")
    side = _trigger_side(data)
    row = {"kind": "patch-smoothing", "ca_before": before.clean_accuracy, "asr_before": before.attack_success_rate,
           "budget": {"ablation": kind, "band": band, "epochs": spec.epochs}, "ca": ca, "asr": asr, "ra": None,
           "der": defense_effectiveness_rating(before.clean_accuracy, before.attack_success_rate, ca, asr),
           "patch_certificate": f"{kind}-smoothing", "wall_train_certify_s": time.perf_counter() - t0}
    if side is None:
        row.update(patch_ctr=None, patch_ca=None, patch_note=_not_a_patch(data))
    else:
        row.update(patch_ctr=patch_trigger_robustness(triggered, side, spec.target),
                   patch_ca=float(clean.certified_accuracy(side)),
                   patch_note=f"{kind} smoothing, band {band}, certified at the trigger's side {side}")
    return {**row, "status": "ok", "reason": ""}


def aggregation_cell(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, data: Any, before: Any,
                     device: str) -> dict[str, Any]:
    """A DPA / DPA + ROE / joint cell: one partition ensemble per attack (shared by ``dpa`` and ``dpa-roe``),
    certified offline from its saved member outputs."""
    certificate = AGGREGATION_CELLS[cell["defense"]]
    joint = certificate == "joint"
    side = _trigger_side(data)
    if joint and side is None:
        return {"kind": "aggregation", "status": "skipped", "reason": _not_a_patch(data) + " (joint certificate)"}
    espec = EnsembleSpec(dataset=spec.dataset, data_root=spec.data_root, model=spec.model, attack=cell["attack"],
                         attack_params=cell["attack_params"], poison_rate=cell["poison_rate"], target=spec.target,
                         layout="partition", k=spec.dpa_k, epochs=spec.dpa_epochs, lr=spec.lr,
                         batch_size=spec.dpa_batch_size, seed=spec.seed,
                         **({"ablation": "column", "band": spec.ablation_band} if joint else {}))
    sub_dir = run.path / "ensembles" / f"{cell['attack_key']}__{'dpa-joint' if joint else 'dpa'}"
    t0 = time.perf_counter()
    sub = train_ensemble(espec, sub_dir, n_jobs=1, device=device, progress=False, log=lambda *_: None)
    row = certify_aggregation(sub, AggregationCertifyConfig(certificate=certificate, patch_size=side),
                              device=device, progress=False, log=lambda *_: None)
    ca, asr = row["clean_accuracy"], row["asr"]
    return {
        "kind": "aggregation", "ca_before": before.clean_accuracy, "asr_before": before.attack_success_rate,
        "budget": {"layout": "partition", "k": spec.dpa_k, "epochs": spec.dpa_epochs,
                   "batch_size": spec.dpa_batch_size, **({"ablation": "column", "band": spec.ablation_band}
                                                         if joint else {})},
        "ca": ca, "asr": asr, "ra": None,
        "der": defense_effectiveness_rating(before.clean_accuracy, before.attack_success_rate, ca, asr),
        "ctr_samples": row["ctr_samples"], "poisoned_in_unit": row["poisoned_in_unit"],
        "median_radius": row["median_radius"], "sample_certified_accuracy": row["certified_accuracy"],
        "note": f"{row['key']}: radius in {row['unit']}; CTR at {row['poisoned_in_unit']} = the attack's "
                f"{row['n_poisoned']} modified samples" + (f"; members certified at patch side {side}" if joint else ""),
        "wall_train_certify_s": time.perf_counter() - t0,
        "status": "ok", "reason": "",
    }
