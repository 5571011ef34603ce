"""SAU: Shared Adversarial Unlearning.

Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial
Examples", NeurIPS 2023 (arXiv 2307.10562); official code SCLBD/BackdoorBench ``defense/sau.py``
(class ``Shared_PGD``) and ``config/defense/sau/*.yaml``.
"""

from __future__ import annotations

import copy
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
    check_device,
    check_float,
    check_positive_int,
)
from .base import Purifier, PurifierTags
from .registry import register


def _js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of ``softmax(logits_a)`` and ``softmax(logits_b)`` (probabilities
    clamped at 1e-8 as in the official ``Shared_PGD``)."""
    pa, pb = F.softmax(logits_a, dim=1).clamp(min=1e-8), F.softmax(logits_b, dim=1).clamp(min=1e-8)
    m = 0.5 * (pa + pb)
    return (0.5 * (pa * pa.log() + pb * pb.log()) - 0.5 * (pa * m.log() + pb * m.log())).sum(1)


def shared_loss(logits_adv: torch.Tensor, yhat_ref: torch.Tensor, poison: torch.Tensor) -> torch.Tensor:
    """SAU's shared-adversarial loss, official form: ``-log(1 - p(yhat_ref | x + d))`` summed over the
    potential-poison samples (``poison`` mask) and divided by the **batch** size (not by the number of poison
    samples). As in the official code, the two algebraically identical forms ``-log(1e-6 + min(1 - p, 0.999))``
    and ``-log(1 + 1e-6 - max(p, 0.001))`` are averaged, so ``p < 0.001`` contributes a constant."""
    prob = F.softmax(logits_adv, dim=1)
    one_hot = F.one_hot(yhat_ref, num_classes=logits_adv.shape[1]).to(prob.dtype)
    neg_p = (prob * (1.0 - one_hot)).sum(1)[poison]
    pos_p = (prob * one_hot).sum(1)[poison]
    total = -torch.log(1e-6 + neg_p.clamp(max=0.999)).sum() - torch.log(1.0 + 1e-6 - pos_p.clamp(min=0.001)).sum()
    return total / 2 / logits_adv.shape[0]


@register
class SharedAdversarialUnlearning(Purifier):
    """Shared Adversarial Unlearning (Wei et al., NeurIPS 2023).

    A frozen copy ``h_ref`` of the backdoored model is kept; the purified model ``h`` starts from it. Per
    mini-batch ``(x, y)`` of clean data:

    1. *Shared adversarial examples* (inner PGD, L-inf ball of radius ``eps``, ``pgd_steps`` signed steps of
       ``pgd_step_size``, starting at the ``+eps`` corner as the official ``pgd_init: max``): minimise
       ``beta1 * L_adv + beta2 * L_share`` over ``delta``, with ``L_adv = -(CE(h(x+d), y) + CE(h_ref(x+d), y)) / 2``
       over the samples whose prediction that model has not yet changed (relative to its own clean
       prediction) and ``L_share`` the Jensen-Shannon divergence of the two models' softmax over the samples
       that are not yet *shared* adversarial examples (both models' predictions changed from their own clean
       predictions, to the same label: the official rule, not the true label), both sums divided by the batch
       size; stops early once all are shared.
    2. *Unlearning* (outer step, Adam, cosine schedule over ``epochs`` stepped per epoch):
       ``lambda1 * CE(h(x), y) + lambda2 * CE(h(x+d), y) + lambda3 * L_shared``, where ``L_shared``
       (:func:`shared_loss`) sums ``-log(1 - p_h(yhat_ref | x+d))`` over the "potential poison" samples
       (``yhat_ref = argmax h_ref(x+d)`` differs from ``y`` and from ``h_ref(x)``) and divides by the batch
       size, as the official code. Clean and adversarial inputs go through one concatenated forward, as in the
       official code.

    BN/dropout of ``h`` stay in eval mode unless ``train_mode=True`` (official default: "fixing BN leads to
    higher ACC but also higher ASR"); ``h_ref`` is always in eval mode.

    Differences from the official code:
        - ``x + delta`` is clipped to ``[0, 1]`` (certkit models take pixels in ``[0, 1]`` with ``Normalize`` as
          their first layer); the official code does not clip;
        - no label smoothing or data augmentation; batch order seeded by ``seed``; the defender's data is
          passed in (official: 5% random clean training data).

    Defaults: PGD (eps 0.2, 5 steps of 0.2, max-init), beta1 0.01, beta2 1, lambda1 1, lambda2 0,
    lambda3 1, Adam lr 1e-4, batch 256 and 100 epochs follow the official CIFAR-10 config. SAU costs ~12 FT
    epochs per epoch, so 100 epochs are GPU work at realistic sizes (purifier-notes.md section 14): on a CPU
    pass a smaller ``epochs`` (the benchmark and the comparison preset record the budget they use). With a
    tiny clean set (one or two batches per epoch) lr 1e-4 barely
    moves the model: raise ``lr`` (e.g. 1e-3) or lower ``batch_size``.

    Args:
        epochs: passes over the clean data (>= 1). lr: Adam learning rate (> 0). batch_size: (>= 1).
        eps: L-inf radius of the perturbation in pixel units (> 0, <= 1). pgd_steps: PGD iterations (>= 1).
        pgd_step_size: PGD signed step (> 0). beta1, beta2: PGD weights of ``L_adv`` and ``L_share`` (>= 0).
        lambda1, lambda2, lambda3: outer weights of clean CE, adversarial CE, shared loss (>= 0).
        train_mode: BN/dropout of ``h`` in train mode while unlearning.
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bar per batch.
    """

    name = "sau"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="weights")
    fast_params = dict(epochs=1, batch_size=64, pgd_steps=2)

    def __init__(self, epochs: int = 100, lr: float = 1e-4, batch_size: int = 256, eps: float = 0.2,
                 pgd_steps: int = 5, pgd_step_size: float = 0.2, beta1: float = 0.01, beta2: float = 1.0,
                 lambda1: float = 1.0, lambda2: float = 0.0, lambda3: float = 1.0, train_mode: bool = False,
                 device: str = "auto", progress: bool = False) -> None:
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.eps = eps
        self.pgd_steps = pgd_steps
        self.pgd_step_size = pgd_step_size
        self.beta1 = beta1
        self.beta2 = beta2
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.lambda3 = lambda3
        self.train_mode = train_mode
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """Per epoch, ``pgd_steps`` PGD steps through both models and one update on the clean and adversarial
        batch: ``2 pgd_steps + 2`` passes (12 at the defaults, purifier-notes.md section 1)."""
        per = 2 * self.pgd_steps + 2
        return float(self.epochs * per), f"{self.epochs} epochs x ({self.pgd_steps} PGD steps on 2 models + update)"

    def _validate(self) -> dict[str, Any]:
        return {
            "epochs": check_positive_int(self.epochs, "epochs"),
            "lr": check_float(self.lr, "lr", strict=True),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "eps": check_float(self.eps, "eps", strict=True, maximum=1.0),
            "pgd_steps": check_positive_int(self.pgd_steps, "pgd_steps"),
            "pgd_step_size": check_float(self.pgd_step_size, "pgd_step_size", strict=True),
            "beta1": check_float(self.beta1, "beta1"),
            "beta2": check_float(self.beta2, "beta2"),
            "lambda1": check_float(self.lambda1, "lambda1"),
            "lambda2": check_float(self.lambda2, "lambda2"),
            "lambda3": check_float(self.lambda3, "lambda3"),
            "train_mode": bool(self.train_mode),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    # ------------------------------------------------------------------------------------------ inner
    def _shared_pgd(self, h: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    ref_clean: torch.Tensor, h_clean: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        eps, step = p["eps"], p["pgd_step_size"]
        was_training = h.training
        h.eval()
        delta = torch.full_like(x, eps)
        for _ in range(p["pgd_steps"]):
            delta.requires_grad_(True)
            xa = (x + delta).clamp(0.0, 1.0)
            out_h, out_r = h(xa), ref(xa)
            pred_h, pred_r = out_h.argmax(1), out_r.argmax(1)
            fooled_h, fooled_r = pred_h != h_clean, pred_r != ref_clean
            shared = fooled_h & fooled_r & (pred_h == pred_r)
            if bool(shared.all()):  # the official step would have a zero gradient, then stop
                delta = delta.detach()
                break
            ce_h = F.cross_entropy(out_h, y, reduction="none")
            ce_r = F.cross_entropy(out_r, y, reduction="none")
            l_adv = -0.5 * ((ce_h * (~fooled_h)).sum() + (ce_r * (~fooled_r)).sum()) / len(x)
            l_share = (_js_divergence(out_h, out_r) * (~shared)).sum() / len(x)
            loss = p["beta1"] * l_adv + p["beta2"] * l_share
            grad, = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta - step * grad.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0.0, 1.0) - x
        h.train(was_training)
        return (x + delta.detach()).clamp(0.0, 1.0)

    # ------------------------------------------------------------------------------------------ outer
    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        dev, home = p["device"], module_device(model)
        ref = copy.deepcopy(model).to(dev).eval()
        for q in ref.parameters():
            q.requires_grad_(False)
        model.to(dev)
        params = [q for q in model.parameters() if q.requires_grad]
        if not params:
            raise InputError("model has no trainable parameters")
        opt = torch.optim.Adam(params, lr=p["lr"], betas=(0.9, 0.999), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p["epochs"])
        n, bs = len(clean_data), p["batch_size"]
        rng_devices = [dev] if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(seed)
                bar = progress_bar(p["epochs"] * batches(n, bs), "sau", enabled=p["progress"])
                for epoch in range(p["epochs"]):
                    perm = torch.randperm(n, generator=gen)
                    total = 0.0
                    for start in range(0, n, bs):
                        idx = perm[start : start + bs]
                        x, y = clean_data.x[idx].to(dev), clean_data.y[idx].to(dev)
                        with torch.no_grad():
                            model.eval()
                            ref_clean = ref(x).argmax(1)
                            h_clean = model(x).argmax(1)
                        x_adv = self._shared_pgd(model, ref, x, y, ref_clean, h_clean, p)
                        with torch.no_grad():
                            yhat_ref = ref(x_adv).argmax(1)
                        poison = (yhat_ref != y) & (yhat_ref != ref_clean)
                        model.train(p["train_mode"])
                        out = model(torch.cat([x, x_adv]))
                        if out.dim() != 2 or (clean_data.num_classes and out.shape[1] != clean_data.num_classes):
                            raise InputError(f"model must return logits [batch, classes], got {tuple(out.shape)}")
                        out_c, out_a = out[: len(x)], out[len(x):]
                        loss = p["lambda1"] * F.cross_entropy(out_c, y)
                        if p["lambda2"] > 0:
                            loss = loss + p["lambda2"] * F.cross_entropy(out_a, y)
                        if p["lambda3"] > 0 and bool(poison.any()):
                            loss = loss + p["lambda3"] * shared_loss(out_a, yhat_ref, poison)
                        if not math.isfinite(float(loss.detach())):
                            raise InputError(f"SAU diverged at epoch {epoch + 1} (lr={p['lr']:g}); try a smaller lr")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
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


__all__ = ["SharedAdversarialUnlearning", "shared_loss"]
