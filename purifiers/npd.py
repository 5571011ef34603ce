"""NPD: Neural Polarizer.

Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense via Purifying Poisoned
Features", NeurIPS 2023 (arXiv 2306.16697); official code SCLBD/BackdoorBench ``defense/npd.py`` and
``config/defense/npd/cifar10.yaml``.
"""

from __future__ import annotations

import math
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
)
from .base import Purifier, PurifierTags
from .registry import register

#: input dimension the official L2 bound (3.0 on CIFAR-10, 3x32x32) refers to.
_REF_DIM = 3 * 32 * 32


class NeuralPolarizer(nn.Module):
    """The polarizer: 1x1 convolution (C -> C, no bias, identity-initialised) followed by BatchNorm2d(C)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Polarized(nn.Module):
    """``layer(polarizer(x))``: replaces the backbone layer in front of which the polarizer is inserted."""

    def __init__(self, polarizer: NeuralPolarizer, layer: nn.Module) -> None:
        super().__init__()
        self.polarizer = polarizer
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.polarizer(x))


def find_insertion_point(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The last ``nn.Conv2d`` of ``model`` in module registration order (its input is where the polarizer
    goes): on DigitsCNN the third conv (32 channels, 4x4 maps on 8x8 digits), on RABMnistCNN the second
    (16 channels). Found by structure; raises :class:`InputError` if the model has no Conv2d or already has
    a polarizer."""
    if any(isinstance(m, (NeuralPolarizer, Polarized)) for m in model.modules()):
        raise InputError("model already contains a neural polarizer")
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise InputError(f"{type(model).__name__} has no nn.Conv2d layer: NPD needs a convolutional backbone")
    return convs[-1]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


