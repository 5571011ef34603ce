"""Quadratic Bezier mode connectivity (Garipov et al., NeurIPS 2018) and BatchNorm re-estimation, as used by
TSC (:mod:`purifiers.tsc`).

A curve between parameter sets ``A`` (start) and ``B`` (end) with a trainable middle point ``M`` is
``theta(t) = (1-t)^2 A + 2t(1-t) M + t^2 B``, ``t`` in ``[0, 1]``. Only ``M`` is trained (endpoints fixed,
``M`` initialised at the linear midpoint ``(A + B) / 2``); each mini-batch samples one ``t ~ U(0, 1)`` and the
network is evaluated at ``theta(t)`` with :func:`torch.func.functional_call` (no model surgery).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from certkit.backdoor.data import ArrayDataset
from certkit.errors import InputError
from certkit.progress import bar as progress_bar
from certkit.progress import batches

__all__ = ["bezier_point", "fit_bezier_curve", "parameters_of", "update_bn"]

Params = dict[str, torch.Tensor]
#: ``loss(forward, x, y, generator) -> scalar``; ``forward(x)`` runs the network at the current curve point.
CurveLoss = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, torch.Generator],
                     torch.Tensor]


def parameters_of(model: nn.Module) -> Params:
    """Detached copies of the model's named parameters."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bezier_point(start: Params, mid: Params, end: Params, t: float | torch.Tensor) -> Params:
    """``theta(t) = (1-t)^2 start + 2t(1-t) mid + t^2 end`` for every parameter name."""
    c0, c1, c2 = (1 - t) ** 2, 2 * t * (1 - t), t**2
    return {n: c0 * start[n] + c1 * mid[n] + c2 * end[n] for n in start}


def fit_bezier_curve(
    model: nn.Module,
    start: Params,
    end: Params,
    data: ArrayDataset,
    loss: CurveLoss,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    curve_wd: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    t_max: int | None = None,
    progress: bool = False,
    desc: str = "curve",
) -> Params:
    """Train the middle point of a quadratic Bezier curve from ``start`` to ``end`` and return it.

    ``model`` supplies the architecture and its buffers (it runs in train mode, so BatchNorm uses batch
    statistics; its running statistics are overwritten and must be re-estimated with :func:`update_bn` for
    any point taken from the curve). Per mini-batch (order and ``t`` drawn from ``generator``):
    ``loss(theta(t)) + 0.5 * curve_wd * ||theta(t)||^2`` (all parameters), SGD on the middle point
    (``momentum``, ``weight_decay``), cosine learning rate over ``t_max`` epochs (default ``epochs``),
    stepped once per epoch. Non-finite loss raises :class:`InputError`. Tensors live on ``device``.
    """
    names = [n for n, _ in model.named_parameters()]
    if set(names) != set(start) or set(names) != set(end):
        raise InputError("curve endpoints do not match the model's parameters")
    model.to(device)
    a = {n: start[n].detach().to(device) for n in names}
    b = {n: end[n].detach().to(device) for n in names}
    mid = {n: (0.5 * (a[n] + b[n])).clone().requires_grad_(True) for n in names}
    opt = torch.optim.SGD(list(mid.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max or epochs)
    n = len(data)
    model.train()
    bar = progress_bar(epochs * batches(n, batch_size), desc, enabled=progress)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total, seen = 0.0, 0
        for begin in range(0, n, batch_size):
            idx = order[begin:begin + batch_size]
            bar.update(1)
            if len(idx) < 2 <= n:  # a batch of one breaks train-mode BatchNorm and contrastive losses
                continue
            xb, yb = data.x[idx].to(device), data.y[idx].to(device)
            t = float(torch.rand((), generator=generator))
            theta = bezier_point(a, mid, b, t)

            def forward(x: torch.Tensor, theta: Params = theta) -> torch.Tensor:
                return functional_call(model, theta, (x,), strict=False)

            value = loss(forward, xb, yb, generator)
            reg = sum(torch.sum(w * w) for w in theta.values())
            total_loss = value + 0.5 * curve_wd * reg
            if not bool(torch.isfinite(total_loss)):
                raise InputError(f"the curve fit diverged at epoch {epoch + 1} (lr={lr:g}); try a smaller curve_lr")
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            opt.step()
            total += float(value.detach()) * len(idx)
            seen += len(idx)
        sched.step()
        if seen:
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{total / seen:.4f}")
    bar.close()
    model.eval()
    return {k: v.detach() for k, v in mid.items()}


@torch.no_grad()
def update_bn(model: nn.Module, data: ArrayDataset, *, batch_size: int, device: torch.device) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from scratch on ``data`` (in place).

    Running statistics are reset, then train-mode forwards without gradient accumulate a cumulative
    average weighted by batch size (``momentum = b / (seen + b)``, as ``update_bn`` of the mode-connectivity
    code), so each running mean equals the mean of the layer's input over all of ``data`` (spatial positions
    included) when the layer's input does not depend on batch composition. Momenta are restored and the
    model ends in eval mode. Models without BatchNorm are left unchanged.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    model.to(device)
    momenta = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
    model.train()
    seen = 0
    try:
        for begin in range(0, len(data), batch_size):
            xb = data.x[begin:begin + batch_size].to(device)
            b = xb.shape[0]
            if b < 2 and seen > 0:  # a batch of one has no batch variance; it adds nothing reliable
                continue
            for m in bns:
                m.momentum = b / (seen + b)
            model(xb)
            seen += b
    finally:
        for m in bns:
            m.momentum = momenta[m]
        model.eval()
    return model
