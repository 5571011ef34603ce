"""Datasets: the embedded digits, and every loader on small files written by the test (never downloads)."""

from __future__ import annotations

import pickle
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from certkit.backdoor.data import (
    DATASETS,
    ArrayDataset,
    DatasetSplits,
    load_dataset,
    load_digits,
    load_image_folder,
    load_npz,
    load_torchvision,
)
from certkit.errors import InputError, UnknownNameError


@pytest.fixture
def no_network(monkeypatch):
    """Make every download path fail loudly, so a test proves nothing tried to download."""

    def refuse(*args, **kwargs):
        raise AssertionError("certkit tried to download")

    for cls in (tvd.MNIST, tvd.CIFAR10, tvd.GTSRB):
        monkeypatch.setattr(cls, "download", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# ----------------------------------------------------------------------------------------------
# ArrayDataset / DatasetSplits
# ----------------------------------------------------------------------------------------------
def _toy(n=6, c=1, h=4, w=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.rand(n, c, h, w, generator=g), torch.arange(n) % k, k, "toy")


def test_array_dataset_validates_shape_dtype_range_and_labels():
    x, y = torch.rand(4, 1, 3, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(InputError, match=r"\[N, C, H, W\]"):
        ArrayDataset(x[:, 0], y, 3)
    with pytest.raises(InputError, match="floating"):
        ArrayDataset((x * 255).to(torch.uint8), y, 3)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ArrayDataset(x * 2, y, 3)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        ArrayDataset(bad, y, 3)
    with pytest.raises(InputError, match="labels outside"):
        ArrayDataset(x, torch.tensor([0, 1, 3, 0]), 3)
    with pytest.raises(InputError, match="4 inputs but y has 3"):
        ArrayDataset(x, y[:3], 3)
    with pytest.raises(InputError, match="integer class labels"):
        ArrayDataset(x, y.float(), 3)
    ds = ArrayDataset(x.double(), y.int(), 3)  # other float/int widths are converted
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64


def test_subset_copies_and_sha256_identifies_content():
    ds = _toy()
    sub = ds.subset([1, 3])
    assert len(sub) == 2 and torch.equal(sub.x, ds.x[[1, 3]]) and sub.num_classes == ds.num_classes
    sub.x[0] = 0.0
    assert not torch.equal(sub.x[0], ds.x[1])  # the subset is a copy
    assert len(ds.subset(ds.y == 0)) == 2  # boolean mask
    assert len(ds.subset([])) == 0
    assert ds.sha256() == _toy().sha256()
    assert ds.sha256() != _toy(seed=1).sha256()
    relabelled = ArrayDataset(ds.x, (ds.y + 1) % 3, 3)
    assert ds.sha256() != relabelled.sha256()


def test_loader_is_seeded():
    ds = _toy(n=20)
    order = [torch.cat([yb for _, yb in ds.loader(4, shuffle=True, seed=s)]) for s in (5, 5, 6)]
    assert torch.equal(order[0], order[1])
    assert not torch.equal(order[0], order[2])
    xb, yb = next(iter(ds.loader(batch_size=8)))
    assert xb.shape == (8, 1, 4, 4) and yb.dtype == torch.int64


# ----------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------
def test_digits_shapes_range_and_stratified_split():
    d = load_digits()
    assert isinstance(d, DatasetSplits) and d.name == "digits"
    assert d.train.x.shape == (1257, 1, 8, 8) and d.test.x.shape == (540, 1, 8, 8)
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    assert float(d.train.x.min()) == 0.0 and float(d.train.x.max()) == 1.0
    assert d.num_classes == 10 and d.input_shape == (1, 8, 8)
    counts = torch.bincount(d.test.y, minlength=10)
    assert int(counts.min()) >= 50 and int(counts.max()) <= 56  # stratified: ~54 per class
    assert len(d.mean) == 1 and 0.2 < d.mean[0] < 0.4 and 0.3 < d.std[0] < 0.45


def test_digits_split_is_deterministic_by_seed():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert a.train.sha256() == b.train.sha256() and a.test.sha256() == b.test.sha256()
    assert a.train.sha256() != c.train.sha256()
    assert len(load_digits(test_fraction=0.5).test) == 899
    with pytest.raises(InputError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_load_dataset_dispatch_and_unknown_name(tmp_path):
    assert load_dataset("digits").train.sha256() == load_digits().train.sha256()
    with pytest.raises(UnknownNameError, match="'digits'.*'mnist'"):
        load_dataset("imagenet")
    with pytest.raises(InputError, match="needs a path"):
        load_dataset("npz:")
    assert set(DATASETS) >= {"digits", "mnist", "cifar10", "gtsrb"}


# ----------------------------------------------------------------------------------------------
# torchvision layouts, written by the test
# ----------------------------------------------------------------------------------------------
def _write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


def _write_mnist(root: Path, n_train=20, n_test=10):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        _write_idx_images(raw / f"{split}-images-idx3-ubyte", imgs)
        _write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labels)
        data[split] = (imgs, labels)
    return data


def test_mnist_from_raw_idx_files(tmp_path, no_network):
    data = _write_mnist(tmp_path)
    d = load_torchvision("mnist", tmp_path)
    assert d.train.x.shape == (20, 1, 28, 28) and d.test.x.shape == (10, 1, 28, 28)
    assert d.num_classes == 10
    np.testing.assert_allclose(d.train.x[:, 0].numpy(), data["train"][0] / 255.0, atol=1e-7)
    assert d.test.y.tolist() == data["t10k"][1].tolist()
    assert load_dataset("mnist", root=tmp_path).test.sha256() == d.test.sha256()


def _write_cifar(root: Path, n_per_batch=4, n_test=6):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows are CHW-flattened
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        batches[name] = (data, labels)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_per_batch}, f)
    return batches


