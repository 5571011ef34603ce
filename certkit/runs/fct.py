"""FCT in runs (Chen, Wu, Wang, "Effective Backdoor Defense by Exploiting Sensitivity of Poisoned Samples",
NeurIPS 2022): the settings of the training-time defense D-ST (``certkit train --defense fct-st`` and the
compare grid's ``fct-st`` cell), its training from the poisoned set, and the stored record of an SD split
(D-ST's and the ``fct-br`` purifier's).

D-ST does not start from a backdoored model: the SD module splits the *poisoned training set*
(:func:`purifiers.fct.sd_split`), then :func:`purifiers.fct.fct_secure_train` trains a model of the run's
architecture from scratch. Settings are ``{"sd": {...}, "st": {...}}``: keyword arguments of those two
functions. On the embedded ``digits`` the defaults are the digits-scale ones of
:data:`certkit.runs.defaults.FCT_SD_DIGITS` / :data:`~certkit.runs.defaults.FCT_ST_DIGITS` (the official budgets
collapse there, see their comments); on every other dataset the official defaults.

>>> s = fct_st_settings({"st": {"epochs": 5}}, dataset="mnist")
>>> s["st"]["epochs"], s["st"]["lr"], s["sd"]["sd_epochs"]
(5, 0.5, 2)
>>> fct_st_settings({"st": {"epoch": 5}}, dataset="mnist")
Traceback (most recent call last):
...
certkit.errors.InputError: unknown fct-st st setting(s) epoch; valid: batch_size, clean_positives_only, crop_scale, epochs, flip, head_batch_size, head_epochs, head_lr, lambda_p, lr, momentum, proj_dim, temperature, weight_decay
"""

from __future__ import annotations

import copy
import inspect
import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from certkit.errors import InputError
from certkit.runs.defaults import FCT_SD_DIGITS, FCT_ST_DIGITS
from certkit.runs.rundir import RunDirectory
from purifiers.fct import (
    ALPHA_C,
    ALPHA_P,
    FCTBackdoorRemoval,
    FCTSplit,
    check_secure_train_settings,
    check_split_sizes,
    fct_secure_train,
    sd_split,
    split_sizes,
)

__all__ = ["SD_SETTINGS", "ST_SETTINGS", "check_fct_st_params", "check_fct_st_size", "fct_st_settings",
           "fct_st_work", "save_split", "split_line", "train_fct_st"]

_NOT_SETTINGS = {"template", "train_data", "split", "seed", "device", "log", "progress"}
#: the settings of the SD module (:func:`purifiers.fct.sd_split`) a run may give
SD_SETTINGS: frozenset[str] = frozenset(inspect.signature(sd_split).parameters) - _NOT_SETTINGS
#: the settings of D-ST's training (:func:`purifiers.fct.fct_secure_train`) a run may give
ST_SETTINGS: frozenset[str] = frozenset(inspect.signature(fct_secure_train).parameters) - _NOT_SETTINGS


