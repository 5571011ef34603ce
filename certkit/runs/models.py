"""Models of a run directory: rebuild any saved model from its spec, purified ones with inserted layers too.

A purified model's spec is the base spec plus the structural insertions a purifier made (``"structure"``,
e.g. NPD's neural polarizer), so :func:`build_model_from_spec` rebuilds the architecture before the state
dict loads (with ``weights_only=True``, see :class:`~certkit.runs.rundir.RunDirectory`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from certkit._validation import check_choice, check_positive_int
from certkit.backdoor.models import build_model, model_from_spec
from certkit.backdoor.prepare import PreparedData
from certkit.backdoor.training import TrainingHistory, train_model
from certkit.certify.patch import KINDS, AblatedModel, ablation_input_channels, ablation_train_transform
from certkit.errors import InputError
from certkit.runs.rundir import RunDirectory
from purifiers.npd import NeuralPolarizer, Polarized

__all__ = ["NOISE_SUFFIX", "PURIFIED_PREFIX", "ablated_model_name", "build_ablated_model", "build_model_from_spec",
           "load_run_model", "purified_noise_sigmas", "purified_spec", "train_ablated_model"]

PURIFIED_PREFIX = "purified-"


NOISE_SUFFIX = "-noise"


def _base_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {"name": spec["name"], "kwargs": spec["kwargs"]}


def _apply_structure(model: nn.Module, ops: Sequence[dict[str, Any]]) -> nn.Module:
    """Apply recorded structural insertions to a freshly built base model (in place; returns it)."""

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
    """Rebuild a model (fresh weights) from a saved spec: :func:`certkit.backdoor.models.model_from_spec` for a plain
    spec; for a purified model's spec ``{"name", "kwargs", "structure": [...]}`` the base architecture with
    the recorded insertions applied. The result carries ``certkit_spec`` (the base spec)."""

    if isinstance(spec, dict) and "ablation" in spec:  # de-randomized smoothing: (x, 1 - x) base, wrapped
        base_spec = {k: v for k, v in spec.items() if k != "ablation"}
        abl = spec["ablation"]
        if not isinstance(abl, dict) or not isinstance(abl.get("channels"), int):
            raise InputError(f"model spec 'ablation' must record kind, band and channels, got {abl!r}")
        wrapped = AblatedModel(model_from_spec(base_spec), channels=abl["channels"])
        wrapped.certkit_spec = spec
        return wrapped
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


def purified_noise_sigmas(run: RunDirectory) -> dict[str, float]:
    """Noise-fine-tuned purified models of the run and their fine-tune sigma (the default smoothing sigma)."""

    rows = run.read_summary().get("purified", {})
    return {name: float(r["noise_sigma"]) for name, r in rows.items()
            if r.get("noise_sigma") and name in run.manifest["models"]}


def ablated_model_name(kind: str, band: int) -> str:
    """Name of the de-randomized smoothing model of a run: ``column-ablation-b2``, ``block-ablation-b3``."""
    return f"{kind}-ablation-b{band}"


def build_ablated_model(model: str, data: PreparedData, kind: str, band: int) -> AblatedModel:
    """A fresh de-randomized smoothing base model for ``data``: architecture ``model`` taking the ``2C``
    channels ``(x, 1 - x)`` (normalised with mean ``(m, 1 - m)`` and std ``(s, s)``), wrapped in
    :class:`~certkit.certify.patch.AblatedModel`; ``certkit_spec`` records the ablation so that the run
    directory rebuilds it (:func:`certkit.runs.models.build_model_from_spec`)."""
    check_choice(kind, KINDS, "ablation")
    c, h, w = data.input_shape
    band = check_positive_int(band, "band")
    if band > (w if kind == "column" else min(h, w)):
        raise InputError(f"band {band} is larger than the {h}x{w} images")
    mean, std = tuple(data.splits.mean), tuple(data.splits.std)
    base = build_model(model, num_classes=data.num_classes, input_shape=(ablation_input_channels(c), h, w),
                       mean=mean + tuple(1.0 - m for m in mean), std=std + std)
    wrapped = AblatedModel(base, channels=c)
    wrapped.certkit_spec = {**base.certkit_spec, "ablation": {"kind": kind, "band": band, "channels": c}}
    return wrapped


def train_ablated_model(model: str, data: PreparedData, kind: str, band: int, *, epochs: int, lr: float,
                        batch_size: int, seed: int, device: Any = "auto", progress: bool = False,
                        desc: str = "train") -> tuple[AblatedModel, TrainingHistory]:
    """A de-randomized smoothing base model (:func:`build_ablated_model`, initialised from ``seed`` without
    touching the caller's RNG) trained on ``data``'s poisoned training set with one seeded random band (block)
    of side ``band`` kept per batch (Levine and Feizi, NeurIPS 2020); returns it with its training history."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = build_ablated_model(model, data, kind, band)
    history = train_model(wrapped, data.poisoned.dataset, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          device=device, progress=progress, desc=desc,
                          input_transform=ablation_train_transform(kind, band, seed))
    return wrapped, history
