"""Fine-Pruning.

Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural Networks",
RAID 2018 (arXiv 1805.12185); BackdoorBench re-implementation SCLBD/BackdoorBench ``defense/fp.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from certkit.devices import module_device
from certkit.errors import InputError

from ._common import (
    check_float,
    check_sgd_params,
    find_head,
    sgd_finetune,
)
from .base import Purifier, PurifierTags
from .registry import register


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no gradients) on an :class:`~certkit.backdoor.data.ArrayDataset`."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start : start + batch_size].to(device), data.y[start : start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(1, len(data))


def prune_until(acc_fn: Callable[[int], float], n_units: int, step: float, acc_drop: float) -> tuple[int, list]:
    """Fine-Pruning's stop rule: prune ``k = floor(i * step * n_units)`` units for ``i = 1, 2, ...`` (distinct
    ``k`` only, at most ``n_units - 1``) and stop at the first ``k`` whose accuracy ``acc_fn(k)`` falls below
    ``(1 - acc_drop) * acc_fn(0)``; return the last ``k`` *before* crossing (0 if the first step crosses)
    and the history ``[(k, accuracy), ...]`` (including the crossing step)."""
    acc0 = acc_fn(0)
    floor_acc = (1.0 - acc_drop) * acc0 - 1e-12
    history = [(0, acc0)]
    kept, seen = 0, 0
    for i in range(1, int(math.ceil(1.0 / step)) + 2):
        k = min(int(math.floor(i * step * n_units + 1e-9)), n_units - 1)
        if k <= seen:
            if k >= n_units - 1:
                break
            continue
        seen = k
        acc = acc_fn(k)
        history.append((k, acc))
        if acc < floor_acc:
            break
        kept = k
        if k >= n_units - 1:
            break
    return kept, history


def _feature_groups(model: nn.Module, head: nn.Linear, data: Any, device: torch.device) -> tuple[list, torch.Tensor]:
    """Column groups of the head's input and their mean clean activation.

    One group per input feature of the head, except when the head sees a flattened conv map (its input size
    equals ``C*H*W`` of the last ``nn.Conv2d`` output with ``H*W > 1``): then one group per conv channel (its
    ``H*W`` consecutive columns, NCHW flatten order), i.e. the original paper's last-conv-channel pruning."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    feats: list[torch.Tensor] = []
    shapes: list[tuple[int, ...]] = []
    hooks = [head.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].detach().flatten(1)))]
    if convs:
        hooks.append(convs[-1].register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:]))))
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(data), 512):
                model(data.x[start : start + 512].to(device))
    finally:
        for h in hooks:
            h.remove()
    f = torch.cat(feats)
    d = f.shape[1]
    if d != head.in_features:
        raise InputError(f"the head's input has {d} features but it has in_features={head.in_features}")
    if shapes and len(shapes[0]) == 3 and shapes[0][1] * shapes[0][2] > 1 and math.prod(shapes[0]) == d:
        c, hw = shapes[0][0], shapes[0][1] * shapes[0][2]
        groups = [list(range(i * hw, (i + 1) * hw)) for i in range(c)]
        means = f.view(-1, c, hw).mean(dim=(0, 2))
    else:
        groups = [[i] for i in range(d)]
        means = f.mean(0)
    return groups, means.cpu()