def test_cifar10_from_pickled_batches(tmp_path, monkeypatch, no_network):
    batches = _write_cifar(tmp_path)
    # torchvision verifies the md5 of every batch file (CIFAR10._check_integrity) and of batches.meta
    # (module-level check_integrity in CIFAR10._load_meta) against the real CIFAR-10 release; our tiny
    # hand-written batches cannot match those digests, so both checks are disabled for this test only.
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *args, **kwargs: True)
    d = load_torchvision("cifar10", tmp_path)
    assert d.train.x.shape == (20, 3, 32, 32) and d.test.x.shape == (6, 3, 32, 32)
    data, labels = batches["test_batch"]
    np.testing.assert_allclose(d.test.x.reshape(6, -1).numpy(), data / 255.0, atol=1e-7)
    assert d.test.y.tolist() == labels
    assert d.train.y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert len(d.mean) == 3 and d.num_classes == 10


def _write_gtsrb(root: Path, classes=(0, 2, 5), per_class=3, n_test=4):
    base = root / "gtsrb"
    rng = np.random.default_rng(0)
    for c in classes:
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(per_class):
            h, w = 20 + i, 25 + 2 * i  # GTSRB images come in various sizes
            name = f"00000_{i:05d}.ppm"
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / name)
            rows.append(f"{name};{w};{h};1;1;{w - 1};{h - 1};{c}")
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")  # ignored by torchvision
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    test_labels = []
    for i in range(n_test):
        name = f"{i:05d}.ppm"
        Image.fromarray(np.full((30, 30, 3), 10 * i, dtype=np.uint8)).save(test_dir / name)
        label = classes[i % len(classes)]
        rows.append(f"{name};30;30;5;5;25;25;{label}")
        test_labels.append(label)
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return test_labels


def test_gtsrb_from_folders_and_csv(tmp_path, no_network):
    test_labels = _write_gtsrb(tmp_path)
    d = load_torchvision("gtsrb", tmp_path)
    assert d.train.x.shape == (9, 3, 32, 32) and d.test.x.shape == (4, 3, 32, 32)
    assert d.num_classes == 43
    # labels come from the folder names 00000/00002/00005, not from the folders' rank
    assert sorted(set(d.train.y.tolist())) == [0, 2, 5]
    assert d.test.y.tolist() == test_labels
    np.testing.assert_allclose(d.test.x[2].numpy(), 20 / 255.0, atol=1e-6)  # constant image survives resize


@pytest.mark.parametrize("name", ["mnist", "cifar10", "gtsrb"])
def test_missing_torchvision_files_raise_clear_error_without_download(tmp_path, name, no_network):
    with pytest.raises(InputError) as info:
        load_torchvision(name, tmp_path / "nowhere")
    msg = str(info.value)
    assert "download=True" in msg and "--download" in msg and str(tmp_path / "nowhere") in msg
    with pytest.raises(InputError, match="download=True"):
        load_dataset(name, root=tmp_path)


def test_download_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_download(self):
        calls.append(type(self).__name__)
        raise RuntimeError("offline")

    monkeypatch.setattr(tvd.MNIST, "download", fake_download)
    with pytest.raises(InputError, match="download=True"):
        load_torchvision("mnist", tmp_path)
    assert calls == []
    with pytest.raises(InputError, match="could not download.*offline"):
        load_torchvision("mnist", tmp_path, download=True)
    assert calls == ["MNIST"]


def test_unknown_torchvision_name(tmp_path):
    with pytest.raises(UnknownNameError, match="svhn"):
        load_torchvision("svhn", tmp_path)


# ----------------------------------------------------------------------------------------------
# npz
# ----------------------------------------------------------------------------------------------
def _save_npz(path, x_train, x_test, y_train=None, y_test=None, **extra):
    y_train = np.arange(len(x_train)) % 3 if y_train is None else y_train
    y_test = np.arange(len(x_test)) % 3 if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return path


