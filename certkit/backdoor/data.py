"""Datasets as in-memory tensors: the embedded digits set, torchvision datasets, ``.npz`` arrays, image folders.

Every loader returns a :class:`DatasetSplits` of two :class:`ArrayDataset` (train, test) holding float32
NCHW inputs in ``[0, 1]`` pixel units and int64 labels. Normalisation is *not* applied here: it is the
model's first layer (:class:`certkit.backdoor.models.Normalize`), built from :attr:`DatasetSplits.mean` /
:attr:`DatasetSplits.std`, so that smoothing sigmas and trigger norms are in pixel units.

Library code never downloads: :func:`load_torchvision` only fetches files when ``download=True``.

Decisions (not fixed by the design notes):

- ``load_dataset(..., root=None)`` uses ``$CERTKIT_DATA`` if set, else ``./data`` (:func:`default_root`).
- GTSRB training labels are taken from the numeric class folder names (``00000`` .. ``00042``), not from
  the folder's rank, so a copy with a missing class folder keeps the right labels; ``num_classes = 43``.
- ``.npz`` 4-D arrays whose axis 1 *and* axis 3 both have size 1 or 3 are read as NCHW (torch convention);
  an explicit ``input_shape`` settles it.
- ``.npz`` flat arrays ``[N, D]`` are rows of ``C*H*W`` values in C, H, W order (``x.reshape(N, C, H, W)``,
  the order of CIFAR-10's own files). The shape is given (``input_shape``; in a dataset spec
  ``npz@C,H,W:PATH``, so that run configs record it with the dataset) or guessed: ``D = H*H`` gives
  ``(1, H, H)``, ``D = 3*H*H`` gives ``(3, H, H)`` (both cannot hold at once), with a
  :class:`GuessedShapeWarning` naming the guess; any other ``D`` is refused.
- Image folders: images are resized to ``image_size x image_size`` (bilinear); they are read as one
  channel when every image is greyscale, else as RGB. The split is stratified when every class has at
  least two images, else a plain seeded random split.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from certkit._validation import check_input_shape, check_positive_int
from certkit.errors import InputError, UnknownNameError

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetSplits",
    "GuessedShapeWarning",
    "dataset_spec",
    "default_root",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "load_torchvision",
]

#: Dataset names accepted by :func:`load_dataset` (plus the ``npz:PATH``, ``npz@C,H,W:PATH`` and ``folder:PATH``
#: forms).
DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10", "gtsrb", "npz", "folder")
TORCHVISION_DATASETS: tuple[str, ...] = ("mnist", "cifar10", "gtsrb")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".pgm", ".tif", ".tiff")

_NUM_CLASSES = {"mnist": 10, "cifar10": 10, "gtsrb": 43}


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------
@dataclass
class ArrayDataset:
    """A labelled set of images held in memory.

    Attributes:
        x: float32 tensor ``[N, C, H, W]`` with values in ``[0, 1]`` (pixel units), on the CPU.
        y: int64 tensor ``[N]`` of labels in ``[0, num_classes)``.
        num_classes: number of classes of the task (not necessarily all present in ``y``).
        name: free-form name used in logs and run manifests.
        check_range: reject values outside ``[0, 1]`` (default). ``False`` is meant for training sets
            poisoned with an *unclipped* additive trigger (RAB's triggers, :mod:`certkit.backdoor.attacks`), whose
            inputs may leave ``[0, 1]``; the other checks still apply and :meth:`subset` keeps the flag.

    Float inputs of another precision and integer labels of another width are converted; anything else
    (wrong shape, NaN/inf, values outside ``[0, 1]`` unless ``check_range=False``, labels out of range)
    raises :class:`InputError`.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = ""
    check_range: bool = True

    def __post_init__(self) -> None:
        self.num_classes = check_positive_int(self.num_classes, "num_classes")
        if not isinstance(self.name, str):
            raise InputError(f"name must be a string, got {type(self.name).__name__}")
        if not isinstance(self.check_range, (bool, np.bool_)):
            raise InputError(f"check_range must be a bool, got {self.check_range!r}")
        self.check_range = bool(self.check_range)
        x = torch.as_tensor(self.x).detach().cpu() if not isinstance(self.x, torch.Tensor) else self.x.detach().cpu()
        if not torch.is_floating_point(x):
            raise InputError(
                f"x must be a floating-point tensor with values in [0, 1], got dtype {x.dtype} "
                "(divide uint8 images by 255)"
            )
        if x.dim() != 4:
            raise InputError(f"x must have shape [N, C, H, W], got {tuple(x.shape)}")
        x = x.to(torch.float32).contiguous()
        y = torch.as_tensor(self.y).detach().cpu() if not isinstance(self.y, torch.Tensor) else self.y.detach().cpu()
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise InputError(f"y must hold integer class labels, got dtype {y.dtype}")
        y = y.to(torch.int64).contiguous()
        if y.dim() != 1:
            raise InputError(f"y must have shape [N], got {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise InputError(f"x has {x.shape[0]} inputs but y has {y.shape[0]} labels")
        if x.numel():
            if not bool(torch.isfinite(x).all()):
                raise InputError("x contains NaN or inf values")
            lo, hi = float(x.min()), float(x.max())
            if self.check_range and (lo < 0.0 or hi > 1.0):
                raise InputError(f"x must lie in [0, 1] (pixel units), got min {lo:g}, max {hi:g}")
        if y.numel():
            ylo, yhi = int(y.min()), int(y.max())
            if ylo < 0 or yhi >= self.num_classes:
                raise InputError(
                    f"y has labels outside [0, {self.num_classes}): min {ylo}, max {yhi}"
                )
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, n={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input."""
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Any) -> ArrayDataset:
        """Return a new dataset with the rows ``indices`` (int sequence/array/tensor or boolean mask).

        The tensors are copied, so editing the subset never changes this dataset.
        """
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise InputError(f"boolean mask must have shape [{len(self)}], got {tuple(idx.shape)}")
            idx = torch.nonzero(idx, as_tuple=False).flatten()
        elif idx.numel() == 0:
            idx = idx.to(torch.int64)
        elif idx.dtype.is_floating_point or idx.is_complex():
            raise InputError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
        idx = idx.to(torch.int64).flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise InputError(f"indices out of range for a dataset of {len(self)} inputs")
        return ArrayDataset(
            self.x[idx].clone(), self.y[idx].clone(), self.num_classes, self.name, check_range=self.check_range
        )

    def sha256(self) -> str:
        """Hex SHA-256 of the data: shapes and dtypes, then the raw bytes of ``x`` and of ``y``.

        Used in run manifests to check that a run is resumed or evaluated on the same data.
        """
        h = hashlib.sha256()
        h.update(f"x{tuple(self.x.shape)}{self.x.dtype};y{tuple(self.y.shape)}{self.y.dtype};".encode())
        h.update(self.x.contiguous().numpy().tobytes())
        h.update(self.y.contiguous().numpy().tobytes())
        return h.hexdigest()

    def loader(self, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """A :class:`~torch.utils.data.DataLoader` over ``(x, y)`` batches; shuffling uses a generator
        seeded with ``seed``, so the order is reproducible and independent of the global RNG."""
        batch_size = check_positive_int(batch_size, "batch_size")
        gen = torch.Generator().manual_seed(int(seed))
        return DataLoader(TensorDataset(self.x, self.y), batch_size=batch_size, shuffle=bool(shuffle), generator=gen)


@dataclass
class DatasetSplits:
    """A train/test pair of :class:`ArrayDataset` with the same input shape and number of classes."""

    train: ArrayDataset
    test: ArrayDataset
    name: str

    def __post_init__(self) -> None:
        for key in ("train", "test"):
            if not isinstance(getattr(self, key), ArrayDataset):
                raise InputError(f"{key} must be an ArrayDataset, got {type(getattr(self, key)).__name__}")
        if self.train.input_shape != self.test.input_shape:
            raise InputError(
                f"train inputs have shape {self.train.input_shape} but test inputs {self.test.input_shape}"
            )
        if self.train.num_classes != self.test.num_classes:
            raise InputError(
                f"train has num_classes={self.train.num_classes} but test {self.test.num_classes}"
            )
        if len(self.train) == 0:
            raise InputError("the training split is empty")

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input."""
        return self.train.input_shape

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the training inputs (pixel units), for the model's Normalize layer."""
        return tuple(float(v) for v in self.train.x.double().mean(dim=(0, 2, 3)))

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the training inputs; a constant channel gets 1.0."""
        s = self.train.x.double().std(dim=(0, 2, 3), unbiased=False)
        return tuple(float(v) if float(v) > 1e-8 else 1.0 for v in s)

    def __repr__(self) -> str:
        return (
            f"DatasetSplits(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _check_fraction(value: float, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number in (0, 1), got {value!r}") from exc
    if not (0.0 < f < 1.0):
        raise InputError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return f


def _split_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test index split, stratified by label when every class has >= 2 members."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    try:
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=int(seed), stratify=stratify)
    except ValueError:  # too few samples per class for the requested test size
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=int(seed), stratify=None)
    return np.sort(tr), np.sort(te)


def _uint8_nhwc_to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` (or ``[N, H, W]``) -> float32 ``[N, C, H, W]`` in [0, 1]."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[..., None]
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    return t.to(torch.float32).div_(255.0)


def default_root() -> Path:
    """Default dataset root: ``$CERTKIT_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("CERTKIT_DATA", "data")).expanduser()


# --------------------------------------------------------------------------------------------------
# Embedded digits
# --------------------------------------------------------------------------------------------------
def load_digits(test_fraction: float = 0.3, seed: int = 0) -> DatasetSplits:
    """scikit-learn's bundled digits (1797 real 8x8 greyscale images, 10 classes; no download).

    Pixel values 0..16 are divided by 16. The split is stratified and fixed by ``seed``
    (``sklearn.model_selection.train_test_split``); with the defaults: 1257 train / 540 test inputs
    of shape ``[1, 8, 8]``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    test_fraction = _check_fraction(test_fraction, "test_fraction")
    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    tr, te = _split_indices(y.numpy(), test_fraction, seed)
    return DatasetSplits(
        train=ArrayDataset(x[tr], y[tr], 10, "digits-train"),
        test=ArrayDataset(x[te], y[te], 10, "digits-test"),
        name="digits",
    )


# --------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------
def _resize_rgb_32(img: Any) -> np.ndarray:
    from PIL import Image

    return np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.uint8)


def _gtsrb_split(ds: Any, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    samples = list(ds._samples)  # [(path, label)], read by torchvision from the folders / GT csv
    if not samples:
        raise InputError(f"GTSRB {'train' if train else 'test'} split under {ds.root!r} holds no images")
    images, labels = [], []
    for path, label in samples:
        if train:
            folder = Path(path).parent.name
            label = int(folder) if folder.isdigit() else int(label)
        with Image.open(path) as img:
            images.append(_resize_rgb_32(img))
        labels.append(int(label))
    return _uint8_nhwc_to_tensor(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def load_torchvision(name: str, root: str | os.PathLike, *, download: bool = False) -> DatasetSplits:
    """Load MNIST, CIFAR-10 or GTSRB through ``torchvision.datasets`` from ``root``.

    Shapes: MNIST ``[1, 28, 28]``; CIFAR-10 ``[3, 32, 32]``; GTSRB ``[3, 32, 32]`` (every image resized
    to 32x32 with PIL bilinear). Nothing is downloaded unless ``download=True``; missing files raise
    :class:`InputError` naming the root and telling to pass ``download=True`` (CLI: ``--download``).
    On-disk layouts (torchvision's): ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
    ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (md5-checked),
    ``root/gtsrb/GTSRB/Training/000NN/*.ppm``, ``root/gtsrb/GTSRB/Final_Test/Images/*.ppm`` and
    ``root/gtsrb/GT-final_test.csv``.
    """
    import torchvision.datasets as tvd

    if not isinstance(name, str) or name.lower() not in TORCHVISION_DATASETS:
        raise UnknownNameError(
            f"unknown torchvision dataset {name!r}; choose one of {', '.join(map(repr, TORCHVISION_DATASETS))}"
        )
    name = name.lower()
    if root is None:
        raise InputError("root must be a directory path for torchvision datasets")
    root = Path(root).expanduser()
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in ("train", "test"):
        train = split == "train"
        try:
            if name == "mnist":
                ds = tvd.MNIST(str(root), train=train, download=download)
                x = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
                splits[split] = (_uint8_nhwc_to_tensor(x.astype(np.uint8)), torch.as_tensor(ds.targets).long())
            elif name == "cifar10":
                ds = tvd.CIFAR10(str(root), train=train, download=download)
                splits[split] = (
                    _uint8_nhwc_to_tensor(np.asarray(ds.data, dtype=np.uint8)),
                    torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64),
                )
            else:
                ds = tvd.GTSRB(str(root), split=split, download=download)
                splits[split] = _gtsrb_split(ds, train)
        except InputError:
            raise
        except (RuntimeError, OSError) as exc:
            if download:
                raise InputError(f"could not download or read {name} ({split}) under root {str(root)!r}: {exc}") from exc
            if not isinstance(exc, RuntimeError):
                raise InputError(f"could not read {name} ({split}) under root {str(root)!r}: {exc}") from exc
            raise InputError(
                f"{name} ({split} split) not found or corrupted under root {str(root)!r}; "
                f"pass download=True (CLI: --download) to download it there, or point root at a copy "
                f"(torchvision said: {exc})"
            ) from exc
        except (ValueError, TypeError, KeyError, csv.Error) as exc:
            raise InputError(f"could not read {name} ({split}) under root {str(root)!r}: {exc}") from exc
    k = _NUM_CLASSES[name]
    return DatasetSplits(
        train=ArrayDataset(*splits["train"], k, f"{name}-train"),
        test=ArrayDataset(*splits["test"], k, f"{name}-test"),
        name=name,
    )


# --------------------------------------------------------------------------------------------------
# .npz arrays
# --------------------------------------------------------------------------------------------------
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: an .npz label above both this and the number of images is refused (num_classes = max label + 1 sizes buffers)
MAX_CLASSES_FLOOR = 1000


class GuessedShapeWarning(UserWarning):
    """Flat ``.npz`` images were reshaped to a guessed square ``(C, H, W)``; pass ``input_shape`` to choose."""


def _guess_flat_shape(d: int, key: str) -> tuple[int, int, int]:
    """The square ``(1, H, H)`` or ``(3, H, H)`` of ``d`` values per row (warned), else :class:`InputError`."""
    for c in (1, 3):
        h = math.isqrt(d // c) if d % c == 0 else 0
        if h and c * h * h == d:
            warnings.warn(f"{key} holds flat rows of {d} values: read as images of shape ({c}, {h}, {h}) in C, H, W "
                          f"order (a guess; pass input_shape, CLI --input-shape C,H,W, to choose)",
                          GuessedShapeWarning, stacklevel=3)
            return c, h, h
    raise InputError(f"{key} holds flat rows of {d} values, neither H*H (1 channel) nor 3*H*H (3 channels): "
                     "pass input_shape=(C, H, W) (CLI: --input-shape C,H,W)")


def _npz_images(a: np.ndarray, key: str, input_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.floating) or a.dtype == np.uint8):
        raise InputError(f"{key} must be uint8 (0..255) or float (0..1), got dtype {a.dtype}")
    if a.ndim == 2:  # flat rows, C*H*W values each in C, H, W order
        c, h, w = input_shape if input_shape is not None else _guess_flat_shape(int(a.shape[1]), key)
        if a.shape[1] != c * h * w:
            raise InputError(f"{key} holds flat rows of {a.shape[1]} values but input_shape {(c, h, w)} needs "
                             f"{c * h * w}")
        a = a.reshape(a.shape[0], c, h, w)
    elif input_shape is not None and a.ndim in (3, 4):
        c, h, w = input_shape
        if a.ndim == 3 and (c, h, w) == (1, *a.shape[1:]):
            a = a[:, None]
        elif a.ndim == 4 and tuple(a.shape[1:]) == (c, h, w):
            pass
        elif a.ndim == 4 and tuple(a.shape[1:]) == (h, w, c):
            a = a.transpose(0, 3, 1, 2)
        else:
            raise InputError(f"{key} has shape {a.shape}, which does not hold images of input_shape {(c, h, w)} "
                             "(as NHW, NCHW or NHWC)")
    elif a.ndim == 3:
        a = a[:, None]  # NHW -> N1HW
    elif a.ndim == 4:
        if a.shape[1] in (1, 3):
            pass  # NCHW (also chosen when both axis 1 and axis 3 could be channels)
        elif a.shape[3] in (1, 3):
            a = a.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        else:
            raise InputError(
                f"{key} has shape {a.shape}: expected NHW, NCHW or NHWC with 1 or 3 channels"
            )
    else:
        raise InputError(f"{key} must be 2-D (N, C*H*W flat), 3-D (NHW) or 4-D (NCHW / NHWC), got shape {a.shape}")
    if a.shape[0] == 0:
        raise InputError(f"{key} holds no images")
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32).div_(255.0)
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise InputError(f"{key} contains NaN or inf values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{key} is float with values in [{lo:g}, {hi:g}]; float images must lie in [0, 1] "
            "(store uint8 0..255 or divide by 255)"
        )
    return torch.from_numpy(np.ascontiguousarray(a))


def _npz_labels(a: np.ndarray, key: str, n: int) -> torch.Tensor:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{key} must hold integer class labels, got dtype {a.dtype}")
    if a.ndim != 1:
        raise InputError(f"{key} must have shape [N], got {a.shape}")
    if a.shape[0] != n:
        raise InputError(f"{key} has {a.shape[0]} labels but the images have {n}")
    if a.size and int(a.min()) < 0:
        raise InputError(f"{key} has negative labels (min {int(a.min())})")
    return torch.from_numpy(a.astype(np.int64))


def load_npz(path: str | os.PathLike, *, input_shape: Sequence[int] | str | None = None) -> DatasetSplits:
    """Load ``x_train, y_train, x_test, y_test`` from an ``.npz`` file (``allow_pickle=False``).

    Images: uint8 0..255 or float in ``[0, 1]``; layout NHW, NCHW or NHWC with 1 or 3 channels, or flat
    ``[N, C*H*W]`` rows in C, H, W order. ``input_shape`` ``(C, H, W)`` reads flat rows (without it a square
    ``(1, H, H)`` or ``(3, H, H)`` is guessed, with a :class:`GuessedShapeWarning`) and checks, or settles
    the layout of, 3-D and 4-D arrays. Labels: integers ``>= 0``, shape ``[N]`` (or ``[N, 1]``);
    ``num_classes = max label + 1``. Each problem names the offending key.

    >>> import tempfile
    >>> rows = np.zeros((6, 784), np.uint8)  # six flat 28x28 images
    >>> path = Path(tempfile.mkdtemp()) / "flat.npz"
    >>> np.savez(path, x_train=rows, y_train=np.arange(6) % 2, x_test=rows[:2], y_test=np.array([0, 1]))
    >>> load_npz(path, input_shape=(1, 28, 28))
    DatasetSplits(name='flat', train=6, test=2, input_shape=(1, 28, 28), num_classes=2)
    """
    shape = None if input_shape is None else check_input_shape(input_shape)
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"npz file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise InputError(f"npz file {str(path)!r} is empty (0 bytes)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"could not read {str(path)!r} as an .npz archive: {' '.join(str(exc).split())}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{str(path)!r} holds a single array (a .npy file), not an .npz archive with keys "
                         f"{', '.join(_NPZ_KEYS)}; save it with numpy.savez")
    try:
        with loaded as f:
            missing = [k for k in _NPZ_KEYS if k not in f.files]
            if missing:
                raise InputError(
                    f"{str(path)!r} lacks key(s) {', '.join(missing)}; it has {', '.join(f.files) or 'none'} "
                    f"(expected {', '.join(_NPZ_KEYS)})"
                )
            arrays = {k: f[k] for k in _NPZ_KEYS}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"could not read {str(path)!r} as an .npz archive: {' '.join(str(exc).split())}") from exc
    if shape is None and arrays["x_train"].ndim == 2:  # guessed once (one warning), used for both splits
        shape = _guess_flat_shape(int(arrays["x_train"].shape[1]), "x_train")
    x_tr = _npz_images(arrays["x_train"], "x_train", shape)
    x_te = _npz_images(arrays["x_test"], "x_test", shape)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise InputError(
            f"x_train images have shape {tuple(x_tr.shape[1:])} but x_test images {tuple(x_te.shape[1:])}"
        )
    y_tr = _npz_labels(arrays["y_train"], "y_train", x_tr.shape[0])
    y_te = _npz_labels(arrays["y_test"], "y_test", x_te.shape[0])
    k = int(max(int(y_tr.max()), int(y_te.max()) if y_te.numel() else 0)) + 1
    if k > max(MAX_CLASSES_FLOOR, len(y_tr) + len(y_te)):
        raise InputError(f"{str(path)!r} has label {k - 1} but only {len(y_tr) + len(y_te)} images: labels must be "
                         f"class indices 0..K-1 (num_classes = max label + 1)")
    return DatasetSplits(
        train=ArrayDataset(x_tr, y_tr, k, f"{path.stem}-train"),
        test=ArrayDataset(x_te, y_te, k, f"{path.stem}-test"),
        name=path.stem,
    )


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------
def _scan_folder(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {}
    for c in classes:
        files = sorted(
            p for p in (root / c).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if files:
            found[c] = files
    return found


def _read_images(files: Sequence[Path]) -> tuple[list[Any], bool]:
    from PIL import Image

    images, grey = [], True
    limit = Image.MAX_IMAGE_PIXELS or 0
    for p in files:
        try:
            with Image.open(p) as img:
                if limit and img.width * img.height > limit:  # checked from the header, before decoding
                    raise InputError(f"image {str(p)!r} claims {img.width}x{img.height} pixels, more than the "
                                     f"{limit} PIL allows (a decompression bomb or a wrong file); remove it")
                img.load()
                if img.mode not in ("L", "1", "LA"):
                    grey = False
                images.append(img.copy())
        except Image.DecompressionBombError as exc:
            raise InputError(f"image {str(p)!r} is refused as a decompression bomb: "
                             f"{' '.join(str(exc).split())}") from exc
        except OSError as exc:
            raise InputError(f"could not read image {str(p)!r}: {exc}") from exc
    return images, grey


def _to_array(images: Sequence[Any], grey: bool, image_size: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for img in images:
        img = img.convert("L" if grey else "RGB")
        out.append(np.asarray(img.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8))
    return _uint8_nhwc_to_tensor(np.stack(out))


def load_image_folder(
    root: str | os.PathLike, *, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> DatasetSplits:
    """Load ``root/<class>/*.{png,jpg,jpeg,ppm,bmp,...}`` (class index = rank of the sorted folder name).

    If ``root/train`` and ``root/test`` both exist they are the split (test classes must appear in
    train); otherwise a seeded (stratified when possible) split with ``test_fraction`` of the images in
    test. Images are resized to ``image_size x image_size``; one channel if all are greyscale, else RGB.
    """
    root = Path(root).expanduser()
    image_size = check_positive_int(image_size, "image_size")
    if not root.is_dir():
        raise InputError(f"image folder {str(root)!r} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        tr_found, te_found = _scan_folder(root / "train"), _scan_folder(root / "test")
        if not tr_found:
            raise InputError(f"no class folders with images under {str(root / 'train')!r}")
        classes = sorted(tr_found)
        extra = sorted(set(te_found) - set(classes))
        if extra:
            raise InputError(f"test classes {extra} under {str(root / 'test')!r} do not appear in train")
        idx = {c: i for i, c in enumerate(classes)}
        tr_files = [(p, idx[c]) for c in classes for p in tr_found[c]]
        te_files = [(p, idx[c]) for c in sorted(te_found) for p in te_found[c]]
        if not te_files:
            raise InputError(f"no test images under {str(root / 'test')!r}")
        tr_imgs, g1 = _read_images([p for p, _ in tr_files])
        te_imgs, g2 = _read_images([p for p, _ in te_files])
        grey = g1 and g2
        x_tr, x_te = _to_array(tr_imgs, grey, image_size), _to_array(te_imgs, grey, image_size)
        y_tr = torch.tensor([c for _, c in tr_files], dtype=torch.int64)
        y_te = torch.tensor([c for _, c in te_files], dtype=torch.int64)
    else:
        test_fraction = _check_fraction(test_fraction, "test_fraction")
        found = _scan_folder(root)
        if not found:
            raise InputError(
                f"no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}; "
                "expected root/<class>/<image> or root/train/<class>/... and root/test/<class>/..."
            )
        classes = sorted(found)
        files = [(p, i) for i, c in enumerate(classes) for p in found[c]]
        if len(files) < 2:
            raise InputError(f"{str(root)!r} holds {len(files)} image(s); need at least 2 to split")
        imgs, grey = _read_images([p for p, _ in files])
        x = _to_array(imgs, grey, image_size)
        y = torch.tensor([c for _, c in files], dtype=torch.int64)
        tr, te = _split_indices(y.numpy(), test_fraction, seed)
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    k = len(classes)
    return DatasetSplits(
        train=ArrayDataset(x_tr, y_tr, k, f"{root.name}-train"),
        test=ArrayDataset(x_te, y_te, k, f"{root.name}-test"),
        name=root.name,
    )


# --------------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------------
def _parse_spec(spec: Any) -> tuple[str, tuple[int, int, int] | None, str | None]:
    """``(kind, input shape or None, path or None)`` of a dataset spec; the syntax checks of :func:`load_dataset`."""
    if not isinstance(spec, str) or not spec:
        raise InputError(f"dataset spec must be a non-empty string, got {spec!r}")
    head, sep, arg = spec.partition(":")
    kind, at, shape_text = head.strip().lower().partition("@")
    if (sep and kind in ("npz", "folder")) or (not sep and kind in ("digits", *TORCHVISION_DATASETS)):
        if at and kind != "npz":
            raise InputError(f"dataset spec {spec!r}: a shape (@C,H,W) applies to npz@C,H,W:PATH only")
        if sep and not arg:
            raise InputError(f"dataset spec {spec!r} needs a path after '{head}:'")
        shape = check_input_shape(shape_text, f"the shape in dataset spec {spec!r}") if at else None
        return kind, shape, arg if sep else None
    choices = ["digits", *TORCHVISION_DATASETS, "npz:PATH", "npz@C,H,W:PATH", "folder:PATH"]
    raise UnknownNameError(f"unknown dataset {spec!r}; choose one of {', '.join(map(repr, choices))}")


def dataset_spec(dataset: str, input_shape: Sequence[int] | str | None = None) -> str:
    """``dataset`` with ``input_shape`` ``(C, H, W)`` written into it (``npz:PATH`` -> ``npz@C,H,W:PATH``), so
    that a run config records the shape of flat ``.npz`` images with the dataset (what ``--input-shape`` does).

    >>> dataset_spec("npz:data/flat.npz", "1,28,28")
    'npz@1,28,28:data/flat.npz'
    >>> dataset_spec("digits", (1, 8, 8))
    Traceback (most recent call last):
    ...
    certkit.errors.InputError: input_shape applies to npz:PATH datasets (flat or ambiguous arrays), not 'digits'
    """
    kind, shape, path = _parse_spec(dataset)
    if input_shape is None:
        return dataset
    if kind != "npz":
        raise InputError(f"input_shape applies to npz:PATH datasets (flat or ambiguous arrays), not {dataset!r}")
    given = check_input_shape(input_shape)
    if shape is not None and shape != given:
        raise InputError(f"input_shape {given} contradicts the shape {shape} in dataset spec {dataset!r}")
    return f"npz@{given[0]},{given[1]},{given[2]}:{path}"


def load_dataset(
    spec: str, *, root: str | os.PathLike | None = None, download: bool = False, seed: int = 0,
    input_shape: Sequence[int] | str | None = None,
) -> DatasetSplits:
    """Load a dataset by spec: ``"digits" | "mnist" | "cifar10" | "gtsrb" | "npz:PATH" | "npz@C,H,W:PATH" |
    "folder:PATH"``.

    ``root`` is the torchvision root (default :func:`default_root`); ``seed`` fixes the split of
    datasets without one (digits, image folders without train/test). ``download`` only applies to
    torchvision datasets. ``input_shape`` ``(C, H, W)`` (or the ``@C,H,W`` of the spec, see
    :func:`dataset_spec`) is the shape of flat ``.npz`` images (:func:`load_npz`).

    >>> load_dataset("digits")
    DatasetSplits(name='digits', train=1257, test=540, input_shape=(1, 8, 8), num_classes=10)
    """
    kind, shape, path = _parse_spec(dataset_spec(spec, input_shape))
    if kind == "npz":
        return load_npz(path, input_shape=shape)
    if kind == "folder":
        return load_image_folder(path, seed=seed)
    if kind == "digits":
        return load_digits(seed=seed)
    return load_torchvision(kind, default_root() if root is None else root, download=download)
