"""TSC: Two-stage Symmetry Connectivity.

Peng, Yang, Zhao, Dong, He, Zhang, He, "Circumventing Backdoor Space via Weight Symmetry", ICML 2025
(arXiv 2506.07467); official code JiePeng104/TSC (``BackdoorBench-main2/defense/repair_mc.py``,
``utils/permutation_utils/permutation.py``, ``utils/mc/curve_models/curves.py``; SSL variant
``SSL/tsqc/repair_mc2.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from certkit.backdoor.data import ArrayDataset
from certkit.devices import module_device
from certkit.errors import InputError

from ._common import (
    check_device,
    check_float,
    check_positive_int,
    find_head,
    sgd_finetune,
)
from ._curves import bezier_point, fit_bezier_curve, parameters_of, update_bn
from ._permutation import match_permutations, permutation_spec
from .base import Purifier, PurifierTags
from .registry import register

_LOSSES = ("ce", "simclr")
#: SimCLR views: random shift by up to this fraction of the image side (zero padding), plus Gaussian noise.
_SHIFT_FRACTION = 0.125
_NOISE_STD = 0.05


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view for any image size: per-sample random crop of the zero-padded image (a shift by up to
    ``max(1, round(0.125 * side))`` pixels) plus Gaussian noise (std 0.05), clipped to ``[0, 1]``."""
    n, c, h, w = x.shape
    ph, pw = max(1, round(_SHIFT_FRACTION * h)), max(1, round(_SHIFT_FRACTION * w))
    padded = F.pad(x, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pw + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    shifted = padded[torch.arange(n, device=x.device)[:, None, None, None],
                     torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    noise = torch.randn(shifted.shape, generator=generator).to(x.device)
    return (shifted + _NOISE_STD * noise).clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of embeddings (row i of ``z1`` and of ``z2`` are positives)."""
    z = F.normalize(torch.cat([z1.flatten(1), z2.flatten(1)]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _load_parameters(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model


@register
class TwoStageSymmetryConnectivity(Purifier):
    """Two-stage Symmetry Connectivity (Peng et al., ICML 2025, arXiv 2506.07467).

    A network and any channel permutation of it compute the same function but lie in different regions of
    weight space. TSC exploits this with quadratic mode connectivity; per round, starting from the current
    model ``theta`` (the backdoored model in round 1):

    1. *Stage 1 (loss amplification)*: a copy of ``theta`` is permuted to the **least**-correlated channel
       matching (Hungarian assignment on Pearson correlations of pre-activation channel outputs over the
       clean inputs, spatial positions as samples, layer by layer; labels not needed), a quadratic Bezier
       curve ``(1-t)^2 A + 2t(1-t) M + t^2 B`` from ``theta`` (``A``) to the permuted copy (``B``) is fitted
       (endpoints fixed, only ``M`` trained from the linear midpoint, one ``t ~ U(0, 1)`` per batch, loss at
       the curve point plus ``0.5 * curve_wd * ||theta(t)||^2``), and the point at ``t`` is taken with its
       BatchNorm statistics re-estimated on the clean data. The curve keeps the clean loss low but not the
       backdoor, so the point is (partly) outside the backdoor's basin.
    2. *Stage 2 (symmetry alignment)*: a copy of ``theta`` is permuted to the **most**-correlated matching with
       that point, a second curve from the aligned copy to the point is fitted, and its point at ``t`` (BN
       re-estimated) is the new ``theta``.

    Between rounds (not after the last) the model is fine-tuned for ``ft_epochs`` (SGD, ``ft_lr``, cosine).
    Permutation specs are found by structure (:mod:`purifiers._permutation`): plain Conv/BN/Linear chains
    ("digits-cnn", "digits-bn-cnn", "rab-mnist-cnn") and PreActBlock residual networks ("preact-resnet18";
    all writers of one residual stream share a permutation); other architectures raise ``InputError``.

    ``loss="ce"`` (default) fits the curves with cross-entropy on the labels. ``loss="simclr"`` fits them
    with SimCLR's NT-Xent (``temperature``) between two augmented views of the unlabeled inputs, the input of
    the classifier head serving as the embedding; the views are a random shift of up to 1/8 of the image side
    (zero-padded crop) plus Gaussian noise of std 0.05, clipped to ``[0, 1]`` (works for any image size).
    With ``"simclr"`` the labels are never read: the between-round fine-tune, which needs labels, is skipped
    (``ft_epochs`` is ignored), so the method is fully label-free (the class tags describe the default loss).

    Defaults (official README / argparse, supervised): ``rounds=3``, ``t=0.4``, ``curve_epochs=200``,
    ``curve_lr=0.02``, ``batch_size=256``, SGD ``momentum=0.9``, ``weight_decay=5e-4``, ``curve_wd=1e-4``,
    cosine schedule over the curve epochs, ``ft_epochs=10`` at ``ft_lr=1e-4`` (cosine), ``temperature=0.5``.
    The fixed ``t`` is the paper's; nothing is selected, so ``validation`` is not used.

    Differences from the official code:
        - cosine annealing uses ``T_max = curve_epochs``; the official code hard-codes ``T_max = 100`` so with
          its recommended 200 curve epochs the learning rate reaches 0 at epoch 100 and climbs back to the
          initial value at 200;
        - permutation specs are derived from the model's structure (and checked by permuting at random and
          comparing logits) instead of being hand-written per architecture;
        - correlations are measured in eval mode on the un-augmented clean inputs (the official code uses the
          training loader with augmentation); deterministic given the data;
        - the curve's L2 term covers all parameters at ``theta(t)``; BN statistics of a curve point are
          re-estimated with a batch-size-weighted cumulative average (as ``update_bn`` of the curve code);
        - the 21 logging evaluations along each curve are not done (they only log test metrics);
        - SimCLR: no projection head (the head's input is the embedding) and image-size-agnostic
          augmentations (shift + noise) instead of the CIFAR crop/flip/colour-jitter pipeline; no
          between-round fine-tune in that mode;
        - everything is seeded by ``seed`` (batch order, ``t`` draws, views, fine-tuning).

    Args:
        rounds: number of two-stage rounds. t: curve point taken in both stages, in ``[0, 1]``.
        curve_epochs, curve_lr, batch_size, momentum, weight_decay: SGD settings of each curve fit.
        curve_wd: weight of ``0.5 * ||theta(t)||^2`` in the curve loss.
        ft_epochs, ft_lr: fine-tuning between rounds (``ft_epochs=0`` disables it).
        loss: ``"ce"`` or ``"simclr"``. temperature: NT-Xent temperature (``"simclr"`` only).
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bars over rounds and per batch of the curve fit
            and fine-tune.
    """

    name = "tsc"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="weights")
    fast_params = dict(rounds=1, curve_epochs=1, ft_epochs=1, batch_size=64)

    def __init__(self, rounds: int = 3, t: float = 0.4, curve_epochs: int = 200, curve_lr: float = 0.02,
                 batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 5e-4, curve_wd: float = 1e-4,
                 ft_epochs: int = 10, ft_lr: float = 1e-4, loss: str = "ce", temperature: float = 0.5,
                 device: str = "auto", progress: bool = False) -> None:
        self.rounds = rounds
        self.t = t
        self.curve_epochs = curve_epochs
        self.curve_lr = curve_lr
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.curve_wd = curve_wd
        self.ft_epochs = ft_epochs
        self.ft_lr = ft_lr
        self.loss = loss
        self.temperature = temperature
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """Two curves of ``curve_epochs`` per round, then the fine-tune (purifier-notes.md section 1: ~1,200
        curve epochs + FT at the defaults; the permutation matching is not counted)."""
        return float(self.rounds * 2 * self.curve_epochs + self.ft_epochs), (
            f"{self.rounds} rounds x 2 curves x {self.curve_epochs} epochs + {self.ft_epochs} fine-tune epochs")

    def _validate(self) -> dict[str, Any]:
        if self.loss not in _LOSSES:
            raise InputError(f"loss must be one of {', '.join(map(repr, _LOSSES))}, got {self.loss!r}")
        ft_epochs = self.ft_epochs
        if isinstance(ft_epochs, (int, np.integer)) and not isinstance(ft_epochs, bool) and ft_epochs == 0:
            ft_epochs = 0
        else:
            ft_epochs = check_positive_int(ft_epochs, "ft_epochs")
        return {
            "rounds": check_positive_int(self.rounds, "rounds"),
            "t": check_float(self.t, "t", maximum=1.0),
            "curve_epochs": check_positive_int(self.curve_epochs, "curve_epochs"),
            "curve_lr": check_float(self.curve_lr, "curve_lr", strict=True),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "momentum": check_float(self.momentum, "momentum", maximum=1.0 - 1e-12),
            "weight_decay": check_float(self.weight_decay, "weight_decay"),
            "curve_wd": check_float(self.curve_wd, "curve_wd"),
            "ft_epochs": ft_epochs,
            "ft_lr": check_float(self.ft_lr, "ft_lr", strict=True),
            "loss": self.loss,
            "temperature": check_float(self.temperature, "temperature", strict=True),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    def _curve_loss(self, p: dict[str, Any], template: nn.Module, head_name: str, num_classes: int):
        if p["loss"] == "ce":
            def ce(forward, xb, yb, generator):
                out = forward(xb)
                if out.dim() != 2 or out.shape[1] != num_classes:
                    raise InputError(f"model must return logits [batch, {num_classes}], got {tuple(out.shape)}")
                return F.cross_entropy(out, yb)
            return ce
        head = dict(template.named_modules())[head_name]
        temperature = p["temperature"]

        def simclr(forward, xb, yb, generator):
            feats: list[torch.Tensor] = []
            handle = head.register_forward_pre_hook(lambda m, args: feats.append(args[0]))
            try:
                forward(torch.cat([_augment(xb, generator), _augment(xb, generator)]))
            finally:
                handle.remove()
            z1, z2 = feats[0].chunk(2)
            return nt_xent(z1, z2, temperature)
        return simclr

    def _curve_point(self, p: dict[str, Any], start_model: nn.Module, end_model: nn.Module, data: ArrayDataset,
                     head_name: str, generator: torch.Generator, desc: str) -> nn.Module:
        """Fit a curve from ``start_model`` to ``end_model``; return the point at ``t`` (BN re-estimated),
        built on a copy of ``start_model``."""
        dev = p["device"]
        template = copy.deepcopy(start_model)
        start, end = parameters_of(start_model), parameters_of(end_model)
        mid = fit_bezier_curve(template, start, end, data,
                               self._curve_loss(p, template, head_name, data.num_classes),
                               epochs=p["curve_epochs"], lr=p["curve_lr"], momentum=p["momentum"],
                               weight_decay=p["weight_decay"], curve_wd=p["curve_wd"], batch_size=p["batch_size"],
                               generator=generator, device=dev, progress=p["progress"], desc=desc)
        point = _load_parameters(copy.deepcopy(start_model), bezier_point(start, mid, end, p["t"]))
        return update_bn(point, data, batch_size=p["batch_size"], device=dev)

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        dev = p["device"]
        home = module_device(model)
        head_name, _ = find_head(model, clean_data.num_classes)
        data = clean_data
        if p["loss"] == "simclr":  # labels are never read: make that explicit
            data = ArrayDataset(clean_data.x, torch.zeros_like(clean_data.y), clean_data.num_classes,
                                check_range=clean_data.check_range)
        model.to(dev).eval()
        x = data.x
        rng_devices = [dev] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                spec = permutation_spec(model, x[: min(len(x), 64)].to(dev), head_name)
                bar = tqdm(range(p["rounds"]), desc="tsc", disable=not p["progress"], leave=False,
                           dynamic_ncols=True)
                for r in bar:
                    # stage 1: un-align a copy (min correlation), curve theta -> copy, point at t
                    other = copy.deepcopy(model)
                    match_permutations(model, other, spec, x, maximize=False, batch_size=p["batch_size"],
                                       device=dev)
                    point = self._curve_point(p, model, other, data, head_name, gen, f"tsc r{r + 1} stage 1")
                    # stage 2: align a copy of theta to the point (max correlation), curve copy -> point
                    aligned = copy.deepcopy(model)
                    match_permutations(point, aligned, spec, x, maximize=True, batch_size=p["batch_size"],
                                       device=dev)
                    model = self._curve_point(p, aligned, point, data, head_name, gen, f"tsc r{r + 1} stage 2")
                    if r < p["rounds"] - 1 and p["ft_epochs"] > 0 and p["loss"] == "ce":
                        sgd_finetune(model, data, epochs=p["ft_epochs"], lr=p["ft_lr"], momentum=p["momentum"],
                                     weight_decay=p["weight_decay"], batch_size=p["batch_size"],
                                     seed=seed + 7919 * (r + 1), device=dev, progress=p["progress"],
                                     desc=f"tsc ft {r + 1}")
        finally:
            model.eval()
            model.to(home)
        return model
