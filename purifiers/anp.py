"""ANP: Adversarial Neuron Pruning.

Wu, Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021 (arXiv 2110.14430);
official code csdongxian/ANP_backdoor, BackdoorBench re-implementation SCLBD/BackdoorBench ``defense/anp.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from certkit.devices import module_device
from certkit.errors import InputError

from ._common import (
    check_device,
    check_float,
    check_positive_int,
    split_validation,
)
from .base import Purifier, PurifierTags
from .fine_pruning import accuracy
from .registry import register

#: thresholds tried by ``threshold="validation"``: 0, 0.05, ..., 0.9
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(19))


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The affine BatchNorm layers of ``model`` (registration order); InputError if there is none."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise InputError(f"{type(model).__name__} has no BatchNorm layer: ANP masks BatchNorm neurons")
    affine = [(n, m) for n, m in bns if m.weight is not None and m.bias is not None]
    if not affine:
        raise InputError(f"{type(model).__name__} has BatchNorm layers but none is affine (no gamma/beta to mask)")
    return affine


def prune_by_threshold(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> int:
    """In place: set the BN scale ``gamma`` to 0 (``beta`` kept) for every neuron whose mask is ``<= threshold``
    (as the official ``prune_neuron_cifar.py``); returns the number of pruned neurons."""
    modules = dict(model.named_modules())
    count = 0
    with torch.no_grad():
        for name, m in masks.items():
            bn = modules[name]
            sel = (m <= threshold).to(bn.weight.device)
            bn.weight[sel] = 0.0
            count += int(sel.sum())
    return count


def ascend_noise_(noise: Sequence[torch.Tensor], loss_fn: Callable[[], torch.Tensor], eps: float, steps: int,
                  clip: bool) -> None:
    """In place: ``steps`` signed gradient-ascent steps of size ``eps / steps`` on ``loss_fn()`` w.r.t. the noise
    tensors. The official code does not re-project, so noise drawn in ``[-eps, eps]`` can end anywhere in
    ``[-2 eps, 2 eps]``; ``clip=True`` clamps it back to ``[-eps, eps]`` after every step."""
    for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(), list(noise))
        with torch.no_grad():
            for v, g in zip(noise, grads):
                v.add_(g.sign(), alpha=eps / steps)
                if clip:
                    v.clamp_(-eps, eps)


@register
class AdversarialNeuronPruning(Purifier):
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

    Every BatchNorm neuron ``k`` (channel of an affine BN layer, found by type) gets a mask ``m_k`` in [0, 1]
    (init 1) and multiplicative noise: ``gamma_k * (m_k + xi_w)`` and ``beta_k * (1 + xi_b)``. On a copy of the
    model with BN in train mode and frozen weights, each of ``n_iters`` iterations draws a batch of clean data
    and (1) draws ``xi ~ U[-eps, eps]``, takes ``noise_steps`` signed gradient-ascent steps of size
    ``eps / noise_steps`` on ``CE`` (:func:`ascend_noise_`); (2) updates the masks with SGD (momentum 0.9) on
    ``alpha * CE(clean, masked) + (1 - alpha) * CE(masked + noise)`` and clips them to [0, 1]. The perturbed BN
    is evaluated with :func:`torch.func.functional_call` (replacing gamma and beta for that call only), so no
    layer is swapped in the model. Finally the original model (with its own BN statistics) is pruned:
    ``gamma = 0`` for the neurons whose mask is ``<= threshold`` (as the official ``prune_neuron_cifar.py``).
    The masks are stored as ``masks_`` (dict BN name -> tensor) and the threshold used as ``threshold_``.

    As in the official code (csdongxian/ANP_backdoor ``optimize_mask_cifar.py`` and BackdoorBench), the noise
    is not re-projected after the ascent step, so ``|xi|`` can reach ``2 eps``; ``clip_noise=True`` clamps it
    to ``[-eps, eps]`` after every step (certkit's former behaviour: a weaker adversary).

    ``threshold=0.2`` (the original repository's default) prunes with a fixed threshold;
    ``threshold="validation"`` picks the largest threshold in ``0, 0.05, ..., 0.9`` whose validation accuracy
    stays >= ``(1 - acc_drop)`` times the unpruned model's (the validation split is carved off the clean data,
    ``validation_fraction``, when none is given).

    Defaults: eps 0.4, one noise step, alpha 0.2, mask lr 0.2, 2000 iterations, batch 128 (paper / official
    code). On a CPU at 28x28 use <= 400 iterations (purifier-notes.md section 14). On the 8x8 digits BadNets
    BN CNN of the tests eps 0.4 (100-300 iterations) leaves the ASR at 0.96-1.0; ``eps=0.6, n_iters=200,
    threshold="validation"`` lowered it to 0.05-0.44 (seeds 0-3) at <= 0.007 clean-accuracy cost
    (``clip_noise=True``: 0.38-0.83, clean accuracy down to 0.79 for one seed).

    Differences from the official code:
        - BackdoorBench uses mask lr 0.01 (the original repository 0.2, kept here);
        - BackdoorBench sweeps the threshold and keeps the model with the lowest *test ASR* within a 10% relative
          drop of *test* accuracy (an oracle); here the sweep only uses the validation split and clean accuracy;
        - BN neurons are found by type (all affine BN layers, including PreAct blocks' ``bn1``/``bn2``);
          batches and the noise initialisation are seeded by ``seed``; the BN running statistics updated
          while learning the masks belong to a discarded copy (as the official code reloads the checkpoint).

    Args:
        eps: noise bound (>= 0; 0 disables the adversarial term). noise_steps: ascent steps (>= 1).
        clip_noise: clamp the noise to ``[-eps, eps]`` after each ascent step (default False: official).
        alpha: weight of the clean loss (in [0, 1]). lr, momentum: mask SGD settings. n_iters: iterations.
        batch_size: (>= 1). threshold: number in [0, 1] or ``"validation"``. acc_drop: tolerated relative
        validation-accuracy drop for ``threshold="validation"`` (in [0, 1)).
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bar over iterations.
    """

    name = "anp"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.01, changes="pruning", needs_batchnorm=True)
    fast_params = dict(n_iters=2, batch_size=16)
    epoch_batches = False  # a budget of n_iters mini-batches, not of epochs

    def __init__(self, eps: float = 0.4, noise_steps: int = 1, alpha: float = 0.2, lr: float = 0.2,
                 momentum: float = 0.9, n_iters: int = 2000, batch_size: int = 128, threshold: float | str = 0.2,
                 acc_drop: float = 0.1, clip_noise: bool = False, device: str = "auto",
                 progress: bool = False) -> None:
        self.eps = eps
        self.noise_steps = noise_steps
        self.alpha = alpha
        self.lr = lr
        self.momentum = momentum
        self.n_iters = n_iters
        self.batch_size = batch_size
        self.threshold = threshold
        self.acc_drop = acc_drop
        self.clip_noise = clip_noise
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """``n_iters`` mini-batches, each ``noise_steps`` perturbation steps and the mask update (a perturbed
        and a clean forward, one backward: about 4/3 of a pass), in units of passes over ``n`` samples."""
        per_batch = min(self.batch_size, n) / max(n, 1)
        return self.n_iters * per_batch * (self.noise_steps + 4 / 3), (
            f"{self.n_iters} iterations of {min(self.batch_size, n)} x ({self.noise_steps} noise steps + mask update)")

    def _validate(self) -> dict[str, Any]:
        thr = self.threshold
        if isinstance(thr, str):
            if thr != "validation":
                raise InputError(f"threshold must be a number in [0, 1] or 'validation', got {thr!r}")
        else:
            thr = check_float(thr, "threshold", maximum=1.0)
        return {
            "eps": check_float(self.eps, "eps"),
            "noise_steps": check_positive_int(self.noise_steps, "noise_steps"),
            "alpha": check_float(self.alpha, "alpha", maximum=1.0),
            "lr": check_float(self.lr, "lr", strict=True),
            "momentum": check_float(self.momentum, "momentum", maximum=1.0 - 1e-12),
            "n_iters": check_positive_int(self.n_iters, "n_iters"),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "threshold": thr,
            "acc_drop": check_float(self.acc_drop, "acc_drop", maximum=1.0 - 1e-12),
            "clip_noise": bool(self.clip_noise),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    def _learn_masks(self, net: nn.Module, bns: list, data: Any, p: dict, seed: int,
                     dev: torch.device) -> dict[str, torch.Tensor]:
        for q in net.parameters():
            q.requires_grad_(False)
        gammas = {n: m.weight.detach() for n, m in bns}
        betas = {n: m.bias.detach() for n, m in bns}
        masks = {n: torch.ones_like(g, requires_grad=True) for n, g in gammas.items()}
        opt = torch.optim.SGD(list(masks.values()), lr=p["lr"], momentum=p["momentum"])
        eps, steps = p["eps"], p["noise_steps"]
        n, bs = len(data), min(p["batch_size"], len(data))

        def forward(x: torch.Tensor, xi_w: dict | None, xi_b: dict | None) -> torch.Tensor:
            params = {}
            for name in gammas:
                mw = masks[name] if xi_w is None else masks[name] + xi_w[name]
                params[f"{name}.weight"] = gammas[name] * mw
                params[f"{name}.bias"] = betas[name] if xi_b is None else betas[name] * (1.0 + xi_b[name])
            return functional_call(net, params, (x,))

        rng_devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            net.train()
            perm, pos = torch.randperm(n, generator=gen), 0
            bar = tqdm(range(p["n_iters"]), desc="anp", disable=not p["progress"], leave=False, dynamic_ncols=True)
            for it in bar:
                if pos + bs > n:
                    perm, pos = torch.randperm(n, generator=gen), 0
                idx = perm[pos : pos + bs]
                pos += bs
                x, y = data.x[idx].to(dev), data.y[idx].to(dev)
                loss_rob = None
                if eps > 0:
                    xi_w = {k: ((torch.rand(g.shape, generator=gen) * 2 - 1) * eps).to(dev).requires_grad_(True)
                            for k, g in gammas.items()}
                    xi_b = {k: ((torch.rand(g.shape, generator=gen) * 2 - 1) * eps).to(dev).requires_grad_(True)
                            for k, g in gammas.items()}
                    ascend_noise_([*xi_w.values(), *xi_b.values()],
                                  lambda x=x, y=y, w=xi_w, b=xi_b: F.cross_entropy(forward(x, w, b), y),
                                  eps, steps, p["clip_noise"])
                    xi_w = {k: v.detach() for k, v in xi_w.items()}
                    xi_b = {k: v.detach() for k, v in xi_b.items()}
                    loss_rob = F.cross_entropy(forward(x, xi_w, xi_b), y)
                loss_nat = F.cross_entropy(forward(x, None, None), y)
                loss = p["alpha"] * loss_nat + (1 - p["alpha"]) * loss_rob if loss_rob is not None else loss_nat
                if not math.isfinite(float(loss.detach())):
                    raise InputError(f"ANP diverged at iteration {it + 1}; try a smaller lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in masks.values():
                        m.clamp_(0.0, 1.0)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        return {k: v.detach().cpu() for k, v in masks.items()}

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        bns = batchnorm_layers(model)
        if p["threshold"] == "validation" and validation is None:
            clean_data, validation = split_validation(clean_data, self.validation_fraction, seed)
        dev, home = p["device"], module_device(model)
        net = copy.deepcopy(model).to(dev)
        net_bns = [(n, dict(net.named_modules())[n]) for n, _ in bns]
        masks = self._learn_masks(net, net_bns, clean_data, p, seed, dev)
        del net
        self.masks_ = masks
        if p["threshold"] == "validation":
            model.to(dev)
            try:
                original = {n: m.weight.detach().clone() for n, m in bns}
                acc0 = accuracy(model, validation, dev)
                chosen = 0.0
                for thr in THRESHOLD_GRID:
                    prune_by_threshold(model, masks, thr)
                    acc = accuracy(model, validation, dev)
                    with torch.no_grad():
                        for n, m in bns:
                            m.weight.copy_(original[n])
                    if acc >= (1.0 - p["acc_drop"]) * acc0 - 1e-12:
                        chosen = thr
            finally:
                model.to(home)
            threshold = chosen
        else:
            threshold = p["threshold"]
        self.threshold_ = float(threshold)
        prune_by_threshold(model, masks, threshold)
        model.eval()
        return model


__all__ = ["THRESHOLD_GRID", "AdversarialNeuronPruning", "ascend_noise_", "batchnorm_layers", "prune_by_threshold"]
