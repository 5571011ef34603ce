"""Before/after evaluation of a purification: CA, ASR, RA and DER (BackdoorBench protocol)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from certkit.backdoor.attacks import Attack, TriggeredSet, triggered_test_set
from certkit.backdoor.data import ArrayDataset
from certkit.backdoor.metrics import defense_effectiveness_rating, empirical_metrics
from certkit.errors import InputError


@dataclass
class PurificationReport:
    """Clean accuracy (CA), attack success rate (ASR) and robust accuracy (RA) of a model before and after
    purification, and the defense effectiveness rating
    ``DER = (max(0, ASR drop) - max(0, CA drop) + 1) / 2`` (BackdoorBench; 1 is best, 0.5 is no change).
    All values are fractions in [0, 1]. ``runtime_s`` is the purification time if the caller gives it."""

    ca_before: float
    asr_before: float
    ra_before: float
    ca_after: float
    asr_after: float
    ra_after: float
    der: float
    n_clean: int
    n_triggered: int
    target: int
    runtime_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_frame(self):
        """A one-row :class:`pandas.DataFrame`."""
        import pandas as pd

        return pd.DataFrame([self.to_dict()])


def evaluate(model: nn.Module, purified: nn.Module, clean_test: ArrayDataset, triggered: TriggeredSet | Attack,
             target: int | None = None, *, device: Any = "auto", batch_size: int = 1024,
             runtime_s: float | None = None) -> PurificationReport:
    """Compare ``model`` (before) and ``purified`` (after) on a clean test set and a triggered test set
    (:func:`certkit.backdoor.attacks.triggered_test_set`: non-target inputs only, as in BackdoorBench).

    ``triggered`` is either a :class:`~certkit.backdoor.attacks.TriggeredSet` or an attack object, in which case
    ``target`` is required and the triggered set is built from ``clean_test``.
    """
    if isinstance(triggered, Attack):
        if target is None:
            raise InputError("evaluate(..., attack, target): the target class is required with an attack")
        if not isinstance(clean_test, ArrayDataset):
            raise InputError(f"clean_test must be a certkit.backdoor.data.ArrayDataset, got {type(clean_test).__name__}")
        triggered = triggered_test_set(triggered, clean_test, target)
    elif target is not None and isinstance(triggered, TriggeredSet) and int(target) != int(triggered.target):
        raise InputError(f"target={target} differs from the triggered set's target {triggered.target}")
    for name, m in (("model", model), ("purified", purified)):
        if not isinstance(m, nn.Module):
            raise InputError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    if not isinstance(clean_test, ArrayDataset):
        raise InputError(f"clean_test must be a certkit.backdoor.data.ArrayDataset, got {type(clean_test).__name__}")
    if not isinstance(triggered, TriggeredSet):
        raise InputError(f"triggered must be a certkit.backdoor.attacks.TriggeredSet, got {type(triggered).__name__}")
    if len(clean_test) == 0 or len(triggered) == 0:
        raise InputError("clean_test and triggered must both be non-empty")
    if runtime_s is not None:
        runtime_s = float(runtime_s)
    before = empirical_metrics(model, clean_test.x, clean_test.y, triggered, batch_size=batch_size, device=device)
    after = empirical_metrics(purified, clean_test.x, clean_test.y, triggered, batch_size=batch_size, device=device)
    der = defense_effectiveness_rating(before.clean_accuracy, before.attack_success_rate,
                                       after.clean_accuracy, after.attack_success_rate)
    return PurificationReport(
        ca_before=before.clean_accuracy, asr_before=before.attack_success_rate, ra_before=before.robust_accuracy,
        ca_after=after.clean_accuracy, asr_after=after.attack_success_rate, ra_after=after.robust_accuracy,
        der=der, n_clean=len(clean_test), n_triggered=len(triggered), target=int(triggered.target),
        runtime_s=runtime_s,
    )
