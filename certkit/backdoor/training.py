"""Training one classifier, optionally with Gaussian noise augmentation (the base model of randomized
smoothing, Cohen et al. 2019; RAB's training-time smoothing adds noise to the training inputs).

Two kinds of training noise (they may be combined; both are added in pixel units and never clipped):

* ``noise_sigma``: fresh Gaussian noise for every batch (Cohen et al. 2019, test-time smoothing's base model);
* ``fixed_noise``: one given perturbation per training input, indexed like the data and added to that
  input in every epoch (RAB's ``SmoothedDataset``: one draw per ensemble member, kept for all epochs; see
  :mod:`certkit.runs.ensemble_train`). The addition happens on the CPU before the batch moves to the device.

Determinism: shuffling uses a CPU ``torch.Generator`` seeded with ``seed``, the noise a generator on the
training device seeded with ``seed + 1``, and any other randomness of the model (e.g. dropout) the global
RNG, re-seeded with ``seed`` inside :func:`torch.random.fork_rng` so the caller's RNG state is untouched.
The same seed, data and initial weights give bit-identical weights on the CPU.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from certkit._validation import check_choice, check_number, check_positive_int, check_seed
from certkit.backdoor.data import ArrayDataset
from certkit.devices import module_device, resolve_device
from certkit.errors import InputError
from certkit.progress import bar as progress_bar
from certkit.progress import batches

__all__ = ["OPTIMIZERS", "TrainingHistory", "noise_finetune", "train_model"]

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")


@dataclass
class TrainingHistory:
    """Per-epoch mean training loss and accuracy (on the noisy training batches) and total wall time."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict ``{"loss": [...], "accuracy": [...], "seconds": ...}``."""
        return asdict(self)


def _nonneg_float(value: Any, name: str, strict: bool = False) -> float:
    v = check_number(value, name)
    if not math.isfinite(v) or v < 0 or (strict and v == 0):
        raise InputError(f"{name} must be a finite number {'> 0' if strict else '>= 0'}, got {value!r}")
    return v


def _check_fixed_noise(noise: Any, data: ArrayDataset) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor):
        raise InputError(f"fixed_noise must be a torch.Tensor or None, got {type(noise).__name__}")
    if not torch.is_floating_point(noise):
        raise InputError(f"fixed_noise must be a floating-point tensor, got dtype {noise.dtype}")
    if tuple(noise.shape) != tuple(data.x.shape):
        raise InputError(
            f"fixed_noise must have the shape of the training inputs {tuple(data.x.shape)}, got {tuple(noise.shape)}"
        )
    noise = noise.detach().to(device="cpu", dtype=data.x.dtype).contiguous()
    if not bool(torch.isfinite(noise).all()):
        raise InputError("fixed_noise contains NaN or inf values")
    return noise



