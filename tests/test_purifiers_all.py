"""Every registered purifier runs through the one API on every architecture (tiny budgets): the input model
is untouched, the output is a self-contained module with Normalize first, and BN-based methods refuse a
model without BatchNorm with a message naming what is missing."""

from __future__ import annotations

import pytest
import torch
from conftest import same_state, state_of
from torch import nn

import purifiers
from certkit.backdoor.data import ArrayDataset
from certkit.backdoor.models import Normalize, build_model
from certkit.errors import InputError, UnknownNameError

ARCHITECTURES = {
    "digits-cnn": (1, 8, 8),
    "digits-bn-cnn": (1, 8, 8),
    "rab-mnist-cnn": (1, 16, 16),
    "preact-resnet18": (1, 8, 8),
}
N_CLEAN = 80


def _data(shape, n=N_CLEAN, seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, *shape, generator=g), torch.arange(n) % 10, 10)


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("name", list(purifiers.available()))
def test_every_method_on_every_architecture(name, arch):
    shape = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, input_shape=shape, mean=(0.5,), std=(0.25,))
    before = state_of(model)
    method = purifiers.make(name, device="cpu", **purifiers.fast_params(name))
    if purifiers.available()[name]["needs_batchnorm"] and not _has_bn(model):
        with pytest.raises(InputError, match="no BatchNorm"):
            method.purify(model, _data(shape), seed=0)
        return
    train = {"train_data": _data(shape, seed=1)} if purifiers.available()[name]["needs_training_set"] else {}
    out = method.purify(model, _data(shape), seed=0, **train)  # FCT's D-BR also gets the (poisoned) training set
    assert same_state(state_of(model), before), "the input model was modified"
    assert out is not model
    assert isinstance(next(out.children()), Normalize)
    x = torch.rand(3, *shape)
    logits = out.eval()(x)
    assert logits.shape == (3, 10) and bool(torch.isfinite(logits).all())


def test_available_lists_tags_and_fast_params_are_valid():
    tags = purifiers.available()
    assert {"ft", "fst", "sau", "npd"} <= set(tags)
    for name, t in tags.items():
        assert set(t) >= {"needs_labels", "clean_fraction", "changes", "needs_batchnorm", "uses_validation"}
        purifiers.make(name, **purifiers.fast_params(name))  # every fast parameter is a real parameter


def test_unknown_method_and_parameter_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match="available: .*fst"):
        purifiers.make("fsst")
    with pytest.raises(UnknownNameError, match="'alpah'.*valid: alpha, epochs"):
        purifiers.make("fst", alpah=0.1)


def test_too_small_clean_set_says_how_many_are_needed():
    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"fst needs at least \d+ clean samples, got 3"):
        purifiers.make("fst").purify(model, _data((1, 8, 8), n=3))


def test_nan_during_purification_is_a_clear_error_and_keeps_the_model():
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    before = state_of(model)
    with pytest.raises(InputError, match="diverged|non-finite"):
        purifiers.make("ft", lr=1e30, epochs=2, device="cpu").purify(model, _data((1, 8, 8)), seed=0)
    assert same_state(state_of(model), before)


def test_validation_split_is_stratified_and_disjoint():
    from purifiers._common import split_validation

    data = _data((1, 8, 8), n=100)
    train, val = split_validation(data, 0.2, seed=0)
    assert len(train) == 80 and len(val) == 20
    assert torch.bincount(val.y, minlength=10).tolist() == [2] * 10
    rows = {tuple(r.flatten().tolist()) for r in train.x}
    assert not any(tuple(r.flatten().tolist()) in rows for r in val.x)
    with pytest.raises(InputError, match="too small"):
        split_validation(_data((1, 8, 8), n=10), 0.2, seed=0)


@pytest.mark.parametrize("name", sorted(purifiers.available()))
def test_bad_parameters_fail_when_the_purifier_is_made_not_when_it_runs(name):
    params = type(purifiers.make(name))._param_names()
    bad = next(((p, v) for p, v in (("batch_size", 0), ("epochs", 0), ("lr", -1.0), ("n_iters", 0))
                if p in params), None)
    if bad is None:
        pytest.skip(f"{name} has none of the checked parameters")
    with pytest.raises(InputError, match=bad[0]):
        purifiers.make(name, **{bad[0]: bad[1]})
