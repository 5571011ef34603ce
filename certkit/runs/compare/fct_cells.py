"""Comparison cell of FCT's training-time defense D-ST (``fct-st``; Chen, Wu, Wang, NeurIPS 2022).

Unlike a purifier cell it does not start from the backdoored model: :func:`certkit.runs.fct.train_fct_st` splits
the *poisoned training set* with the ``fct-br`` cell's SD settings and trains a model of the spec's architecture
from scratch (contrastive pre-training on all samples, linear head with the mixed cross-entropy), the same
training as ``certkit train --defense fct-st``. The model is saved as ``models/<attack_key>__fct-st.pt`` and then
measured like a purified model (CA / ASR / RA, re-activation, smoothing, PatchCleanser); the row's ``split``
holds the split's sizes, thresholds and its precision / recall against the true poison indices (a diagnostic
the method never sees).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from certkit.backdoor.models import build_model
from certkit.errors import InputError
from certkit.runs.compare.spec import CompareSpec
from certkit.runs.fct import SD_SETTINGS, fct_st_settings, train_fct_st
from certkit.runs.models import load_run_model
from certkit.runs.rundir import RunDirectory

__all__ = ["TRAINING_CELLS", "fct_st_model"]

#: comparison cells that train their own model from the poisoned data
TRAINING_CELLS = ("fct-st",)


def fct_st_model(spec: CompareSpec, cell: Mapping[str, Any], run: RunDirectory, data: Any, device: str,
                 sd_params: Mapping[str, Any]) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The ``fct-st`` cell's model (trained once, then loaded from the run), its budget and extra row fields.

    ``sd_params``: the ``fct-br`` purifier's parameters (those of :func:`purifiers.fct.sd_split` are used);
    ``spec.purifier_params["fct-st"]``: keyword arguments of :func:`purifiers.fct.fct_secure_train`."""
    try:
        settings = fct_st_settings({"sd": {k: v for k, v in sd_params.items() if k in SD_SETTINGS},
                                    "st": spec.purifier_params.get("fct-st", {})}, dataset=None)
    except InputError as exc:
        raise InputError(f"purifier_params['fct-st'] (SD settings from purifier_params['fct-br']): {exc}") from None
    train = data.poisoned.dataset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        template = build_model(spec.model, num_classes=data.splits.num_classes, input_shape=data.splits.input_shape,
                               mean=data.splits.mean, std=data.splits.std)
    t0 = time.perf_counter()
    name = f"{cell['attack_key']}__fct-st"
    saved = load_run_model(run, name) if run.has_model(name) else None
    model, split = train_fct_st(template, train, settings, seed=spec.seed, device=device, model=saved)
    if saved is None:
        run.save_model(name, model.cpu(), template.certkit_spec)
    return model, settings, {"split": split.record(data.poisoned.poison_indices),
                             "purify_s": time.perf_counter() - t0}
