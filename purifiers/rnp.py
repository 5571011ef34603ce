"""RNP: Reconstructive Neuron Pruning.

Li, Lyu, Ma, Koren, Lyu, Li, Jiang, "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023
(arXiv 2305.14876); official code bboylyg/RNP and SCLBD/BackdoorBench ``defense/rnp.py``
(``config/defense/rnp/config.yaml``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certkit.devices import module_device
from certkit.errors import InputError
from certkit.progress import bar as progress_bar
from certkit.progress import batches

from ._common import (
    _num_classes_of,
    check_device,
    check_float,
    check_positive_int,
    split_validation,
)
from .base import Purifier, PurifierTags
from .registry import register

#: Thresholds tried by ``threshold="validation"`` (ascending; the largest acceptable one is kept).
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _affine_batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer with a learnable scale (gamma), in registration order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]


def _accuracy(model: nn.Module, data: Any, dev: torch.device, batch_size: int = 1024) -> float:
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            xb, yb = data.x[start:start + batch_size].to(dev), data.y[start:start + batch_size].to(dev)
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was)
    return correct / max(len(data), 1)


def mask_gammas(bns: list[tuple[str, nn.modules.batchnorm._BatchNorm]],
                masks: dict[str, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward hooks scaling each BN neuron's scale ``gamma`` by its mask, the shift ``beta`` untouched, as the
    official ``MaskBatchNorm2d``: ``gamma * m * x_hat + beta = m * (BN(x) - beta) + beta`` (mask 0: the neuron
    outputs ``beta``). ``masks`` maps BN names to per-channel masks; returns the handles (remove them)."""
    handles = []
    for name, bn in bns:
        def hook(module, inputs, output, mask=masks[name]):
            shape = [1, -1] + [1] * (output.dim() - 2)
            m = mask.view(shape)
            if module.bias is None:
                return output * m
            beta = module.bias.view(shape)
            return (output - beta) * m + beta

        handles.append(bn.register_forward_hook(hook))
    return handles


