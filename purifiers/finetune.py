"""Vanilla fine-tuning (FT): the classic baseline of BackdoorBench (Wu et al., NeurIPS 2022 D&B)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._common import (
    check_sgd_params,
    sgd_finetune,
)
from .base import Purifier, PurifierTags
from .registry import register


@register
class FineTuning(Purifier):
    """Fine-tune all weights on the defender's clean labelled data (cross-entropy, SGD with momentum and
    weight decay, cosine learning-rate schedule over ``epochs``).

    Known to be weak at low poisoning rates (Min et al., NeurIPS 2023; BackdoorBench leaderboard): tuning
    near the backdoored weights tends to keep the backdoor. Unlike the FST repository's ``ft`` mode, no
    head-norm projection is applied. BackdoorBench's FT uses 100 epochs; the default here is a CPU-cheap 10.

    Args:
        epochs: passes over the clean data (>= 1).
        lr: initial SGD learning rate (> 0). momentum, weight_decay: SGD settings (>= 0; momentum < 1).
        batch_size: mini-batch size (>= 1).
        device: ``"auto" | "cpu" | "cuda"``.
        progress: show a tqdm bar per batch.
    """

    name = "ft"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.05, changes="weights")
    fast_params = dict(epochs=2, batch_size=64)

    def __init__(self, epochs: int = 10, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 batch_size: int = 128, device: str = "auto", progress: bool = False) -> None:
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """``epochs`` passes.

        >>> FineTuning(epochs=3).work(100, 10)
        (3.0, '3 fine-tune epochs')
        """
        return float(self.epochs), f"{self.epochs} fine-tune epochs"

    def _validate(self) -> dict[str, Any]:
        return check_sgd_params(self)

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        sgd_finetune(model, clean_data, epochs=p["epochs"], lr=p["lr"], momentum=p["momentum"],
                     weight_decay=p["weight_decay"], batch_size=p["batch_size"], seed=seed, device=p["device"],
                     progress=p["progress"], desc="ft")
        return model


__all__ = ["FineTuning"]