@register
class NeuralPolarizerDefense(Purifier):
    """Neural Polarizer purification (Zhu et al., NeurIPS 2023).

    A polarizer (1x1 conv, identity-initialised, + BatchNorm2d) is inserted in front of the last ``nn.Conv2d``
    of the model (registration order; see :func:`find_insertion_point`; the official code hooks the input of
    ``layer4.1.conv1`` of PreAct-ResNet18, i.e. in front of the last conv block). The backbone is frozen and
    kept in eval mode; only the polarizer is trained. The returned model contains the polarizer as a module
    (``Polarized(polarizer, layer)`` replaces the conv), so it is self-contained and ``Normalize`` stays first.

    Training: ``warm_epochs`` of plain cross-entropy (plain SGD at ``warm_lr``: no momentum, no weight decay;
    the polarizer, BN included, in train mode), then ``epochs`` where per batch
    (1) the target ``t`` is the argmax of the current logits with the true class masked; (2) a targeted L2 PGD
    from ``delta = 0`` takes ``pgd_steps`` signed steps of ``step_size`` descending ``CE(h(x+d), t)`` (per-sample
    CE clamped at 80), projected onto the L2 ball of radius ``bound`` and onto ``[0, 1]``, stopping early once
    more than 60% of the batch hits ``t``; (3) the polarizer minimises
    ``l1*CE(h(x), y) + l2*CE(h(x+d), yhat_clean) + l3*NLL(log(1-p(x+d)), y') + l4*NLL(log(1-p(x+d)), t)``
    (``yhat_clean`` the prediction on clean ``x``, ``y'`` the top adversarial class other than ``y``), with
    SGD (momentum 0.9, weight decay 5e-4) at a constant ``lr`` (the official scheduler is never stepped).
    In the main loop the polarizer's BN stays in eval mode (running statistics fixed, affine parameters
    trained), as BackdoorBench's ``plug_layer.eval()`` for every dataset but Tiny-ImageNet; ``train_bn=True``
    follows its Tiny-ImageNet branch: the clean forward in train mode updates the running statistics, the
    adversarial forward uses batch statistics without updating them.

    Differences from the official code:
        - the insertion point is found by structure (last Conv2d) instead of a hard-coded PreAct-ResNet18 layer;
        - the polarizer's BN is initialised to the clean feature statistics (running mean/var, and affine
          weight = sqrt(var + eps), bias = mean), so the polarizer is exactly the identity both in train and
          eval mode at the start; the official BN starts at weight 1 / bias 0, which standardises the features
          in train mode;
        - the L2 bound scales with the input size: ``bound=None`` gives ``3.0 * sqrt(d / 3072)`` (``d`` = pixels x
          channels; 3.0 on 32x32x3 CIFAR-10, 0.43 on 8x8 digits), i.e. the same per-pixel RMS perturbation;
          the signed step 0.1 then moves by the same multiple of the bound as on CIFAR-10;
          on 8x8 digits with a short budget the scaled 0.43 lowered a 2x2-patch BadNets ASR only to ~0.5-0.8,
          a bound of 2.0 (about the patch's own L2 norm) with 5 PGD steps to 0.0-0.3;
        - no class-balanced sampling (the defender's data is passed in); batch order seeded by ``seed``.

    Defaults follow the official CIFAR-10 config (5 warm-up + 50 epochs, batch 128, lr 0.01, warm-up lr 1e-4,
    2 PGD steps of 0.1, weights 1 / 0.4 / 0.4 / 0.4); on a CPU at 28x28 or above use <= 15 epochs
    (purifier-notes.md section 14).

    Args:
        epochs, warm_epochs: main / warm-up epochs (>= 1 / >= 0). lr, warm_lr: SGD learning rates (> 0).
        batch_size: (>= 1). bound: L2 radius in pixel units (> 0) or None (scaled, see above).
        step_size: signed PGD step (> 0). pgd_steps: (>= 1). lambda1..lambda4: loss weights (>= 0).
        train_bn: the polarizer's BN in train mode for the main-loop loss (default False: official; warm-up
            always uses train mode).
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bar per batch.
    """

    name = "npd"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="architecture")
    fast_params = dict(epochs=1, warm_epochs=1, batch_size=64)

    def __init__(self, epochs: int = 50, warm_epochs: int = 5, lr: float = 0.01, warm_lr: float = 1e-4,
                 batch_size: int = 128, bound: float | None = None, step_size: float = 0.1, pgd_steps: int = 2,
                 lambda1: float = 1.0, lambda2: float = 0.4, lambda3: float = 0.4, lambda4: float = 0.4,
                 train_bn: bool = False, device: str = "auto", progress: bool = False) -> None:
        self.epochs = epochs
        self.warm_epochs = warm_epochs
        self.lr = lr
        self.warm_lr = warm_lr
        self.batch_size = batch_size
        self.bound = bound
        self.step_size = step_size
        self.pgd_steps = pgd_steps
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.lambda3 = lambda3
        self.lambda4 = lambda4
        self.train_bn = train_bn
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """Warm-up epochs, then about four passes per epoch (the targeted PGD and three loss terms;
        purifier-notes.md section 1)."""
        return float(self.warm_epochs + 4 * self.epochs), (f"{self.warm_epochs} warm-up + {self.epochs} epochs x ~4 "
                                                           "(PGD and three loss terms)")

    def _validate(self) -> dict[str, Any]:
        warm = self.warm_epochs
        if isinstance(warm, bool) or not isinstance(warm, int) or warm < 0:
            raise InputError(f"warm_epochs must be a non-negative integer, got {warm!r}")
        return {
            "epochs": check_positive_int(self.epochs, "epochs"),
            "warm_epochs": int(warm),
            "lr": check_float(self.lr, "lr", strict=True),
            "warm_lr": check_float(self.warm_lr, "warm_lr", strict=True),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "bound": None if self.bound is None else check_float(self.bound, "bound", strict=True),
            "step_size": check_float(self.step_size, "step_size", strict=True),
            "pgd_steps": check_positive_int(self.pgd_steps, "pgd_steps"),
            "lambda1": check_float(self.lambda1, "lambda1"),
            "lambda2": check_float(self.lambda2, "lambda2"),
            "lambda3": check_float(self.lambda3, "lambda3"),
            "lambda4": check_float(self.lambda4, "lambda4"),
            "train_bn": bool(self.train_bn),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    @staticmethod
    def _targeted_pgd(model: nn.Module, x: torch.Tensor, t: torch.Tensor, bound: float, step: float,
                      steps: int) -> torch.Tensor:
        delta = torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            out = model((x + delta).clamp(0.0, 1.0))
            loss = F.cross_entropy(out, t, reduction="none").clamp(-80.0, 80.0).sum()
            grad, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta - step * grad.sign()
                norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
                delta = delta * (bound / norm).clamp(max=1.0)
                delta = (x + delta).clamp(0.0, 1.0) - x
                hit = (model(x + delta).argmax(1) == t).float().mean()
            if float(hit) > 0.6:
                break
        return (x + delta.detach()).clamp(0.0, 1.0)

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        k = _num_classes_of(model)
        if clean_data.num_classes is not None and k is not None and k != clean_data.num_classes:
            raise InputError(f"model has {k} classes but clean_data has num_classes={clean_data.num_classes}")
        path, conv = find_insertion_point(model)
        dev, home = p["device"], module_device(model)
        flags = [(q, q.requires_grad) for q in model.parameters()]
        for q, _ in flags:
            q.requires_grad_(False)
        polarizer = NeuralPolarizer(conv.in_channels)
        model.to(dev).eval()
        # identity initialisation of the BN from the clean features at the insertion point
        feats: list[torch.Tensor] = []
        handle = conv.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].detach()))
        with torch.no_grad():
            for start in range(0, len(clean_data), 256):
                model(clean_data.x[start : start + 256].to(dev))
        handle.remove()
        f = torch.cat(feats)
        mean, var = f.mean(dim=(0, 2, 3)), f.var(dim=(0, 2, 3), unbiased=True)
        polarizer.to(dev)
        with torch.no_grad():
            polarizer.bn.running_mean.copy_(mean)
            polarizer.bn.running_var.copy_(var)
            polarizer.bn.weight.copy_((var + polarizer.bn.eps).sqrt())
            polarizer.bn.bias.copy_(mean)
        _replace(model, path, Polarized(polarizer, conv))
        model.eval()

        d = clean_data.x[0].numel()
        bound = p["bound"] if p["bound"] is not None else 3.0 * math.sqrt(d / _REF_DIM)
        n, bs = len(clean_data), p["batch_size"]
        params = list(polarizer.parameters())
        rng_devices = [dev] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                warm_opt = torch.optim.SGD(params, lr=p["warm_lr"])  # official: plain SGD
                opt = torch.optim.SGD(params, lr=p["lr"], momentum=0.9, weight_decay=5e-4)
                total_epochs = p["warm_epochs"] + p["epochs"]
                bar = progress_bar(total_epochs * batches(n, bs), "npd", enabled=p["progress"])
                for epoch in range(total_epochs):
                    warm = epoch < p["warm_epochs"]
                    perm = torch.randperm(n, generator=gen)
                    total = 0.0
                    for start in range(0, n, bs):
                        idx = perm[start : start + bs]
                        x, y = clean_data.x[idx].to(dev), clean_data.y[idx].to(dev)
                        if warm:
                            polarizer.train()
                            loss = F.cross_entropy(model(x), y)
                            o = warm_opt
                        else:
                            polarizer.eval()
                            with torch.no_grad():
                                logits = model(x)
                                yhat_clean = logits.argmax(1)
                                masked = logits.scatter(1, y[:, None], float("-inf"))
                                t = masked.argmax(1)
                            x_adv = self._targeted_pgd(model, x, t, bound, p["step_size"], p["pgd_steps"])
                            polarizer.train(p["train_bn"])
                            out_c = model(x)
                            # adversarial forward: batch statistics, running ones frozen (disable_running_stats)
                            momentum, polarizer.bn.momentum = polarizer.bn.momentum, 0.0
                            try:
                                out_a = model(x_adv)
                            finally:
                                polarizer.bn.momentum = momentum
                            with torch.no_grad():
                                y_prime = out_a.scatter(1, y[:, None], float("-inf")).argmax(1)
                            log_not = torch.log((1.0 - F.softmax(out_a, dim=1)).clamp_min(1e-6))
                            loss = (p["lambda1"] * F.cross_entropy(out_c, y)
                                    + p["lambda2"] * F.cross_entropy(out_a, yhat_clean)
                                    + p["lambda3"] * F.nll_loss(log_not, y_prime)
                                    + p["lambda4"] * F.nll_loss(log_not, t))
                            o = opt
                        if not math.isfinite(float(loss.detach())):
                            raise InputError(f"NPD diverged at epoch {epoch + 1}; try a smaller lr")
                        o.zero_grad(set_to_none=True)
                        loss.backward()
                        o.step()
                        total += float(loss.detach()) * len(idx)
                        bar.update(1)
                    bar.set_postfix(epoch=f"{epoch + 1}/{total_epochs}", loss=f"{total / n:.4f}")
                bar.close()
        finally:
            for q, flag in flags:
                q.requires_grad_(flag)
            model.eval()
            model.to(home)
        return model


__all__ = ["NeuralPolarizer", "NeuralPolarizerDefense", "Polarized", "find_insertion_point"]
