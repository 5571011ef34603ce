"""Empirical backdoor metrics of a plain model (docs/design.md section 6).

Clean accuracy (CA), attack success rate (ASR: triggered non-target test inputs classified as the target),
robust accuracy (RA: triggered non-target inputs classified correctly), and the defense effectiveness rating
DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2 (BackdoorBench, Wu et al., NeurIPS 2022 Datasets and
Benchmarks). Certified metrics live in :mod:`certkit.certify.metrics`.

>>> defense_effectiveness_rating(0.99, 1.0, 0.95, 0.05)
0.955
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from certkit.backdoor.models import predict_labels
from certkit.errors import InputError


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: str | torch.device) -> torch.Tensor:
    return predict_labels(model, x, batch_size=batch_size, device=device)


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
                   device: str | torch.device = "auto") -> float:
    """Fraction of ``x`` classified as ``y`` by ``model``."""
    if len(x) != len(y):
        raise InputError(f"x has {len(x)} inputs but y has {len(y)} labels")
    if len(x) == 0:
        return float("nan")
    return float((_predict(model, x, batch_size, device) == torch.as_tensor(y).cpu()).double().mean())


def attack_success_rate(model: nn.Module, x_triggered: torch.Tensor, target: int, *, batch_size: int = 1024,
                        device: str | torch.device = "auto") -> float:
    """Fraction of triggered (non-target) inputs classified as ``target``."""
    if len(x_triggered) == 0:
        return float("nan")
    return float((_predict(model, x_triggered, batch_size, device) == int(target)).double().mean())


def robust_accuracy(model: nn.Module, x_triggered: torch.Tensor, y_true: torch.Tensor, *, batch_size: int = 1024,
                    device: str | torch.device = "auto") -> float:
    """Fraction of triggered inputs still classified as their true label."""
    return clean_accuracy(model, x_triggered, y_true, batch_size=batch_size, device=device)


def defense_effectiveness_rating(ca_before: float, asr_before: float, ca_after: float, asr_after: float) -> float:
    """DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2, in [0, 1] (BackdoorBench)."""
    vals = (ca_before, asr_before, ca_after, asr_after)
    if any(not (0.0 <= v <= 1.0) for v in vals):
        raise InputError(f"accuracies and ASRs must be fractions in [0, 1], got {vals}")
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1.0) / 2.0


@dataclass
class EmpiricalMetrics:
    """CA, ASR and RA of one model for one attack, with the sizes they are computed on."""

    clean_accuracy: float
    attack_success_rate: float
    robust_accuracy: float
    n_clean: int
    n_triggered: int
    target: int
    trigger_norm_mean: float
    trigger_norm_max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def empirical_metrics(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, triggered: Any, *,
                      batch_size: int = 1024, device: str | torch.device = "auto") -> EmpiricalMetrics:
    """CA on the clean test set, ASR and RA on a :class:`~certkit.backdoor.attacks.TriggeredSet`."""
    norms = torch.as_tensor(triggered.trigger_norms, dtype=torch.float64)
    return EmpiricalMetrics(
        clean_accuracy=clean_accuracy(model, test_x, test_y, batch_size=batch_size, device=device),
        attack_success_rate=attack_success_rate(model, triggered.x, triggered.target, batch_size=batch_size,
                                                device=device),
        robust_accuracy=robust_accuracy(model, triggered.x, triggered.y_true, batch_size=batch_size, device=device),
        n_clean=len(test_x), n_triggered=len(triggered.x), target=int(triggered.target),
        trigger_norm_mean=float(norms.mean()) if len(norms) else float("nan"),
        trigger_norm_max=float(norms.max()) if len(norms) else float("nan"),
    )