def train_model(
    model: nn.Module,
    data: ArrayDataset,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    noise_sigma: float = 0.0,
    fixed_noise: torch.Tensor | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    desc: str = "train",
    input_transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> TrainingHistory:
    """Train ``model`` in place with cross-entropy on ``data`` and return its :class:`TrainingHistory`.

    Args:
        model: classifier taking ``[B, C, H, W]`` inputs in pixel units, returning logits ``[B, K]``.
        data: training set; ``K`` must equal ``data.num_classes``.
        epochs, lr, batch_size: epochs (>= 1), learning rate (> 0) and mini-batch size.
        optimizer: ``"adam"`` or ``"sgd"`` (SGD uses ``momentum``); ``weight_decay`` applies to both.
        noise_sigma: std (pixel units) of Gaussian noise added to every training batch, drawn afresh each
            batch (Cohen et al. 2019); 0 trains on clean inputs. Noisy inputs are not clipped.
        fixed_noise: optional tensor of the shape of ``data.x`` (``[N, C, H, W]``, finite): row ``i`` is
            added to input ``i`` in every epoch (fixed per-sample noise, RAB); ``None`` (default) adds
            nothing. Combined with ``noise_sigma`` both are added.
        seed: seed of the shuffling, the noise and the model's own randomness.
        device: ``"auto" | "cpu" | "cuda"``; the model goes back to its original device afterwards.
        progress: show a tqdm bar that advances per batch (epochs x batches), with the epoch, loss and
            accuracy of the last finished epoch.
        input_transform: optional ``(batch, step) -> model input`` applied last to every batch, ``step``
            counting batches from 0 over all epochs (e.g. de-randomized smoothing's seeded band ablation,
            :func:`certkit.certify.patch.ablation_train_transform`).

    The model is left in eval mode. Raises :class:`InputError` on bad arguments, a mismatch between the
    model's outputs and ``data.num_classes``, or a NaN/inf loss (divergence: lower ``lr``).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, ArrayDataset):
        raise InputError(f"data must be an ArrayDataset, got {type(data).__name__}")
    if len(data) == 0:
        raise InputError("data is empty: nothing to train on")
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = _nonneg_float(lr, "lr", strict=True)
    weight_decay = _nonneg_float(weight_decay, "weight_decay")
    momentum = _nonneg_float(momentum, "momentum")
    noise_sigma = _nonneg_float(noise_sigma, "noise_sigma")
    optimizer = check_choice(optimizer, OPTIMIZERS, "optimizer")
    if fixed_noise is not None:
        fixed_noise = _check_fixed_noise(fixed_noise, data)
    seed = check_seed(seed, limit=2**63)  # member seeds come from derive_seed (63 bits)
    seed = int(seed)
    spec = getattr(model, "certkit_spec", None)
    if isinstance(spec, dict):
        k = spec.get("kwargs", {}).get("num_classes")
        if k is not None and int(k) != data.num_classes:
            raise InputError(f"model has {k} classes but data has num_classes={data.num_classes}")
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError("model has no trainable parameters")

    dev = resolve_device(device)
    home = module_device(model)
    model.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    history = TrainingHistory()
    n = len(data)
    t0 = time.perf_counter()
    rng_devices = [dev] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            # seed only the generators that fork_rng restores (CPU, and the training GPU if any)
            torch.default_generator.manual_seed(seed)
            if dev.type == "cuda":
                with torch.cuda.device(dev):
                    torch.cuda.manual_seed(seed)
            shuffle_gen = torch.Generator().manual_seed(seed)
            noise_gen = torch.Generator(device=dev).manual_seed(seed + 1)
            model.train()
            step = 0
            bar = progress_bar(epochs * batches(n, batch_size), desc, enabled=progress)
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=shuffle_gen)
                total_loss, correct = 0.0, 0
                for b, start in enumerate(range(0, n, batch_size)):
                    idx = perm[start : start + batch_size]
                    xb = data.x[idx]
                    if fixed_noise is not None:
                        xb = xb + fixed_noise[idx]
                    xb = xb.to(dev, non_blocking=True)
                    yb = data.y[idx].to(dev, non_blocking=True)
                    if noise_sigma > 0:
                        xb = xb + noise_sigma * torch.randn(
                            xb.shape, generator=noise_gen, device=dev, dtype=xb.dtype
                        )
                    if input_transform is not None:
                        xb = input_transform(xb, step).to(dev)
                    step += 1
                    out = model(xb)
                    if out.dim() != 2 or out.shape[0] != xb.shape[0]:
                        raise InputError(f"model must return logits [batch, num_classes], got {tuple(out.shape)}")
                    if out.shape[1] != data.num_classes:
                        raise InputError(
                            f"model outputs {out.shape[1]} logits but data has num_classes={data.num_classes}"
                        )
                    loss = loss_fn(out, yb)
                    if not bool(torch.isfinite(loss)):
                        raise InputError(
                            f"training diverged: loss is {float(loss.detach())} at epoch {epoch + 1}, batch {b + 1} "
                            f"(lr={lr:g}, noise_sigma={noise_sigma:g}); try a smaller lr"
                        )
                    opt.zero_grad(set_to_none=True)
                    (loss / xb.shape[0]).backward()
                    opt.step()
                    total_loss += float(loss.detach())
                    correct += int((out.detach().argmax(dim=1) == yb).sum())
                    bar.update(1)
                history.loss.append(total_loss / n)
                history.accuracy.append(correct / n)
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{history.loss[-1]:.4f}",
                                acc=f"{history.accuracy[-1]:.3f}")
            bar.close()
    finally:
        model.eval()
        if home is not None and home != dev:
            model.to(home)
    history.seconds = time.perf_counter() - t0
    return history


def noise_finetune(
    model: nn.Module,
    data: ArrayDataset,
    *,
    sigma: float,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> nn.Module:
    """A copy of ``model`` fine-tuned with Gaussian noise augmentation at ``sigma`` (Cohen et al. 2019), so
    that a purified model becomes a usable base classifier for test-time smoothing at that sigma.

    ``data`` is the defender's clean set (the data the purifier saw). Adam at ``lr``, fresh noise every
    batch (:func:`train_model` with ``noise_sigma=sigma``); every parameter is tuned, inserted layers
    included. ``model`` is not modified; ``model.certkit_spec`` is carried over.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sigma = _nonneg_float(sigma, "sigma", strict=True)
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(True)
    train_model(tuned, data, epochs=epochs, lr=lr, batch_size=batch_size, noise_sigma=sigma, seed=seed,
                device=device, progress=progress, desc=f"noise fine-tune (sigma={sigma:g})")
    return tuned
