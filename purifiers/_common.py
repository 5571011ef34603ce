"""Helpers shared by the purification methods: parameter checks, locating the classification head by
structure, re-initialising a linear layer, and a seeded SGD + cosine fine-tuning loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from certkit._validation import check_float, check_positive_int
from certkit._validation import check_seed as _check_seed
from certkit.backdoor.data import ArrayDataset
from certkit.devices import module_device, resolve_device
from certkit.errors import InputError
from certkit.progress import bar as progress_bar
from certkit.progress import batches


# ---------------------------------------------------------------------------------------------- checks
def check_sgd_params(obj: Any) -> dict[str, Any]:
    """The validated SGD fine-tuning parameters shared by several purifiers: ``epochs``, ``lr``, ``momentum``
    (in [0, 1)), ``weight_decay``, ``batch_size``, ``device`` and ``progress`` attributes of ``obj``."""
    return {
        "epochs": check_positive_int(obj.epochs, "epochs"),
        "lr": check_float(obj.lr, "lr", strict=True),
        "momentum": check_float(obj.momentum, "momentum", maximum=1.0 - 1e-12),
        "weight_decay": check_float(obj.weight_decay, "weight_decay"),
        "batch_size": check_positive_int(obj.batch_size, "batch_size"),
        "device": check_device(obj.device),
        "progress": bool(obj.progress),
    }


def check_seed(seed: Any) -> int:
    """``None`` -> 0 (purification is deterministic by default); else a seed in ``[0, 2**32)``."""
    return _check_seed(seed, allow_none=True)


def check_device(device: Any) -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda[:N]" | torch.device`` (InputError if unavailable)."""
    return resolve_device(device)


def check_inputs(model: Any, clean_data: Any) -> None:
    """The model is an ``nn.Module`` and ``clean_data`` a non-empty :class:`ArrayDataset`."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(clean_data, ArrayDataset):
        raise InputError(f"clean_data must be a certkit.backdoor.data.ArrayDataset, got {type(clean_data).__name__}")
    if len(clean_data) == 0:
        raise InputError("clean_data is empty: the purifier needs some clean labelled data")


def check_num_classes(model: nn.Module, data: ArrayDataset) -> None:
    """The model's recorded number of classes (``certkit_spec``), if any, matches ``data.num_classes``."""
    k = _num_classes_of(model)
    if k is not None and k != data.num_classes:
        raise InputError(f"model has {k} classes but clean_data has num_classes={data.num_classes}")


def split_validation(data: ArrayDataset, fraction: float, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Carve a stratified validation split of ``fraction`` off the defender's clean data.

    Each class keeps at least one sample on the training side; the split is seeded by ``seed``. Returns
    ``(train, validation)``; raises :class:`InputError` when the data is too small for both sides.
    """
    fraction = check_float(fraction, "validation fraction", strict=True, maximum=0.9)
    rng = np.random.default_rng(seed)
    y = data.y.cpu().numpy()
    val_idx: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        val_idx.extend(idx[:k].tolist())
    if not val_idx:
        raise InputError(f"clean data of {len(data)} samples is too small to carve a {fraction:.0%} validation split")
    mask = np.ones(len(data), dtype=bool)
    mask[val_idx] = False
    return data.subset(np.flatnonzero(mask)), data.subset(np.sort(np.asarray(val_idx)))


# ---------------------------------------------------------------------------------------------- head
def _num_classes_of(model: nn.Module) -> int | None:
    spec = getattr(model, "certkit_spec", None)
    if isinstance(spec, dict):
        k = spec.get("kwargs", {}).get("num_classes")
        if k is not None:
            return int(k)
    return None


def find_head(model: nn.Module, num_classes: int | None = None) -> tuple[str, nn.Linear]:
    """The final classification head: the last ``nn.Linear`` (in module registration order) whose
    ``out_features`` equals the number of classes.

    Found by walking ``model.named_modules()``, never by attribute names. ``num_classes`` defaults to
    ``model.certkit_spec["kwargs"]["num_classes"]`` when present, else to the ``out_features`` of the last
    ``nn.Linear``. Returns ``(qualified_name, layer)``; raises :class:`InputError` if there is none.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError(f"{type(model).__name__} has no nn.Linear layer: cannot find a classification head")
    if num_classes is None:
        num_classes = _num_classes_of(model)
    if num_classes is None:
        return linears[-1]
    for name, m in reversed(linears):
        if m.out_features == num_classes:
            return name, m
    sizes = [m.out_features for _, m in linears]
    raise InputError(
        f"no nn.Linear with {num_classes} outputs (the number of classes) in {type(model).__name__}; "
        f"linear output sizes: {sizes}"
    )


def reinit_linear_(layer: nn.Linear, generator: torch.Generator) -> None:
    """In place: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (FST's re-initialisation)."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        w = torch.empty(layer.weight.shape, dtype=layer.weight.dtype).uniform_(-bound, bound, generator=generator)
        layer.weight.copy_(w)
        if layer.bias is not None:
            b = torch.empty(layer.bias.shape, dtype=layer.bias.dtype).uniform_(-bound, bound, generator=generator)
            layer.bias.copy_(b)


# ---------------------------------------------------------------------------------------------- training

def sgd_finetune(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    device: str | torch.device = "auto",
    progress: bool = False,
    desc: str = "purify",
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Fine-tune every trainable parameter of ``model`` in place with mean cross-entropy (+ ``penalty()``),
    SGD (``momentum``, ``weight_decay``) and a cosine learning-rate schedule over ``epochs`` (stepped once
    per epoch, ``T_max = epochs``, as in the FST code). ``after_step()`` runs after every optimiser step
    (e.g. a projection). Shuffling and any model randomness are seeded by ``seed``; the global RNG state is
    restored afterwards. BN/dropout are in train mode during tuning; the model ends in eval mode on its
    original device. Returns the mean loss of each epoch.
    """
    dev = check_device(device)
    home = module_device(model)
    if data.num_classes is not None:
        k = _num_classes_of(model)
        if k is not None and k != data.num_classes:
            raise InputError(f"model has {k} classes but clean_data has num_classes={data.num_classes}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("model has no trainable parameters")
    model.to(dev)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    n = len(data)
    losses: list[float] = []
    rng_devices = [dev] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            shuffle_gen = torch.Generator().manual_seed(seed)
            model.train()
            bar = progress_bar(epochs * batches(n, batch_size), desc, enabled=progress)
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=shuffle_gen)
                total = 0.0
                for start in range(0, n, batch_size):
                    idx = perm[start : start + batch_size]
                    xb, yb = data.x[idx].to(dev), data.y[idx].to(dev)
                    out = model(xb)
                    if out.dim() != 2 or out.shape[1] != data.num_classes:
                        raise InputError(
                            f"model must return logits [batch, {data.num_classes}], got {tuple(out.shape)}"
                        )
                    loss = loss_fn(out, yb)
                    if penalty is not None:
                        loss = loss + penalty()
                    if not bool(torch.isfinite(loss)):
                        raise InputError(f"purification diverged at epoch {epoch + 1} (lr={lr:g}); try a smaller lr")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if after_step is not None:
                        after_step()
                    total += float(loss.detach()) * len(idx)
                    bar.update(1)
                sched.step()
                losses.append(total / n)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{losses[-1]:.4f}")
            bar.close()
    finally:
        model.eval()
        model.to(home)
    return losses
