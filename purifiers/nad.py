"""NAD: Neural Attention Distillation.

Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural
Networks", ICLR 2021 (arXiv 2101.05930); official code bboylyg/NAD, BackdoorBench re-implementation
SCLBD/BackdoorBench ``defense/nad.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
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
    check_positive_int,
    check_sgd_params,
)
from .base import Purifier, PurifierTags
from .registry import register


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD's attention ``A(F) = sum_c |F_c|^p`` over channels, flattened and L2-normalised per sample:
    ``[N, C, H, W] -> [N, H*W]``."""
    a = features.abs().pow(p).sum(dim=1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + 1e-12)


def _is_stage(m: nn.Module) -> bool:
    kids = list(m.children())
    return (isinstance(m, nn.Sequential) and bool(kids)
            and all(any(True for _ in c.children()) and any(isinstance(q, nn.Conv2d) for q in c.modules())
                    for c in kids))


def attention_sites(model: nn.Module, probe: torch.Tensor, n_maps: int) -> list[tuple[str, nn.Module]]:
    """The (at most) ``n_maps`` deepest feature maps with spatial size > 1, found by structure.

    Residual nets (sequences of conv-containing blocks, e.g. PreAct-ResNet18's ``layer1..4``): the outputs of
    those stages. Chain CNNs: each ``nn.Conv2d``'s post-activation output (the first activation module after
    it in its ``nn.Sequential``, skipping BatchNorm; the conv output itself if none). Ordered by execution on
    ``probe``; maps with ``H*W == 1`` are dropped. Raises :class:`InputError` if there is none."""
    named = list(model.named_modules())
    stages = [(n, m) for n, m in named if _is_stage(m)]
    stages = [(n, m) for n, m in stages if not any(_is_stage(c) for c in list(m.modules())[1:])]
    cands: list[tuple[str, nn.Module]] = []
    if stages:
        cands = stages
    else:
        parents = {id(c): (n, m) for n, m in named for c in m.children()}
        for name, conv in named:
            if not isinstance(conv, nn.Conv2d):
                continue
            site = (name, conv)
            parent = parents.get(id(conv))
            if parent is not None and isinstance(parent[1], nn.Sequential):
                kids = list(parent[1].named_children())
                i = [c for _, c in kids].index(conv)
                for cname, c in kids[i + 1 :]:
                    if isinstance(c, nn.modules.batchnorm._BatchNorm):
                        continue
                    if type(c).__module__ == "torch.nn.modules.activation":
                        site = (f"{parent[0]}.{cname}" if parent[0] else cname, c)
                    break
            cands.append(site)
    if not cands:
        raise InputError(f"{type(model).__name__} has no nn.Conv2d layer: NAD distils convolutional feature maps")
    calls: list[tuple[int, tuple]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, i=i: calls.append((i, tuple(out.shape))))
             for i, (_, m) in enumerate(cands)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    order, seen = [], set()
    for i, shape in calls:
        if i not in seen and len(shape) == 4 and shape[2] * shape[3] > 1:
            seen.add(i)
            order.append(i)
    if not order:
        raise InputError(f"{type(model).__name__} has no convolutional feature map larger than 1x1 for NAD")
    return [cands[i] for i in order[-n_maps:]]