def prune_bn_neurons_(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> int:
    """In place: set the BN scale ``gamma`` to 0 for every neuron whose mask is ``<= threshold``
    (``masks`` maps BatchNorm module names to per-channel masks); returns the number of pruned neurons.
    The shift ``beta`` is kept, as in the official code (the neuron outputs a constant)."""
    modules = dict(model.named_modules())
    pruned = 0
    with torch.no_grad():
        for name, mask in masks.items():
            bn = modules[name]
            sel = (mask.to(bn.weight.device) <= threshold)
            bn.weight[sel] = 0.0
            pruned += int(sel.sum())
    return pruned


@register
class ReconstructiveNeuronPruning(Purifier):
    """Reconstructive Neuron Pruning (Li et al., ICML 2023, arXiv 2305.14876).

    1. *Unlearn*: a copy of the model is trained by gradient **ascent** on the clean cross-entropy (SGD
       ``unlearn_lr`` 0.01, momentum 0.9, weight decay 5e-4, learning rate x0.1 at epochs 10 and 20, gradient
       norm clipped to ``max_grad_norm`` 20 after ``backward()``), at most ``unlearn_epochs`` 20 epochs,
       stopping after the first epoch whose running clean accuracy falls below ``clean_threshold`` (20%).
    2. *Recover*: on the unlearned copy (weights frozen, BN in train mode as in the official code), one mask
       ``m`` in [0, 1] per BatchNorm neuron (initialised to 1) scales its ``gamma`` (not ``beta``: official
       ``MaskBatchNorm2d``, :func:`mask_gammas`); the masks minimise
       ``alpha * CE`` on the clean data (SGD ``mask_lr`` 0.2, momentum 0.9, ``mask_epochs`` 20) and are
       clipped to [0, 1] after every step. Neurons the recovery does not need (small mask) are the ones the
       unlearning exposed as backdoor-related.
    3. *Prune*: the **original** model's BN neurons with mask ``<= threshold`` get ``gamma = 0``.

    ``threshold`` is either a number (official saved model: 0.70) or ``"validation"``: the largest threshold
    of :data:`THRESHOLD_GRID` (0.05, 0.10, ..., 0.95) whose accuracy on the *validation* split stays within
    ``max_relative_drop`` (10%) of the unpruned model's validation accuracy. The validation split is the
    ``validation`` argument or, when none is given, a stratified 20% carved off ``clean_data`` (never test or
    triggered data); with a fixed threshold the whole clean set is used. If no grid threshold is acceptable,
    nothing is pruned (``threshold_ = -1``).

    After :meth:`purify` the purifier holds ``masks_`` (BN module name -> mask tensor), ``threshold_``,
    ``num_pruned_``, ``unlearn_epochs_run_`` and, with ``"validation"``, ``validation_curve_``.

    BatchNorm layers are found by type (every ``_BatchNorm`` with a learnable scale); the model must have
    at least one (``needs_batchnorm``), e.g. ``digits-bn-cnn`` or ``preact-resnet18``.

    Differences from the official code:
        - BackdoorBench calls ``clip_grad_norm_`` *before* ``backward()``, so its clipping acts on the
          previous step's gradients (ineffective); here the gradient is clipped after ``backward()``;
        - BackdoorBench saves the model pruned at the fixed 0.70 threshold and only *logs* a sweep evaluated
          on test data (ASR included); certkit's ``threshold="validation"`` selects on the defender's
          validation split only;
        - the recovery loss is ``alpha * CE`` with ``alpha = 0.2`` as in BackdoorBench (with SGD this only
          rescales the mask learning rate);
        - the unlearning stop rule uses the running accuracy of the epoch's training batches (as the
          official code) on the defender's clean data;
        - everything (batch order) is seeded by ``seed``; the defender's data is passed in (official: 1%).

    Defaults: unlearn_lr 0.01, unlearn_epochs 20, clean_threshold 0.2, max_grad_norm 20, mask_lr 0.2,
    mask_epochs 20, alpha 0.2, threshold 0.7, batch_size 128, momentum 0.9, weight_decay 5e-4.

    Args:
        unlearn_lr, unlearn_epochs, clean_threshold, max_grad_norm: unlearning stage.
        mask_lr, mask_epochs, alpha: recovery (mask learning) stage.
        threshold: a number in [0, 1] or ``"validation"``. max_relative_drop: tolerance of the validation
            rule (fraction of the unpruned validation accuracy, in [0, 1]).
        batch_size, momentum, weight_decay: SGD settings (weight decay only for unlearning).
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bars.
    """

    name = "rnp"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.01, changes="pruning", needs_batchnorm=True)
    fast_params = dict(unlearn_epochs=2, mask_epochs=2, batch_size=64)

    def __init__(self, unlearn_lr: float = 0.01, unlearn_epochs: int = 20, clean_threshold: float = 0.2,
                 max_grad_norm: float = 20.0, mask_lr: float = 0.2, mask_epochs: int = 20, alpha: float = 0.2,
                 threshold: float | str = 0.7, max_relative_drop: float = 0.1, batch_size: int = 128,
                 momentum: float = 0.9, weight_decay: float = 5e-4, device: str = "auto",
                 progress: bool = False) -> None:
        self.unlearn_lr = unlearn_lr
        self.unlearn_epochs = unlearn_epochs
        self.clean_threshold = clean_threshold
        self.max_grad_norm = max_grad_norm
        self.mask_lr = mask_lr
        self.mask_epochs = mask_epochs
        self.alpha = alpha
        self.threshold = threshold
        self.max_relative_drop = max_relative_drop
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """Unlearning (at most ``unlearn_epochs``, it stops at ``clean_threshold``) and the mask epochs."""
        return float(self.unlearn_epochs + self.mask_epochs), (f"up to {self.unlearn_epochs} unlearning + "
                                                               f"{self.mask_epochs} mask epochs")

    def _validate(self) -> dict[str, Any]:
        if isinstance(self.threshold, str):
            if self.threshold != "validation":
                raise InputError(f"threshold must be a number in [0, 1] or 'validation', got {self.threshold!r}")
            threshold: float | str = "validation"
        else:
            threshold = check_float(self.threshold, "threshold", maximum=1.0)
        return {
            "unlearn_lr": check_float(self.unlearn_lr, "unlearn_lr", strict=True),
            "unlearn_epochs": check_positive_int(self.unlearn_epochs, "unlearn_epochs"),
            "clean_threshold": check_float(self.clean_threshold, "clean_threshold", maximum=1.0),
            "max_grad_norm": check_float(self.max_grad_norm, "max_grad_norm", strict=True),
            "mask_lr": check_float(self.mask_lr, "mask_lr", strict=True),
            "mask_epochs": check_positive_int(self.mask_epochs, "mask_epochs"),
            "alpha": check_float(self.alpha, "alpha", strict=True),
            "threshold": threshold,
            "max_relative_drop": check_float(self.max_relative_drop, "max_relative_drop", maximum=1.0),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "momentum": check_float(self.momentum, "momentum", maximum=1.0 - 1e-12),
            "weight_decay": check_float(self.weight_decay, "weight_decay"),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    # ------------------------------------------------------------------------------------------ stages
    def _unlearn(self, model: nn.Module, data: Any, p: dict[str, Any], gen: torch.Generator,
                 dev: torch.device) -> int:
        """Gradient ascent on the clean CE until the running accuracy drops below ``clean_threshold``;
        returns the number of epochs run."""
        opt = torch.optim.SGD(model.parameters(), lr=p["unlearn_lr"], momentum=p["momentum"],
                              weight_decay=p["weight_decay"])
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[10, 20], gamma=0.1)
        model.train()
        n = len(data)
        epochs = 0
        with progress_bar(p["unlearn_epochs"] * batches(n, p["batch_size"]), "rnp unlearn (at most)",
                          enabled=p["progress"]) as bar:
            for epoch in range(p["unlearn_epochs"]):
                perm = torch.randperm(n, generator=gen)
                correct = 0
                for start in range(0, n, p["batch_size"]):
                    idx = perm[start:start + p["batch_size"]]
                    xb, yb = data.x[idx].to(dev), data.y[idx].to(dev)
                    out = model(xb)
                    loss = -F.cross_entropy(out, yb)
                    if not bool(torch.isfinite(loss)):
                        raise InputError(f"rnp unlearning diverged at epoch {epoch + 1} "
                                         f"(unlearn_lr={p['unlearn_lr']:g}); try a smaller unlearn_lr")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), p["max_grad_norm"])
                    opt.step()
                    correct += int((out.detach().argmax(1) == yb).sum())
                    bar.update(1)
                sched.step()
                epochs += 1
                acc = correct / n
                bar.set_postfix(epoch=epoch + 1, acc=f"{acc:.3f}")
                if acc < p["clean_threshold"]:
                    break
        return epochs

    def _learn_masks(self, model: nn.Module, data: Any, p: dict[str, Any], gen: torch.Generator,
                     dev: torch.device) -> dict[str, torch.Tensor]:
        """Per-neuron BN masks in [0, 1] on the (frozen) unlearned model, minimising ``alpha * CE``."""
        for q in model.parameters():
            q.requires_grad_(False)
        bns = _affine_batchnorms(model)
        masks = {name: torch.ones(bn.num_features, device=dev, requires_grad=True) for name, bn in bns}
        handles = mask_gammas(bns, masks)
        opt = torch.optim.SGD(list(masks.values()), lr=p["mask_lr"], momentum=p["momentum"])
        model.train()
        n = len(data)
        try:
            with progress_bar(p["mask_epochs"] * batches(n, p["batch_size"]), "rnp recover",
                              enabled=p["progress"]) as bar:
                for epoch in range(p["mask_epochs"]):
                    perm = torch.randperm(n, generator=gen)
                    for start in range(0, n, p["batch_size"]):
                        idx = perm[start:start + p["batch_size"]]
                        xb, yb = data.x[idx].to(dev), data.y[idx].to(dev)
                        loss = p["alpha"] * F.cross_entropy(model(xb), yb)
                        if not bool(torch.isfinite(loss)):
                            raise InputError(f"rnp mask learning diverged at epoch {epoch + 1} "
                                             f"(mask_lr={p['mask_lr']:g}); try a smaller mask_lr")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        with torch.no_grad():
                            for m in masks.values():
                                m.clamp_(0.0, 1.0)
                        bar.update(1)
        finally:
            for h in handles:
                h.remove()
        return {name: m.detach().cpu() for name, m in masks.items()}

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        if not _affine_batchnorms(model):
            raise InputError(f"rnp prunes BatchNorm neurons but {type(model).__name__} has no BatchNorm layer "
                             "with a learnable scale (affine=True)")
        k = _num_classes_of(model)
        if k is not None and clean_data.num_classes is not None and k != clean_data.num_classes:
            raise InputError(f"model has {k} classes but clean_data has num_classes={clean_data.num_classes}")
        train = clean_data
        if p["threshold"] == "validation" and validation is None:
            train, validation = split_validation(clean_data, self.validation_fraction, seed)
        dev = p["device"]
        home = module_device(model)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            unlearned = copy.deepcopy(model).to(dev)
            self.unlearn_epochs_run_ = self._unlearn(unlearned, train, p, gen, dev)
            masks = self._learn_masks(unlearned, train, p, gen, dev)
            del unlearned
        self.masks_ = masks
        model.to(dev).eval()
        try:
            if p["threshold"] == "validation":
                self.threshold_ = self._select_threshold(model, masks, validation, p, dev)
            else:
                self.threshold_ = p["threshold"]
            self.num_pruned_ = prune_bn_neurons_(model, masks, self.threshold_) if self.threshold_ >= 0 else 0
        finally:
            model.eval()
            model.to(home)
        return model

    def _select_threshold(self, model: nn.Module, masks: dict[str, torch.Tensor], validation: Any,
                          p: dict[str, Any], dev: torch.device) -> float:
        """Largest grid threshold whose validation accuracy is >= (1 - max_relative_drop) x the unpruned one."""
        base = _accuracy(model, validation, dev)
        floor = (1.0 - p["max_relative_drop"]) * base
        best = -1.0  # no acceptable threshold: prune nothing
        self.validation_curve_ = {}
        all_masks = torch.cat([m.flatten() for m in masks.values()])
        for t in THRESHOLD_GRID:
            if not bool((all_masks <= t).any()):
                acc = base
            else:
                trial = copy.deepcopy(model)
                prune_bn_neurons_(trial, masks, t)
                acc = _accuracy(trial, validation, dev)
            self.validation_curve_[t] = acc
            if acc >= floor - 1e-12:
                best = t
        return float(best)
