"""FST: Feature Shift Tuning.

Min, Qin, Shen, Cheng, "Towards Stable Backdoor Purification through Feature Shift Tuning", NeurIPS 2023
(arXiv 2310.01875); official code AISafety-HKUST/stable_backdoor_purification (``fine_tune/ft.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from certkit.errors import InputError

from ._common import (
    check_device,
    check_float,
    check_positive_int,
    find_head,
    reinit_linear_,
    sgd_finetune,
)
from .base import Purifier, PurifierTags
from .registry import register


@register
class FeatureShiftTuning(Purifier):
    """Feature Shift Tuning (Min et al., NeurIPS 2023).

    With ``f = g(phi(x))``, linear head ``g(z) = W z + b`` and ``W0`` the original (backdoored) head weight,
    FST solves ``min_{phi, W, b} E[CE(f(x), y)] + alpha * <W, W0>`` subject to ``||W||_F = ||W0||_F``
    on the clean data: the head is re-initialised (weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
    the whole network is tuned with SGD (momentum 0.9, no weight decay, cosine schedule), the inner-product
    penalty pushes ``W`` away from (anti-aligned with) ``W0`` (detached), and after every optimiser step
    ``W`` is rescaled to ``||W0||_F``, which blocks the trivial shrinking solution.

    The head is the last ``nn.Linear`` whose output size is ``clean_data.num_classes``, found by walking
    the modules (no attribute names are assumed).

    Differences from the official code:
        - the official repository applies the head-norm projection in every ``--ft_mode`` (including its
          vanilla ``ft`` baseline); certkit's ``ft`` purifier does not;
        - the official code hard-codes the head attribute (``linear``/``fc``/``head``); here it is found by
          structure;
        - the defender's data is passed in (the official ``--split_ratio`` samples it from the training set);
          tags give the paper's 2% as the default fraction;
        - everything (head init, batch order) is seeded by ``seed``; BN layers are in train mode while tuning.

    Defaults follow the paper's CIFAR-10 setting (alpha 0.2, lr 0.01, 10 epochs, batch 128). The README warns
    that head re-initialisation can cost clean accuracy with few images per class (use more data, more
    epochs, or a smaller alpha).

    Args:
        alpha: weight of the ``<W, W0>`` penalty (>= 0; 0 gives "ft-init" plus the norm constraint).
        epochs, lr, momentum, batch_size: SGD settings (momentum in [0, 1)).
        device: ``"auto" | "cpu" | "cuda"``. progress: tqdm bar per batch.
    """

    name = "fst"
    tags = PurifierTags(needs_labels=True, clean_fraction=0.02, changes="weights")
    fast_params = dict(epochs=2, batch_size=64)

    def __init__(self, alpha: float = 0.2, epochs: int = 10, lr: float = 0.01, momentum: float = 0.9,
                 batch_size: int = 128, device: str = "auto", progress: bool = False) -> None:
        self.alpha = alpha
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def work(self, n: int, num_classes: int) -> tuple[float, str]:
        """``epochs`` passes (the head re-initialisation and its norm projection cost nothing)."""
        return float(self.epochs), f"{self.epochs} tuning epochs"

    def _validate(self) -> dict[str, Any]:
        return {
            "alpha": check_float(self.alpha, "alpha"),
            "epochs": check_positive_int(self.epochs, "epochs"),
            "lr": check_float(self.lr, "lr", strict=True),
            "momentum": check_float(self.momentum, "momentum", maximum=1.0 - 1e-12),
            "batch_size": check_positive_int(self.batch_size, "batch_size"),
            "device": check_device(self.device),
            "progress": bool(self.progress),
        }

    def _purify(self, model: nn.Module, clean_data: Any, *, validation: Any, seed: int | None) -> nn.Module:
        p = self._validate()
        _, head = find_head(model, clean_data.num_classes)
        w0 = head.weight.detach().clone()
        norm0 = w0.norm()
        if float(norm0) == 0.0:
            raise InputError("the original head weight is all zeros: FST's norm constraint is undefined")
        reinit_linear_(head, torch.Generator().manual_seed(seed))
        alpha = p["alpha"]

        def penalty() -> torch.Tensor:
            return alpha * torch.sum(head.weight * w0.to(head.weight.device))

        def project() -> None:
            with torch.no_grad():
                head.weight.mul_(norm0.to(head.weight.device) / head.weight.norm())

        sgd_finetune(model, clean_data, epochs=p["epochs"], lr=p["lr"], momentum=p["momentum"], weight_decay=0.0,
                     batch_size=p["batch_size"], seed=seed, device=p["device"], progress=p["progress"],
                     desc="fst", penalty=penalty if alpha > 0 else None, after_step=project)
        return model