@pytest.mark.parametrize(
    "layout, shape, expected",
    [
        ("NHW", (6, 5, 7), (1, 5, 7)),
        ("NCHW-1", (6, 1, 5, 7), (1, 5, 7)),
        ("NCHW-3", (6, 3, 5, 7), (3, 5, 7)),
        ("NHWC-1", (6, 5, 7, 1), (1, 5, 7)),
        ("NHWC-3", (6, 5, 7, 3), (3, 5, 7)),
    ],
)
def test_npz_layouts_uint8(tmp_path, layout, shape, expected):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    d = load_npz(_save_npz(tmp_path / "a.npz", x, x[:4]))
    assert d.input_shape == expected and len(d.train) == 6 and len(d.test) == 4
    assert d.num_classes == 3 and d.name == "a"
    ref = x[:, None] if x.ndim == 3 else (x.transpose(0, 3, 1, 2) if layout.startswith("NHWC") else x)
    np.testing.assert_allclose(d.train.x.numpy(), ref / 255.0, atol=1e-7)


def test_npz_float_images_and_column_labels(tmp_path):
    x = np.random.default_rng(0).random((5, 4, 4, 3)).astype(np.float64)
    d = load_npz(_save_npz(tmp_path / "f.npz", x, x, y_train=np.arange(5)[:, None], y_test=np.zeros(5, np.int32)))
    assert d.input_shape == (3, 4, 4) and d.num_classes == 5
    np.testing.assert_allclose(d.train.x.numpy(), x.transpose(0, 3, 1, 2), atol=1e-6)


def test_npz_errors_name_the_key(tmp_path):
    x = np.zeros((4, 5, 5), np.uint8)
    np.savez(tmp_path / "missing.npz", x_train=x, y_train=np.zeros(4, int), x_test=x)
    with pytest.raises(InputError, match="y_test"):
        load_npz(tmp_path / "missing.npz")
    with pytest.raises(InputError, match=r"x_test.*\[0, 1\]"):
        load_npz(_save_npz(tmp_path / "r.npz", x, np.full((4, 5, 5), 2.0)))
    with pytest.raises(InputError, match="x_train.*dtype"):
        load_npz(_save_npz(tmp_path / "i.npz", x.astype(np.int64), x))
    with pytest.raises(InputError, match="y_train.*integer"):
        load_npz(_save_npz(tmp_path / "y.npz", x, x, y_train=np.zeros(4, float)))
    with pytest.raises(InputError, match="y_test has 3 labels"):
        load_npz(_save_npz(tmp_path / "n.npz", x, x, y_test=np.zeros(3, int)))
    with pytest.raises(InputError, match="x_train.*shape"):
        load_npz(_save_npz(tmp_path / "s.npz", np.zeros((4, 5, 5, 5), np.uint8), x))
    with pytest.raises(InputError, match="x_test images"):
        load_npz(_save_npz(tmp_path / "m.npz", x, np.zeros((4, 6, 6), np.uint8)))
    with pytest.raises(InputError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=x, x_test=x, y_test=x)
    with pytest.raises(InputError, match="could not read"):  # allow_pickle=False refuses object arrays
        load_npz(tmp_path / "obj.npz")


def test_load_dataset_npz_spec(tmp_path):
    x = np.zeros((4, 5, 5), np.uint8)
    path = _save_npz(tmp_path / "spec.npz", x, x)
    assert load_dataset(f"npz:{path}").name == "spec"


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------
def _write_folder(root: Path, classes=("cat", "dog"), per_class=5, mode="RGB", ext="png", size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=None).save(root / c / f"{i}.{ext}")


def test_image_folder_split_rgb(tmp_path):
    _write_folder(tmp_path / "pets", per_class=5, ext="png")
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")
    d = load_image_folder(tmp_path / "pets", image_size=16, test_fraction=0.2, seed=0)
    assert d.input_shape == (3, 16, 16) and d.num_classes == 2 and d.name == "pets"
    assert len(d.train) == 8 and len(d.test) == 2
    assert sorted(d.test.y.tolist()) == [0, 1]  # stratified
    again = load_dataset(f"folder:{tmp_path / 'pets'}")
    assert again.input_shape == (3, 32, 32)
    assert load_image_folder(tmp_path / "pets", image_size=16).test.sha256() == d.test.sha256()


def test_image_folder_train_test_dirs_greyscale(tmp_path):
    _write_folder(tmp_path / "g" / "train", classes=("a", "b", "c"), per_class=2, mode="L", ext="jpg")
    _write_folder(tmp_path / "g" / "test", classes=("b", "c"), per_class=1, mode="L", ext="ppm")
    d = load_image_folder(tmp_path / "g", image_size=8)
    assert d.input_shape == (1, 8, 8) and d.num_classes == 3
    assert len(d.train) == 6 and d.test.y.tolist() == [1, 2]


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image_folder(tmp_path / "absent")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="no class folders"):
        load_image_folder(tmp_path / "empty")
    _write_folder(tmp_path / "x" / "train", classes=("a",), per_class=1)
    _write_folder(tmp_path / "x" / "test", classes=("z",), per_class=1)
    with pytest.raises(InputError, match="do not appear in train"):
        load_image_folder(tmp_path / "x")
