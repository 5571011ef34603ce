"""Empirical and certified backdoor metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from certkit.backdoor.metrics import (
    attack_success_rate,
    clean_accuracy,
    defense_effectiveness_rating,
    robust_accuracy,
)
from certkit.certify.metrics import certified_trigger_robustness
from certkit.certify.results import CertificationResult
from certkit.errors import InputError


class Lookup(nn.Module):
    """Predicts the class stored in the first pixel (x * 10 rounded)."""

    def forward(self, x):
        cls = (x.flatten(1)[:, 0] * 10).round().long()
        return nn.functional.one_hot(cls, 10).float()


def test_empirical_metrics_on_a_known_model():
    x = torch.zeros(5, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.0])
    y = torch.tensor([1, 2, 0, 0, 5])
    assert clean_accuracy(Lookup(), x, y, device="cpu") == pytest.approx(3 / 5)
    assert attack_success_rate(Lookup(), x, target=0, device="cpu") == pytest.approx(2 / 5)
    assert robust_accuracy(Lookup(), x, y, device="cpu") == pytest.approx(3 / 5)
    with pytest.raises(InputError, match="labels"):
        clean_accuracy(Lookup(), x, y[:3], device="cpu")


def test_der_matches_backdoorbench_definition():
    # ASR 0.95 -> 0.05 and CA 0.93 -> 0.90: (0.90 - 0.03 + 1) / 2
    assert defense_effectiveness_rating(0.93, 0.95, 0.90, 0.05) == pytest.approx(0.935)
    # a defense that raises CA and ASR gets exactly 1/2
    assert defense_effectiveness_rating(0.8, 0.5, 0.9, 0.6) == pytest.approx(0.5)
    with pytest.raises(InputError):
        defense_effectiveness_rating(93.0, 0.95, 0.9, 0.05)


def test_certified_trigger_robustness_counts_strict_coverage_of_non_target_points():
    res = CertificationResult(
        label=[0, 1, 2, 3, 4], prediction=[0, 1, 2, 3, -1], radius=[5.0, 0.5, 0.5, 0.2, 0.0],
        p_lower=[0.99] * 5, sigma=[0.5] * 5, trigger_norm=[0.1, 0.4, 0.5, 0.1, 0.1],
    )
    # target 0 excluded; point 1 covered (0.5 > 0.4); point 2 not (radius == norm is not covered);
    # point 3 covered (0.2 > 0.1); point 4 abstains
    assert certified_trigger_robustness(res, target=0) == pytest.approx(2 / 4)
    # joint (training-time) certificate: norms scaled by sqrt(r + 1); only point 3 (0.2 > 0.173) is left
    assert certified_trigger_robustness(res, target=0, scale=np.sqrt(3)) == pytest.approx(1 / 4)
    # one norm for all points: 0.5 > 0.3 twice, 0.2 < 0.3
    assert certified_trigger_robustness(res, 0.3, target=0) == pytest.approx(2 / 4)


def test_certified_trigger_robustness_bounds_the_smoothed_asr():
    # every covered point's smoothed prediction on the triggered input equals its certified clean label,
    # so the ASR over non-target points can be at most 1 - CTR: check on a half-space where it is exact
    from certkit import RandomizedSmoothing

    class HalfSpace(nn.Module):
        def forward(self, x):
            s = x.flatten(1)[:, 0] - 0.5
            return torch.stack([s, -s], 1)  # class 0 iff first pixel > 0.5

    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 1, 4, generator=g)
    y = HalfSpace()(x).argmax(1)
    trig = x.clone()
    trig[:, 0, 0, 0] += 0.3  # trigger pushes towards class 0 (the target); l2 norm 0.3
    norms = torch.full((200,), 0.3)
    smoother = RandomizedSmoothing(HalfSpace(), 2, 0.25, progress=False)
    clean = smoother.certify(x, y, n0=50, n=2000, trigger_norm=norms)
    triggered = smoother.predict(trig, n=2000, alpha=0.001)
    non_target = y.numpy() != 0
    ctr = certified_trigger_robustness(clean, target=0)
    asr = np.mean(triggered.prediction[non_target] == 0)
    assert 0.0 < ctr < 1.0
    assert asr <= 1.0 - ctr


def test_certified_trigger_robustness_needs_labels_and_norms():
    res = CertificationResult(label=[-1, 1], prediction=[0, 1], radius=[1.0, 1.0], p_lower=[0.9, 0.9], sigma=[1, 1])
    with pytest.raises(InputError, match="true labels"):
        certified_trigger_robustness(res, 0.1)
    res2 = CertificationResult(label=[0, 1], prediction=[0, 1], radius=[1.0, 1.0], p_lower=[0.9, 0.9], sigma=[1, 1])
    with pytest.raises(InputError, match="trigger norms"):
        certified_trigger_robustness(res2)
