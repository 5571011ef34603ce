"""train_model: determinism, noise augmentation, validation, history."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from certkit.backdoor.data import ArrayDataset, load_digits
from certkit.backdoor.models import build_model
from certkit.backdoor.training import TrainingHistory, train_model
from certkit.errors import InputError


@pytest.fixture(scope="module")
def small():
    d = load_digits()
    return d.train.subset(range(300))


def _model(seed=0, num_classes=10):
    torch.manual_seed(seed)
    return build_model("digits-cnn", num_classes=num_classes, input_shape=(1, 8, 8))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("noise_sigma, optimizer", [(0.0, "adam"), (0.25, "sgd")])
def test_same_seed_gives_identical_weights(small, noise_sigma, optimizer):
    kw = dict(epochs=2, batch_size=64, noise_sigma=noise_sigma, optimizer=optimizer, progress=False, device="cpu")
    a, b, c = _model(), _model(), _model()
    ha = train_model(a, small, seed=1, **kw)
    hb = train_model(b, small, seed=1, **kw)
    train_model(c, small, seed=2, **kw)
    assert _same_weights(a, b) and ha.loss == hb.loss
    assert not _same_weights(a, c)
    assert not a.training  # left in eval mode


def test_training_does_not_touch_the_global_rng(small):
    model = _model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_model(model, small, epochs=1, noise_sigma=0.1, progress=False, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_noise_augmentation_changes_training(small):
    a, b = _model(), _model()
    train_model(a, small, epochs=1, noise_sigma=0.0, progress=False, device="cpu")
    train_model(b, small, epochs=1, noise_sigma=0.5, progress=False, device="cpu")
    assert not _same_weights(a, b)


def test_history_records_every_epoch_and_learns(small):
    h = train_model(_model(), small, epochs=4, lr=3e-3, batch_size=32, progress=False, device="cpu")
    assert isinstance(h, TrainingHistory)
    assert len(h.loss) == len(h.accuracy) == 4 and h.seconds > 0
    assert h.loss[-1] < h.loss[0] and h.accuracy[-1] > h.accuracy[0]
    assert all(0.0 <= a <= 1.0 for a in h.accuracy)
    assert json.loads(json.dumps(h.to_dict()))["loss"] == h.loss


def test_progress_bar_shows_loss_and_accuracy(small, capsys):
    train_model(_model(), small.subset(range(32)), epochs=1, progress=True, desc="member-3", device="cpu")
    err = capsys.readouterr().err
    assert "member-3" in err and "loss=" in err and "acc=" in err


def test_validation_errors(small):
    m = _model()
    for kwargs, match in [
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"noise_sigma": -0.1}, "noise_sigma"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ]:
        with pytest.raises(Exception, match=match) as info:
            train_model(m, small, progress=False, device="cpu", **kwargs)
        assert isinstance(info.value, (InputError, KeyError))
    with pytest.raises(InputError, match="empty"):
        train_model(m, small.subset([]), progress=False)
    with pytest.raises(InputError, match="ArrayDataset"):
        train_model(m, (small.x, small.y), progress=False)


def test_class_count_mismatch_is_reported(small):
    with pytest.raises(InputError, match="5 classes but data has num_classes=10"):
        train_model(_model(num_classes=5), small, epochs=1, progress=False, device="cpu")
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))  # no certkit_spec: caught at the first batch
    with pytest.raises(InputError, match="3 logits but data has num_classes=10"):
        train_model(plain, small, epochs=1, progress=False, device="cpu")


def test_diverging_loss_raises_clear_error():
    x = torch.rand(16, 1, 4, 4)
    data = ArrayDataset(x, torch.arange(16) % 2, 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.fill_(float("inf"))
    with pytest.raises(InputError, match="diverged.*smaller lr"):
        train_model(model, data, epochs=1, progress=False, device="cpu")
    assert not model.training


def test_noise_finetune_returns_a_tuned_copy_and_keeps_the_input():
    from certkit.backdoor.training import noise_finetune

    splits = load_digits()
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = noise_finetune(model, splits.train.subset(range(200)), sigma=0.25, epochs=1, seed=0, device="cpu",
                           progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    assert tuned.certkit_spec == model.certkit_spec
    with pytest.raises(InputError, match="sigma"):
        noise_finetune(model, splits.train, sigma=0.0)
