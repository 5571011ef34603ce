"""FT-SAM: fine-tuning with (adaptive) sharpness-aware minimisation.

Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization",
ICCV 2023 (arXiv 2304.11823); official code SCLBD/BackdoorBench ``defense/ft-sam.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certkit.devices import module_device
from certkit.errors import InputError
from certkit.progress import bar as progress_bar
from certkit.progress import batches

from ._common import (
    check_float,
    check_sgd_params,
)
from .base import Purifier, PurifierTags
from .registry import register


def asam_perturbation(params: list[torch.Tensor], grads: list[torch.Tensor | None], rho: float,
                      adaptive: bool = True) -> list[torch.Tensor]:
    """The (adaptive) SAM ascent step ``e = rho * T^2 g / ||T g||`` with ``T = |w|`` elementwise (adaptive) or
    ``T = 1`` (plain SAM), the norm taken over all parameters together; ``None`` gradients give zeros."""
    scaled = [(p.abs() * g if adaptive else g) for p, g in zip(params, grads) if g is not None]
    if not scaled:
        return [torch.zeros_like(p) for p in params]
    norm = torch.norm(torch.stack([s.norm(p=2) for s in scaled]), p=2)
    scale = rho / (norm + 1e-12)
    out = []
    for p, g in zip(params, grads):
        if g is None:
            out.append(torch.zeros_like(p))
        else:
            out.append((p * p if adaptive else 1.0) * g * scale)
    return out


def _set_bn_momentum(model: nn.Module, saved: dict[nn.Module, Any] | None) -> dict[nn.Module, Any]:
    """Freeze (``saved=None``: momentum 0, returns the old values) or restore BN running-stat updates."""
    if saved is None:
        old = {}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                old[m] = m.momentum
                m.momentum = 0.0
        return old
    for m, mom in saved.items():
        m.momentum = mom
    return saved


@register
class FineTuningSAM(Purifier):
    """FT-SAM (Zhu, Wei, Shen, Fan, Wu, ICCV 2023, arXiv 2304.11823).

    Fine-tunes all weights on the clean data with adaptive sharpness-aware minimisation (ASAM). Each step is
    two passes over the same mini-batch:

    1. loss and gradient ``g`` at ``w``; perturbation ``e = rho * T^2 g / ||T g||`` with ``T = |w|`` elementwise
       (the adaptive variant, BackdoorBench's ``--adaptive``; ``||.||`` over all parameters together);
    2. ``w <- w + e``, loss and gradient at the perturbed weights, ``w`` restored (exact copy), then one SGD
       step (``lr``, momentum, weight decay) with the perturbed-point gradient.

    Loss: cross-entropy with label smoothing 0.1; cosine learning-rate schedule over ``epochs`` (stepped per
    epoch). ASAM perturbs large-magnitude weights most, which the paper links to the backdoor-related
    neurons that plain fine-tuning barely moves.

    Differences from the official code:
        - BN running statistics are updated on the first (unperturbed) pass only (BN momentum is set to 0
          during the perturbed pass, the SAM reference implementation's recommended usage); BN layers are
          otherwise in train mode;
        - no data augmentation; batch order seeded by ``seed``; the defender's data is passed in
          (official: 5% of the training set).

    Defaults (paper / BackdoorBench CIFAR-10): rho 2 (8 for Tiny-ImageNet/GTSRB), label smoothing 0.1,
    SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine, 100 epochs, batch 256. On a CPU at realistic sizes
    100 epochs are slow (purifier-notes.md section 14: use <= 20 epochs there).

    Args:
        rho: perturbation radius (> 0). adaptive: ASAM (True) or plain SAM (False).
        label_smoothing: in [0, 1). epochs, lr, momentum, weight_decay, batch_size: SGD settings.
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bar per batch.
    """

    name = "ft-sam"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="weights")
    fast_params = dict(epochs=2, batch_size=64)

    def __init__(self, rho: float = 2.0, adaptive: bool = True, label_smoothing: float = 0.1, epochs: int = 100,
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256,
                 device: str = "auto", progress: bool = False) -> None:
        self.rho = rho
        self.adaptive = adaptive
        self.label_smoothing = label_smoothing
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """Two passes per epoch (SAM's ascent step and the update)."""
        return 2.0 * self.epochs, f"{self.epochs} epochs x 2 (SAM)"

    def _validate(self) -> dict[str, Any]:
        if not isinstance(self.adaptive, bool):
            raise InputError(f"adaptive must be a bool, got {self.adaptive!r}")
        return {
            "rho": check_float(self.rho, "rho", strict=True),
            "adaptive": self.adaptive,
            "label_smoothing": check_float(self.label_smoothing, "label_smoothing", maximum=1.0 - 1e-12),
            **check_sgd_params(self),
        }

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        params = [q for q in model.parameters() if q.requires_grad]
        if not params:
            raise InputError("model has no trainable parameters")
        dev = p["device"]
        home = module_device(model)
        model.to(dev)
        opt = torch.optim.SGD(params, lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p["epochs"])
        n, bs, ls = len(clean_data), p["batch_size"], p["label_smoothing"]
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                model.train()
                bar = progress_bar(p["epochs"] * batches(n, bs), "ft-sam", enabled=p["progress"])
                for epoch in range(p["epochs"]):
                    perm = torch.randperm(n, generator=gen)
                    total = 0.0
                    for start in range(0, n, bs):
                        idx = perm[start:start + bs]
                        xb, yb = clean_data.x[idx].to(dev), clean_data.y[idx].to(dev)
                        # pass 1: gradient at w
                        loss = F.cross_entropy(model(xb), yb, label_smoothing=ls)
                        if not bool(torch.isfinite(loss)):
                            raise InputError(f"ft-sam diverged at epoch {epoch + 1} (lr={p['lr']:g}); "
                                             "try a smaller lr or rho")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        with torch.no_grad():
                            eps = asam_perturbation(params, [q.grad for q in params], p["rho"], p["adaptive"])
                            origin = [q.detach().clone() for q in params]
                            for q, e in zip(params, eps):
                                q.add_(e)
                        # pass 2: gradient at w + e (BN running statistics frozen), restore, step
                        saved = _set_bn_momentum(model, None)
                        try:
                            loss2 = F.cross_entropy(model(xb), yb, label_smoothing=ls)
                            opt.zero_grad(set_to_none=True)
                            loss2.backward()
                        finally:
                            _set_bn_momentum(model, saved)
                            with torch.no_grad():
                                for q, w in zip(params, origin):
                                    q.copy_(w)
                        if not bool(torch.isfinite(loss2)):
                            raise InputError(f"ft-sam diverged at epoch {epoch + 1} (rho={p['rho']:g}); "
                                             "try a smaller rho or lr")
                        opt.step()
                        total += float(loss.detach()) * len(idx)
                        bar.update(1)
                    sched.step()
                    bar.set_postfix(epoch=f"{epoch + 1}/{p['epochs']}", loss=f"{total / n:.4f}")
                bar.close()
        finally:
            model.eval()
            model.to(home)
        return model
