"""Re-activation (retuning) check of a purified model: does the backdoor come back after a tiny fine-tune on
a handful of poisoned samples?

Min, Qin, Zhang, Shen, Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor
Defense", NeurIPS 2024 (arXiv 2410.09838; FST's follow-up, AISafety-HKUST/stable_backdoor_purification:
the Retuning Attack, ``--poison_num 5``, 5 epochs), and Zhu, Liang, Wu, "Breaking the False Sense of
Security in Backdoor Defense through Re-Activation Attack", NeurIPS 2024 (BackdoorBench's re-activation
attack). A genuinely clean model stays at a low ASR after such a retune; a superficially purified one, whose
backdoor features survived, quickly returns to a high ASR.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certkit.backdoor.attacks import PoisonedDataset, TriggeredSet
from certkit.backdoor.data import ArrayDataset
from certkit.backdoor.metrics import attack_success_rate
from certkit.devices import module_device
from certkit.errors import InputError

from ._common import check_device, check_float, check_positive_int, check_seed

__all__ = ["reactivate", "reactivation_asr"]


def _poisoned_pool(poisoned: Any, indices: Any) -> tuple[ArrayDataset, np.ndarray]:
    """The dataset and the indices of its poisoned samples."""
    if isinstance(poisoned, PoisonedDataset):
        if indices is not None:
            raise InputError("indices must not be given with a PoisonedDataset (its poison_indices are used)")
        return poisoned.dataset, np.asarray(poisoned.poison_indices, dtype=np.int64)
    if not isinstance(poisoned, ArrayDataset):
        raise InputError("poisoned must be a certkit.backdoor.attacks.PoisonedDataset (Attack.poison(...)) or a "
                         f"certkit.backdoor.data.ArrayDataset of poisoned samples, got {type(poisoned).__name__}")
    if indices is None:
        return poisoned, np.arange(len(poisoned), dtype=np.int64)
    idx = np.asarray(indices)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise InputError("indices must be a 1-D array of integer sample indices")
    if idx.size and (idx.min() < 0 or idx.max() >= len(poisoned)):
        raise InputError(f"indices must lie in [0, {len(poisoned)}), got min {idx.min()}, max {idx.max()}")
    return poisoned, np.unique(idx.astype(np.int64))


def reactivate(model: nn.Module, poisoned: PoisonedDataset | ArrayDataset, *, n_samples: int = 5, epochs: int = 5,
               lr: float = 0.01, batch_size: int = 5, momentum: float = 0.9, seed: int = 0,
               device: str = "auto", indices: Any = None) -> nn.Module:
    """Fine-tune a **copy** of ``model`` on ``n_samples`` poisoned samples (triggered inputs relabelled to the
    target) and return it; ``model`` is not modified.

    Args:
        model: a (purified) classifier, normalisation as its first layer.
        poisoned: a :class:`~certkit.backdoor.attacks.PoisonedDataset` from ``Attack.poison`` (only its
            ``poison_indices`` are drawn from, never its clean samples), or an
            :class:`~certkit.backdoor.data.ArrayDataset` whose samples are all poisoned (or whose poisoned rows are
            given by ``indices``).
        n_samples: how many poisoned samples, drawn without replacement with ``numpy.random.default_rng(seed)``
            (5 in the retuning attack).
        epochs: passes over them (5). lr: SGD learning rate (0.01), constant. batch_size: (5: one step per
            epoch). momentum: SGD momentum (0.9); no weight decay.
        seed: seeds the sample choice and the batch order; the global RNG is untouched.
        device: ``"auto" | "cpu" | "cuda"``; the returned copy is on ``model``'s device, in eval mode.
        indices: with an ``ArrayDataset``, the indices of its poisoned samples (default: all).

    BatchNorm layers are kept in **eval** mode (their running statistics are not re-estimated from a
    handful of target-labelled inputs, which alone would shift every prediction); their affine weights
    and all other weights are trained (dropout is off too: the whole copy is in eval mode).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    data, pool = _poisoned_pool(poisoned, indices)
    n_samples = check_positive_int(n_samples, "n_samples")
    epochs = check_positive_int(epochs, "epochs")
    lr = check_float(lr, "lr", strict=True)
    batch_size = check_positive_int(batch_size, "batch_size")
    momentum = check_float(momentum, "momentum", maximum=1.0 - 1e-12)
    seed = check_seed(seed)
    dev = check_device(device)
    if n_samples > len(pool):
        raise InputError(f"n_samples={n_samples} exceeds the {len(pool)} poisoned samples available")
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=n_samples, replace=False))
    sel = torch.from_numpy(chosen)
    x, y = data.x[sel], data.y[sel]
    work = copy.deepcopy(model)
    home = module_device(work)
    work.to(dev)
    params = [q for q in work.parameters() if q.requires_grad]
    if not params:
        raise InputError("model has no trainable parameters")
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    try:
        work.eval()
        for epoch in range(epochs):
            perm = torch.randperm(n_samples, generator=gen)
            for start in range(0, n_samples, batch_size):
                idx = perm[start:start + batch_size]
                loss = F.cross_entropy(work(x[idx].to(dev)), y[idx].to(dev))
                if not bool(torch.isfinite(loss)):
                    raise InputError(f"re-activation fine-tuning diverged at epoch {epoch + 1} (lr={lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        work.eval()
        work.to(home)
    work.reactivation_indices_ = chosen  # which poisoned samples were used (for audits and tests)
    return work


def reactivation_asr(model: nn.Module, poisoned: PoisonedDataset | ArrayDataset, triggered: TriggeredSet,
                     **kw: Any) -> float:
    """Attack success rate on ``triggered`` (:func:`certkit.backdoor.attacks.triggered_test_set`) of
    :func:`reactivate` ``(model, poisoned, **kw)``: the post-purification robustness check (lower is better).
    ``kw`` takes :func:`reactivate`'s keywords (``n_samples``, ``epochs``, ``lr``, ``batch_size``, ``seed``,
    ``device``, ...)."""
    if not isinstance(triggered, TriggeredSet):
        raise InputError(f"triggered must be a certkit.backdoor.attacks.TriggeredSet, got {type(triggered).__name__}")
    re = reactivate(model, poisoned, **kw)
    return attack_success_rate(re, triggered.x, triggered.target, device=kw.get("device", "auto"))
