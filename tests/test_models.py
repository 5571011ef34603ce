"""Models: normalisation as first layer, architectures, spec round trip, prediction helpers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from certkit.backdoor.data import load_digits
from certkit.backdoor.models import (
    MODELS,
    DigitsCNN,
    Normalize,
    RABMnistCNN,
    build_model,
    model_from_spec,
    predict_labels,
    predict_logits,
)
from certkit.backdoor.training import train_model
from certkit.errors import InputError, UnknownNameError


def test_normalize_is_per_channel_and_saved_in_state_dict():
    norm = Normalize((0.5, 0.25), (0.5, 2.0))
    x = torch.ones(2, 2, 3, 3)
    out = norm(x)
    assert torch.allclose(out[:, 0], torch.full((2, 3, 3), 1.0))
    assert torch.allclose(out[:, 1], torch.full((2, 3, 3), 0.375))
    assert set(norm.state_dict()) == {"mean", "std"}
    with pytest.raises(InputError, match="strictly positive"):
        Normalize((0.0,), (0.0,))
    with pytest.raises(InputError, match="mean has 2 values but std has 1"):
        Normalize((0.0, 0.0), (1.0,))


def test_models_start_with_normalize_and_have_expected_shapes():
    m = DigitsCNN(num_classes=7, in_channels=1, mean=(0.3,), std=(0.4,))
    assert isinstance(next(iter(m.children())), Normalize)
    assert m(torch.rand(5, 1, 8, 8)).shape == (5, 7)
    r = RABMnistCNN(num_classes=10)
    assert isinstance(next(iter(r.children())), Normalize)
    assert r(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    convs = [mod for mod in r.modules() if isinstance(mod, nn.Conv2d)]
    linears = [mod for mod in r.modules() if isinstance(mod, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 16, (5, 5)), (16, 32, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 512), (512, 10)]
    r32 = RABMnistCNN(num_classes=43, in_channels=3, input_size=32, mean=(0.5,) * 3, std=(0.2,) * 3)
    assert r32(torch.rand(2, 3, 32, 32)).shape == (2, 43)  # flatten size follows the input size
    with pytest.raises(InputError, match="3 input channels"):
        DigitsCNN(in_channels=3, mean=(0.1, 0.2), std=(1.0, 1.0))
    with pytest.raises(InputError, match="at least 16x16"):
        RABMnistCNN(input_size=8)


@pytest.mark.parametrize("name, shape", [("digits-cnn", (1, 8, 8)), ("rab-mnist-cnn", (1, 28, 28)),
                                         ("digits-bn-cnn", (1, 8, 8)), ("preact-resnet18", (1, 8, 8))])
def test_spec_round_trip_rebuilds_the_same_architecture(name, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_shape=shape, mean=(0.3,), std=(0.4,))
    spec = json.loads(json.dumps(model.certkit_spec))  # JSON-serialisable
    assert spec["name"] == name and spec["kwargs"]["input_shape"] == list(shape)
    rebuilt = model_from_spec(spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(4, *shape)
    assert torch.equal(predict_logits(rebuilt, x, device="cpu"), predict_logits(model, x, device="cpu"))
    assert rebuilt.certkit_spec == model.certkit_spec
    assert torch.equal(rebuilt.normalize.mean.flatten(), torch.tensor([0.3]))


def test_build_model_defaults_and_errors():
    m = build_model("digits-cnn", num_classes=3, input_shape=(3, 12, 12))
    assert m.certkit_spec["kwargs"]["mean"] == [0.0, 0.0, 0.0] and m.certkit_spec["kwargs"]["std"] == [1.0] * 3
    assert m(torch.rand(2, 3, 12, 12)).shape == (2, 3)
    assert set(MODELS) == {"digits-cnn", "digits-bn-cnn", "rab-mnist-cnn", "preact-resnet18"}
    with pytest.raises(UnknownNameError, match="'digits-cnn'"):
        build_model("resnet1000", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"\(C, H, W\)"):
        build_model("digits-cnn", num_classes=10, input_shape=(8, 8))
    with pytest.raises(UnknownNameError, match="unknown model"):
        model_from_spec({"name": "nope", "kwargs": {}})
    with pytest.raises(InputError, match="exactly the keys"):
        model_from_spec({"name": "digits-cnn"})
    with pytest.raises(InputError, match="unknown key"):
        model_from_spec({"name": "digits-cnn", "kwargs": {"num_classes": 10, "input_shape": [1, 8, 8], "depth": 3}})
    with pytest.raises(InputError, match="lacks input_shape"):
        model_from_spec({"name": "digits-cnn", "kwargs": {"num_classes": 10}})


class _Const(nn.Module):
    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.out = out

    def forward(self, x):
        return self.out.expand(x.shape[0], -1).clone() if self.out.dim() == 2 else self.out


def test_predict_logits_batches_restores_mode_and_validates():
    torch.manual_seed(0)
    model = DigitsCNN()
    model.train()
    x = torch.rand(10, 1, 8, 8)
    full = predict_logits(model, x, batch_size=1024, device="cpu")
    small = predict_logits(model, x, batch_size=3, device="cpu")
    assert full.shape == (10, 10) and full.dtype == torch.float32
    assert torch.allclose(full, small, atol=1e-6)
    assert model.training  # mode restored
    labels = predict_labels(model, x, device="cpu")
    assert labels.dtype == torch.int64 and torch.equal(labels, full.argmax(1))
    assert predict_logits(model, x[:0], device="cpu").shape == (0, 10)
    with pytest.raises(InputError, match="NaN or inf logits"):
        predict_logits(_Const(torch.tensor([[float("nan"), 0.0]])), x, device="cpu")
    with pytest.raises(InputError, match="logits of shape"):
        predict_logits(_Const(torch.zeros(3)), x, device="cpu")
    bad = x.clone()
    bad[0] = float("inf")
    with pytest.raises(InputError, match="NaN or inf"):
        predict_logits(model, bad, device="cpu")


def test_digits_cnn_reaches_95_percent_quickly():
    d = load_digits()
    torch.manual_seed(0)
    model = build_model("digits-cnn", num_classes=10, input_shape=d.input_shape, mean=d.mean, std=d.std)
    train_model(model, d.train, epochs=10, lr=3e-3, batch_size=64, progress=False, device="cpu")
    acc = float((predict_labels(model, d.test.x, device="cpu") == d.test.y).float().mean())
    assert acc >= 0.95


def test_bn_digits_cnn_and_preact_resnet18_shapes_and_structure():
    from certkit.backdoor.models import DigitsBNCNN, PreActBlock, PreActResNet18

    d = DigitsBNCNN(num_classes=10)
    assert isinstance(next(d.children()), Normalize)
    assert d(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    torch.manual_seed(0)
    r = PreActResNet18(num_classes=10, in_channels=1, mean=(0.5,), std=(0.25,), input_size=8)
    assert isinstance(next(r.children()), Normalize)
    assert r(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    blocks = [m for m in r.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 8
    assert sum(b.shortcut is not None for b in blocks) == 3  # the three stride-2 stage entries
    # 11.17M parameters for 3-channel CIFAR inputs, as the standard PreAct-ResNet18
    c = PreActResNet18(num_classes=10)
    assert sum(p.numel() for p in c.parameters()) == 11_171_146
    assert c(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(InputError, match="at least 8x8"):
        PreActResNet18(input_size=4)


def test_preact_block_is_identity_plus_residual():
    from certkit.backdoor.models import PreActBlock

    b = PreActBlock(8, 8, 1)
    nn.init.zeros_(b.conv2.weight)  # residual branch off: the block is the identity
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(b.eval()(x), x)