def _checked(part: str, given: Any, valid: frozenset[str]) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise InputError(f"fct-st {part} settings must be a JSON object of parameter: value, got "
                         f"{type(given).__name__}")
    unknown = sorted(set(given) - valid)
    if unknown:
        raise InputError(f"unknown fct-st {part} setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    try:  # the values, with the checks of the functions that will receive them
        if part == "sd":
            FCTBackdoorRemoval(**given)
        else:
            check_secure_train_settings(**given)
    except InputError as exc:
        raise InputError(f"defense_params {part!r}: {exc}") from None
    return copy.deepcopy(dict(given))


def check_fct_st_params(params: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``params`` as ``{"sd": ..., "st": ...}`` (each optional in the input), every key and value checked
    against :func:`purifiers.fct.sd_split` / :func:`purifiers.fct.fct_secure_train`: an :class:`InputError`
    names the first bad one. No defaults are added (:func:`fct_st_settings` does that)."""
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise InputError(f"defense_params must be a JSON object with keys 'sd' and/or 'st', got "
                         f"{type(params).__name__}")
    extra = sorted(set(params) - {"sd", "st"})
    if extra:
        raise InputError(f"unknown defense_params key(s) {', '.join(extra)} for fct-st; valid: 'sd' (settings of "
                         f"the SD split) and 'st' (settings of the secure training)")
    return {"sd": _checked("sd", params.get("sd", {}), SD_SETTINGS),
            "st": _checked("st", params.get("st", {}), ST_SETTINGS)}


def fct_st_settings(params: Mapping[str, Any] | None = None, *, dataset: str | None) -> dict[str, dict[str, Any]]:
    """The resolved settings ``{"sd": ..., "st": ...}`` of D-ST on ``dataset``: every setting of
    :func:`purifiers.fct.sd_split` and :func:`purifiers.fct.fct_secure_train` at its official default, the
    digits-scale defaults over them on the embedded ``digits``, then ``params`` (:func:`check_fct_st_params`). A
    run stores them resolved when it is created, so it lists every value it trained with and later default
    changes never alter what an existing run says."""
    given = check_fct_st_params(params)
    digits = dataset == "digits"
    resolved = check_fct_st_params({"sd": {**_defaults(sd_split, SD_SETTINGS), **(FCT_SD_DIGITS if digits else {}),
                                           **given["sd"]},
                                    "st": {**_defaults(fct_secure_train, ST_SETTINGS),
                                           **(FCT_ST_DIGITS if digits else {}), **given["st"]}})
    return json.loads(json.dumps(resolved))  # as stored: tuples become lists, so a resumed run compares equal


def _defaults(fn: Callable[..., Any], names: frozenset[str]) -> dict[str, Any]:
    """Every setting of ``fn`` in ``names`` at its signature default (so a run records all of them)."""
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n in names}


def check_fct_st_size(n: int, settings: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse (one line naming both split sizes) a poisoned training set of ``n`` samples too small for the
    SD thresholds, before anything trains."""
    sd = settings.get("sd", {})
    check_split_sizes(n, sd.get("alpha_c", ALPHA_C), sd.get("alpha_p", ALPHA_P))


def _setting(settings: Mapping[str, Mapping[str, Any]], part: str, name: str) -> Any:
    fn = sd_split if part == "sd" else fct_secure_train
    return settings.get(part, {}).get(name, inspect.signature(fn).parameters[name].default)


def fct_st_work(n: int, settings: Mapping[str, Mapping[str, Any]]) -> tuple[int, str]:
    """``(inputs, detail)``: how many inputs D-ST passes forward and backward on a poisoned set of ``n`` samples
    (SD training and L_intra epochs, two contrastive views per sample and epoch, head epochs on D_c + D_p;
    the FCT scoring's forward passes are not counted), and the breakdown in words (the budget line).

    >>> fct_st_work(1000, {"sd": {"sd_epochs": 2, "intra_epochs": 0}, "st": {"epochs": 3, "head_epochs": 1}})
    (8251, 'SD 2 + 0 epochs x 1000, contrastive 3 epochs x 2 views x 1000, head 1 epochs x 251')
    """
    sd_epochs, intra = _setting(settings, "sd", "sd_epochs"), _setting(settings, "sd", "intra_epochs")
    epochs, head = _setting(settings, "st", "epochs"), _setting(settings, "st", "head_epochs")
    n_c, n_p = split_sizes(n, _setting(settings, "sd", "alpha_c"), _setting(settings, "sd", "alpha_p"))
    inputs = (sd_epochs + intra) * n + 2 * epochs * n + head * (n_c + n_p)
    return inputs, (f"SD {sd_epochs} + {intra} epochs x {n}, contrastive {epochs} epochs x 2 views x {n}, "
                    f"head {head} epochs x {n_c + n_p}")


def train_fct_st(template: torch.nn.Module, train_data: Any, settings: Mapping[str, Mapping[str, Any]], *,
                 seed: int, device: str = "auto", model: torch.nn.Module | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = False) -> tuple[torch.nn.Module, FCTSplit]:
    """D-ST on the poisoned ``train_data``: the SD split, then (unless ``model``, an already trained D-ST model,
    is given) secure training of a fresh model of ``template``'s architecture. Returns ``(model, split)``;
    ``template`` is untouched."""
    split = sd_split(template, train_data, **settings.get("sd", {}), seed=seed, device=device)
    if model is None:
        model = fct_secure_train(template, train_data, split, **settings.get("st", {}), seed=seed, device=device,
                                 log=log, progress=progress)
    return model, split


def save_split(run: RunDirectory, relpath: str, split: FCTSplit, poison_indices: Any) -> dict[str, Any]:
    """Write ``split``'s per-sample scores, thresholds and flags to ``relpath`` (``.npz``) in ``run``; return its
    record (sizes, thresholds, precision / recall against the true ``poison_indices``, a diagnostic the method
    never sees) with the file's path under ``"file"``."""
    buf = io.BytesIO()
    np.savez(buf, **split.arrays())
    run.write_bytes(relpath, buf.getvalue())
    return {**split.record(poison_indices), "file": relpath}


def split_line(name: str, record: Mapping[str, Any]) -> str:
    """One log line of a split's record."""
    return (f"{name} split: {record['n_clean']} clean / {record['n_poisoned']} poisoned / {record['n_uncertain']} "
            f"uncertain; D_p precision {record['poisoned_precision']:.2f}, recall {record['poisoned_recall']:.2f}; "
            f"D_c precision {record['clean_precision']:.2f} (against the true poison indices; diagnostic only)")