@register
class FinePruning(Purifier):
    """Fine-Pruning (Liu et al., RAID 2018): prune the units that stay dormant on clean data, then fine-tune.

    1. The classification head (last ``nn.Linear`` with ``num_classes`` outputs, found by structure) is hooked
       and the mean activation of each unit feeding it is measured on the clean data. Units are the head's
       input features (the pooled 512 channels of PreAct-ResNet18, the 64 hidden units of the digits CNNs'
       classifier MLP); when the head directly sees a flattened conv map, a unit is one channel of the last
       ``nn.Conv2d`` (its ``H*W`` columns), as in the paper's last-conv-layer pruning.
    2. Units are sorted by mean activation (ascending) and pruned by zeroing the head's input columns,
       ``step`` (1%) more of them each round, until the *validation* accuracy falls below
       ``(1 - acc_drop)`` times its starting value; the mask of the round *before* crossing is kept
       (at most all units but one are pruned). The number pruned is stored as ``n_pruned_``.
    3. The network is fine-tuned on the clean data (SGD, momentum 0.9, weight decay 5e-4, cosine schedule)
       with the pruned columns re-zeroed after every step, so the returned model is a plain module whose
       pruned head columns are exactly zero.

    Defaults: ``step 0.01``, ``acc_drop 0.1``, fine-tuning 100 epochs at lr 0.01, batch 256 (BackdoorBench).
    On a CPU at 28x28 or above use <= 20 fine-tuning epochs (purifier-notes.md section 14). On the 8x8 digits
    BadNets model of the tests FP lowered the ASR only partly (0.98 -> 0.77 with 20 epochs).

    Differences from the official code:
        - the stop rule uses the defender's validation split (carved from the clean data when none is given),
          not clean *test* accuracy as BackdoorBench does;
        - the last mask *before* the accuracy threshold is crossed is kept (BackdoorBench returns the
          over-threshold mask it was evaluating when the loop stopped);
        - pruning is a fixed zero mask on the head's input columns (re-applied after every fine-tuning step)
          rather than a ``torch.nn.utils.prune`` re-parametrisation, so no extra buffers remain;
        - the head and the units are found by structure, not by the last child module; BN in train mode while
          fine-tuning; batch order seeded by ``seed``.

    Args:
        step: fraction of units added per pruning round (in (0, 1]). acc_drop: tolerated relative drop of
            validation accuracy (in [0, 1)).
        epochs, lr, momentum, weight_decay, batch_size: fine-tuning settings (momentum in [0, 1)).
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bar per fine-tuning batch.
    """

    name = "fine-pruning"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="pruning", uses_validation=True)
    fast_params = dict(epochs=1, step=0.1, batch_size=64)

    def __init__(self, step: float = 0.01, acc_drop: float = 0.1, epochs: int = 100, lr: float = 0.01,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 256, device: str = "auto",
                 progress: bool = False) -> None:
        self.step = step
        self.acc_drop = acc_drop
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """``epochs`` passes of the fine-tune (the pruning search's forward passes are not counted)."""
        return float(self.epochs), f"{self.epochs} fine-tune epochs after the pruning search"

    def _validate(self) -> dict[str, Any]:
        return {
            "step": check_float(self.step, "step", strict=True, maximum=1.0),
            "acc_drop": check_float(self.acc_drop, "acc_drop", maximum=1.0 - 1e-12),
            **check_sgd_params(self),
        }

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        _, head = find_head(model, clean_data.num_classes)
        dev, home = p["device"], module_device(model)
        model.to(dev)
        try:
            groups, means = _feature_groups(model, head, clean_data, dev)
            order = torch.argsort(means, stable=True).tolist()
            w_orig = head.weight.detach().clone()

            def columns(k: int) -> torch.Tensor:
                cols = [c for g in order[:k] for c in groups[g]]
                return torch.tensor(cols, dtype=torch.long, device=head.weight.device)

            def acc_with(k: int) -> float:
                with torch.no_grad():
                    head.weight.copy_(w_orig)
                    head.weight[:, columns(k)] = 0.0
                return accuracy(model, validation, dev)

            kept, _ = prune_until(acc_with, len(groups), p["step"], p["acc_drop"])
            cols = columns(kept)
            with torch.no_grad():
                head.weight.copy_(w_orig)
                head.weight[:, cols] = 0.0
        finally:
            model.to(home)
        self.n_pruned_ = kept

        def rezero() -> None:
            with torch.no_grad():
                head.weight[:, cols.to(head.weight.device)] = 0.0

        sgd_finetune(model, clean_data, epochs=p["epochs"], lr=p["lr"], momentum=p["momentum"],
                     weight_decay=p["weight_decay"], batch_size=p["batch_size"], seed=seed, device=dev,
                     progress=p["progress"], desc="fine-pruning", after_step=rezero if kept else None)
        return model


__all__ = ["FinePruning", "accuracy", "prune_until"]
