"""Shared fixtures: a BadNets-backdoored digits CNN and the defender's clean slice (purifier tests)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from torch import nn

from certkit.backdoor.attacks import BadNets, triggered_test_set
from certkit.backdoor.data import load_digits
from certkit.backdoor.models import build_model
from certkit.backdoor.training import train_model

# property tests draw the same examples on every run (CI must not depend on which examples a run happens to try)
settings.register_profile("certkit", derandomize=True, deadline=None)
settings.load_profile("certkit")

PURIFY_TARGET = 0
# The defender gets 20% of the training set (251 images, ~25 per class): at 2-5% (25-63 images, 2-6 per
# class) FST's head re-initialisation collapses clean accuracy (purifier-notes.md section 14).
PURIFY_CLEAN_FRACTION = 0.2


def file_snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (empty when it does not exist): "nothing written" checks."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(capsys, *fragments: str) -> str:
    """The single stderr line ``certkit: error: ...`` of a refused command, checked to hold ``fragments``."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("certkit: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when two state dicts hold identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread: float reductions then sum in one order whatever the machine's core
    count, so trained weights (and the purifier results asserted on them) are the same on every machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _backdoored(arch: str) -> dict:
    with one_thread():
        return _train_backdoored(arch)


def _train_backdoored(arch: str) -> dict:
    splits = load_digits()
    attack = BadNets()
    poisoned = attack.poison(splits.train, 0.1, target=PURIFY_TARGET, seed=0)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, input_shape=splits.input_shape, mean=splits.mean,
                        std=splits.std)
    train_model(model, poisoned.dataset, epochs=15, lr=1e-3, seed=0, progress=False, device="cpu")
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(splits.train))[: int(PURIFY_CLEAN_FRACTION * len(splits.train))]
    return {"model": model, "clean": splits.train.subset(idx), "test": splits.test,
            "triggered": triggered_test_set(attack, splits.test, PURIFY_TARGET), "attack": attack,
            "poisoned": poisoned.dataset}


@pytest.fixture(scope="session")
def backdoored_digits() -> dict:
    """BadNets (10%, target 0) DigitsCNN trained 15 epochs: keys model, clean (20% of the training set),
    test, triggered (non-target test inputs with the trigger), attack, poisoned (the poisoned training set)."""
    return _backdoored("digits-cnn")


@pytest.fixture(scope="session")
def backdoored_digits_bn() -> dict:
    """As :func:`backdoored_digits` with the BatchNorm digits CNN (for BN-based methods: ANP, RNP, CLP)."""
    return _backdoored("digits-bn-cnn")