class _Capture:
    """Forward hooks storing the latest output of each site (removed with :meth:`close`)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.out: list[torch.Tensor | None] = [None] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int) -> Callable:
        def fn(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            self.out[i] = out
        return fn

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@register
class NeuralAttentionDistillation(Purifier):
    """Neural Attention Distillation (Li et al., ICLR 2021).

    1. Teacher: a copy of the backdoored model fine-tuned on the clean data for ``te_epochs`` (cross-entropy).
    2. Student: the backdoored model trained for ``epochs`` on
       ``CE(f_s(x), y) + sum_l beta_l * MSE(A(F_s^l), A(F_t^l))`` with the teacher frozen in eval mode, where
       ``A(F) = sum_c |F_c|^p`` (p = 2), flattened and L2-normalised per sample (:func:`attention_map`).

    Feature maps (:func:`attention_sites`): the deepest ``len(betas)`` maps with spatial size > 1: the outputs
    of ``layer2``/``layer3``/``layer4`` of PreAct-ResNet18 at 32x32 (``layer1..3`` at 8x8, where ``layer4``
    is 1x1), the three post-ReLU conv outputs of the digits CNNs; when fewer maps exist (two on RAB's MNIST
    CNN) the last betas are used (1000, 1000).

    Both stages use SGD (momentum 0.9, weight decay 5e-4) at a constant lr 0.01, batch 256, BN in train mode.
    Defaults: ``betas (500, 1000, 1000)``, ``p 2``, 10 + 10 epochs (BackdoorBench / official code).
    NAD needs a teacher in which fine-tuning has already weakened the backdoor: on the 8x8 digits BadNets
    model of the tests fine-tuning keeps it, and NAD keeps clean accuracy but lowers the ASR only slightly.

    Differences from the official code:
        - BackdoorBench attaches the third loss to PreAct-ResNet18's 1x1 ``avgpool`` output, whose normalised
          attention is constant, so that term is identically 0; here maps of size 1x1 are skipped and the
          three deepest larger maps are used;
        - the attention loss is the mean squared difference of the normalised maps as in the official code
          (the paper writes the L2 norm; the betas are calibrated for the mean);
        - feature maps are found by structure, not attribute names; the lr is constant (BackdoorBench forces
          0.01 for the first 20 epochs); batches seeded by ``seed``.

    Args:
        betas: weights of the attention losses, shallow to deep (non-negative numbers). p: attention exponent
            (> 0). te_epochs, epochs: teacher / student epochs. lr, momentum, weight_decay, batch_size: SGD.
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bar over epochs.
    """

    name = "nad"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="weights")
    fast_params = dict(te_epochs=1, epochs=1, batch_size=64)

    def __init__(self, betas: Sequence[float] = (500.0, 1000.0, 1000.0), p: float = 2.0, te_epochs: int = 10,
                 epochs: int = 10, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_size: int = 256, device: str = "auto", progress: bool = False) -> None:
        self.betas = betas
        self.p = p
        self.te_epochs = te_epochs
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """The teacher's epochs, then the student's, each with the teacher's forward (about a third of a pass).

        >>> NeuralAttentionDistillation(te_epochs=3, epochs=6).work(100, 10)
        (11.0, '3 teacher + 6 student epochs (with the teacher forward)')
        """
        return self.te_epochs + self.epochs * 4 / 3, (f"{self.te_epochs} teacher + {self.epochs} student epochs "
                                                      "(with the teacher forward)")

    def _validate(self) -> dict[str, Any]:
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) == 0:
            raise InputError(f"betas must be a non-empty sequence of non-negative numbers, got {betas!r}")
        return {
            "betas": tuple(check_float(b, "betas") for b in betas),
            "p": check_float(self.p, "p", strict=True),
            "te_epochs": check_positive_int(self.te_epochs, "te_epochs"),
            **check_sgd_params(self),
        }

    @staticmethod
    def _train(model: nn.Module, data: Any, epochs: int, p: dict, gen: torch.Generator, dev: torch.device,
               desc: str, extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=p["lr"],
                              momentum=p["momentum"], weight_decay=p["weight_decay"])
        n, bs = len(data), p["batch_size"]
        model.train()
        with progress_bar(epochs * batches(n, bs), desc, enabled=p["progress"]) as bar:
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for start in range(0, n, bs):
                    idx = perm[start : start + bs]
                    x, y = data.x[idx].to(dev), data.y[idx].to(dev)
                    loss = F.cross_entropy(model(x), y)
                    if extra is not None:
                        loss = loss + extra(x)
                    if not math.isfinite(float(loss.detach())):
                        raise InputError(f"NAD ({desc}) diverged at epoch {epoch + 1}; try a smaller lr")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{total / n:.4f}")
        model.eval()

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        dev, home = p["device"], module_device(model)
        model.to(dev)
        sites = attention_sites(model, clean_data.x[:2].to(dev), len(p["betas"]))
        betas = p["betas"][-len(sites):]
        names = [n for n, _ in sites]
        rng_devices = [dev] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                teacher = copy.deepcopy(model)
                self._train(teacher, clean_data, p["te_epochs"], p, gen, dev, "nad teacher")
                for q in teacher.parameters():
                    q.requires_grad_(False)
                tmods = dict(teacher.named_modules())
                t_cap = _Capture([tmods[n] for n in names])
                s_cap = _Capture([m for _, m in sites])
                try:
                    def at_loss(x: torch.Tensor) -> torch.Tensor:
                        with torch.no_grad():
                            teacher(x)
                        loss = x.new_zeros(())
                        for beta, fs, ft in zip(betas, s_cap.out, t_cap.out):
                            if beta > 0:
                                loss = loss + beta * F.mse_loss(attention_map(fs, p["p"]),
                                                                attention_map(ft, p["p"]))
                        return loss

                    self._train(model, clean_data, p["epochs"], p, gen, dev, "nad student", extra=at_loss)
                finally:
                    t_cap.close()
                    s_cap.close()
        finally:
            model.eval()
            model.to(home)
        return model


__all__ = ["NeuralAttentionDistillation", "attention_map", "attention_sites"]
