"""Training-time smoothing ensembles (Mode B; RAB, Weber et al. 2023): train ``M`` members, each on the
poisoned training set plus its own fixed Gaussian noise, in parallel (joblib or Dask), resumably.

An ensemble run is a run directory (``kind="ensemble"``) whose config is ``{"ensemble": spec.to_dict()}``
(:class:`EnsembleSpec`). Member ``m`` is saved as model ``member-000m`` (:func:`member_name`) with its
sha256 in the manifest, its wall time under ``timings["train/member-000m"]`` and its final loss under
``steps["train/member-000m"]``. The certification side (:mod:`certkit.ensemble`) loads the members with
:meth:`RunDirectory.load_model` and evaluates member ``m`` on ``x + member_test_noise(spec, m, shape)``.

Randomness (DESIGN.md section 8): every random stream of member ``m`` has its own seed derived from
``(spec.seed, stream tag, m)`` with :func:`certkit.seeding.derive_seed`, so a member never depends on
``n_jobs``, the backend, the order in which members finish, or on ``spec.members`` itself (member 3 of a
10-member ensemble equals member 3 of a 50-member ensemble with the same other settings):

* ``STREAM_TRAIN_NOISE``: the member's training noise, ``sigma * N(0, I)`` of the shape of the whole
  training set, drawn ONCE with a CPU :class:`torch.Generator` and added to the same inputs in every
  epoch (RAB's ``SmoothedDataset``; not redrawn per pass, not clipped). Poisoned inputs get noise too.
* ``STREAM_TEST_NOISE``: one fixed perturbation ``sigma * N(0, I)`` of one input's shape that member ``m``
  adds to every test input (RAB's ``fix_pert``; RAB seeds it from the hash of the model file and draws
  it with an unseeded torch RNG for MNIST/CIFAR, so it is not reproducible there; here it is).
* ``STREAM_MEMBER_INIT``: weight initialisation (the global torch RNG, forked) and the batch order
  (``train_model(seed=...)``; its per-batch noise stream is unused since ``noise_sigma = 0``).

Decisions (not fixed by DESIGN.md):

* **Threads.** Each member trains with ``torch.set_num_threads(spec.threads_per_member)`` (restored
  afterwards), so the floating-point reductions and hence the weights are the same whatever ``n_jobs`` or
  backend. Weight initialisation (and e.g. dropout) uses the process-global torch RNG, forked and seeded,
  so within one process members train one at a time (a lock): the ``threading`` backend and Dask workers
  with several threads stay bit-identical but gain no parallelism; use processes (``loky``, the default,
  ``multiprocessing``, Dask worker processes). Bit-identity is promised on the CPU (``device="cpu"``, the
  default); CUDA kernels need not be deterministic.
* **Data.** :func:`prepare_ensemble_data` loads the dataset with ``seed=spec.seed`` (the split of
  datasets without one), poisons ``round(poison_rate * n_train)`` non-target inputs chosen with
  ``spec.seed`` and builds the triggered non-target test set, with exactly the calls of
  :func:`certkit.experiments.prepare` (so a single-model run with the same settings sees the same data).
  Each worker process prepares the data once and caches it (two entries). The hashes of the clean
  train/test sets and of the poisoned training set are recorded in the manifest on the first call and
  checked on every resume and by every worker: a member is never trained on other data than its siblings.
* **Resume.** A member whose checkpoint is recorded, hashes correctly and loads into the model built from
  its spec is never retrained. A checkpoint that is recorded but missing, modified or unloadable is
  *corrupt*: :func:`train_ensemble` retrains it (with a :class:`RuntimeWarning`) when
  ``retrain_corrupt=True``, else raises :class:`RecordError` naming every such member before training
  anything. A checkpoint file written without its manifest entry (process killed in between) is simply
  overwritten. Changing any field of the spec (``members`` included) makes a different run: the records
  refuse to reuse the directory.
* **Dask.** ``scheduler`` is an address (``"tcp://host:port"``) or a :class:`distributed.Client`. The
  workers write the checkpoints themselves, so they must see the run directory at the same path (a
  shared filesystem; LocalCluster trivially). Connecting (and waiting for at least one worker) gives up
  after ``scheduler_timeout`` seconds with an :class:`InputError` naming the address.
* **Errors.** Bad spec values raise :class:`InputError` (unknown model/attack/noise names:
  :class:`UnknownNameError`, listing the allowed values). ``seed`` must lie in ``[0, 2**32)`` (scikit-learn
  split seeds are 32-bit).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ._validation import check_choice, check_positive_int
from .errors import CertkitError, InputError, RecordError
from .records import RunDirectory
from .seeding import STREAM_MEMBER_INIT, STREAM_TEST_NOISE, STREAM_TRAIN_NOISE, derive_seed

__all__ = [
    "NOISE_MODES",
    "RUN_KIND",
    "EnsembleData",
    "EnsembleSpec",
    "member_name",
    "member_test_noise",
    "member_train_noise",
    "prepare_ensemble_data",
    "train_ensemble",
    "train_member",
]

#: Run-directory kind of an ensemble run.
RUN_KIND = "ensemble"
#: Training-noise modes: ``"fixed"`` = RAB (one fixed N(0, sigma^2 I) draw per training input and member).
NOISE_MODES: tuple[str, ...] = ("fixed",)
_SEED_LIMIT = 2**32


# ----------------------------------------------------------------------------------------------------------
# spec


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number, got {value!r}") from exc
    if math.isnan(v):
        raise InputError(f"{name} must be a number, got NaN")
    return v


def _member_index(m: Any, members: int | None = None) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or int(m) < 0:
        raise InputError(f"member index must be a non-negative integer, got {m!r}")
    m = int(m)
    if members is not None and m >= members:
        raise InputError(f"member index {m} is out of range for an ensemble of {members} members")
    return m


@dataclass
class EnsembleSpec:
    """Everything that defines the members of a training-time smoothing ensemble (the run's config).

    Attributes:
        dataset, data_root: dataset spec and torchvision root (see :func:`certkit.data.load_dataset`).
        model: model name (:data:`certkit.models.MODELS`).
        attack, attack_params: backdoor attack (:func:`certkit.attacks.make_attack`) poisoning the
            training set; ``poison_rate`` in ``[0, 1)`` of the whole training set, relabelled to ``target``.
        members: number of members ``M`` (>= 1).
        sigma: std of the training and test noise, pixel units (> 0, finite).
        noise: training-noise mode, one of :data:`NOISE_MODES` (``"fixed"``: RAB).
        epochs, lr, batch_size: Adam training of each member.
        seed: run seed in ``[0, 2**32)``: data split, poisoned samples, and (via ``derive_seed``) every
            member's noise, initialisation and batch order.
        threads_per_member: torch intra-op threads while a member trains (numerics do not depend on
            ``n_jobs``, only on this).
    """

    dataset: str = "digits"
    data_root: str | None = None
    model: str = "digits-cnn"
    attack: str = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = 0.02
    target: int = 0
    members: int = 50
    sigma: float = 0.5
    noise: str = "fixed"
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    threads_per_member: int = 1

    def __post_init__(self) -> None:
        from .attacks import make_attack
        from .models import MODELS

        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise InputError(f"dataset must be a non-empty string, got {self.dataset!r}")
        if self.data_root is not None:
            if not isinstance(self.data_root, (str, os.PathLike)):
                raise InputError(f"data_root must be a path or None, got {type(self.data_root).__name__}")
            self.data_root = os.fspath(self.data_root)
        if not isinstance(self.model, str):
            raise InputError(f"model must be a string, got {self.model!r}")
        check_choice(self.model, MODELS, "model")
        if not isinstance(self.attack, str):
            raise InputError(f"attack must be a string, got {self.attack!r}")
        if self.attack_params is None:
            self.attack_params = {}
        if not isinstance(self.attack_params, Mapping) or not all(
            isinstance(k, str) for k in self.attack_params
        ):
            raise InputError(f"attack_params must be a dict with string keys, got {self.attack_params!r}")
        try:
            self.attack_params = json.loads(json.dumps(dict(self.attack_params), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InputError(f"attack_params must be JSON serialisable (finite numbers): {exc}") from exc
        make_attack(self.attack, **self.attack_params)  # validates the name and the parameters
        self.poison_rate = _number(self.poison_rate, "poison_rate")
        if not 0.0 <= self.poison_rate < 1.0:
            raise InputError(f"poison_rate must lie in [0, 1), got {self.poison_rate!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, np.integer)) or self.target < 0:
            raise InputError(f"target must be a non-negative integer class index, got {self.target!r}")
        self.target = int(self.target)
        self.members = check_positive_int(self.members, "members")
        self.sigma = _number(self.sigma, "sigma")
        if not math.isfinite(self.sigma) or self.sigma <= 0:
            raise InputError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if not isinstance(self.noise, str):
            raise InputError(f"noise must be a string, got {self.noise!r}")
        check_choice(self.noise, NOISE_MODES, "noise mode")
        self.epochs = check_positive_int(self.epochs, "epochs")
        self.lr = _number(self.lr, "lr")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise InputError(f"lr must be a finite number > 0, got {self.lr!r}")
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0 <= int(self.seed) < _SEED_LIMIT:
            raise InputError(f"seed must lie in [0, 2**32), got {self.seed}")
        self.seed = int(self.seed)
        self.threads_per_member = check_positive_int(self.threads_per_member, "threads_per_member")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict (the run's ``config["ensemble"]``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["attack_params"] = copy.deepcopy(self.attack_params)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EnsembleSpec:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise
        :class:`InputError` naming them."""
        if isinstance(d, EnsembleSpec):
            return d
        if not isinstance(d, Mapping):
            raise InputError(f"ensemble spec must be a dict, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in set(d) - set(known))
        if unknown:
            raise InputError(
                f"unknown ensemble spec key(s): {', '.join(unknown)}; allowed: {', '.join(known)}"
            )
        return cls(**dict(d))

    @classmethod
    def from_run(cls, run: RunDirectory | str | os.PathLike) -> EnsembleSpec:
        """The spec stored in an ensemble run directory."""
        if not isinstance(run, RunDirectory):
            run = RunDirectory.open(run)
        if run.kind != RUN_KIND or "ensemble" not in run.config:
            raise RecordError(f"run directory {run.path} holds a {run.kind!r} run, not an ensemble run")
        return cls.from_dict(run.config["ensemble"])


def _as_spec(spec: EnsembleSpec | Mapping[str, Any]) -> EnsembleSpec:
    if isinstance(spec, EnsembleSpec):
        return spec
    if isinstance(spec, Mapping):
        return EnsembleSpec.from_dict(spec)
    raise InputError(f"spec must be an EnsembleSpec or a dict, got {type(spec).__name__}")


def member_name(m: int) -> str:
    """Model name of member ``m`` in the run directory: ``member-0000``, ``member-0001``, ...
    (at least four digits; names sort in member order up to 9999)."""
    return f"member-{_member_index(m):04d}"


# ----------------------------------------------------------------------------------------------------------
# data and noise


class EnsembleData(NamedTuple):
    """The deterministic data of an ensemble run: unpacks as ``splits, attack, poisoned, triggered``.

    Attributes:
        splits: clean :class:`~certkit.data.DatasetSplits`.
        attack: the :class:`~certkit.attacks.Attack`.
        poisoned: :class:`~certkit.attacks.PoisonedDataset` (``.dataset`` is what members train on).
        triggered: :class:`~certkit.attacks.TriggeredSet` of the triggered non-target test inputs.
    """

    splits: Any
    attack: Any
    poisoned: Any
    triggered: Any

    @property
    def train(self) -> Any:
        """The poisoned training set (an :class:`~certkit.data.ArrayDataset`)."""
        return self.poisoned.dataset

    @property
    def num_classes(self) -> int:
        return self.splits.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.splits.input_shape

    @property
    def test_trigger_norms(self) -> torch.Tensor:
        """l2 norm of the trigger on every clean test input (float64 ``[n_test]``)."""
        return self.attack.trigger_norms(self.splits.test.x)


def prepare_ensemble_data(spec: EnsembleSpec | Mapping[str, Any], *, download: bool = False) -> EnsembleData:
    """Load the dataset, poison its training set and build the triggered test set (deterministic in
    ``spec.seed``; the same calls as :func:`certkit.experiments.prepare`).

    Raises :class:`InputError` when ``spec.target`` is not a class of the dataset or the poison rate
    asks for more samples than there are non-target inputs.
    """
    from .attacks import make_attack, triggered_test_set
    from .data import load_dataset

    spec = _as_spec(spec)
    splits = load_dataset(spec.dataset, root=spec.data_root, download=download, seed=spec.seed)
    if not 0 <= spec.target < splits.num_classes:
        raise InputError(
            f"target class {spec.target} is out of range for dataset {spec.dataset!r} with "
            f"{splits.num_classes} classes (use 0..{splits.num_classes - 1})"
        )
    attack = make_attack(spec.attack, **spec.attack_params)
    poisoned = attack.poison(splits.train, rate=spec.poison_rate, target=spec.target, seed=spec.seed)
    triggered = triggered_test_set(attack, splits.test, spec.target)
    return EnsembleData(splits, attack, poisoned, triggered)


def _shape(shape: Any, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise InputError(f"{name} must be a sequence of sizes, got {shape!r}") from exc
    if any(isinstance(s, bool) for s in shape) or any(s < 0 for s in out):
        raise InputError(f"{name} must hold non-negative sizes, got {tuple(shape)!r}")
    return out


def _gaussian(spec: EnsembleSpec, stream: int, m: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(spec.seed, stream, m))
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(spec.sigma)


def member_train_noise(spec: EnsembleSpec | Mapping[str, Any], m: int, shape: Sequence[int]) -> torch.Tensor:
    """Member ``m``'s fixed training noise: ``spec.sigma * N(0, I)`` of ``shape`` (the whole training set,
    ``[N, C, H, W]``), float32 on the CPU, from a generator seeded
    ``derive_seed(spec.seed, STREAM_TRAIN_NOISE, m)``. Row ``i`` is added to training input ``i`` in every
    epoch (RAB)."""
    spec = _as_spec(spec)
    return _gaussian(spec, STREAM_TRAIN_NOISE, _member_index(m), _shape(shape, "shape"))


def member_test_noise(
    spec: EnsembleSpec | Mapping[str, Any], m: int, input_shape: Sequence[int]
) -> torch.Tensor:
    """Member ``m``'s fixed test perturbation ``spec.sigma * N(0, I)`` of one input's shape ``[C, H, W]``
    (float32, CPU; generator seeded ``derive_seed(spec.seed, STREAM_TEST_NOISE, m)``), added to every test
    input that member ``m`` classifies."""
    spec = _as_spec(spec)
    shape = _shape(input_shape, "input_shape")
    if len(shape) != 3:
        raise InputError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}")
    return _gaussian(spec, STREAM_TEST_NOISE, _member_index(m), shape)


# -- per-process cache of the prepared data (workers train many members) ------------------------------------

_DATA_FIELDS = ("dataset", "data_root", "attack", "attack_params", "poison_rate", "target", "seed")
_CACHE_SIZE = 2
_cache: collections.OrderedDict[str, tuple[EnsembleData, dict[str, str]]] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _data_key(spec: EnsembleSpec) -> str:
    return json.dumps({k: getattr(spec, k) for k in _DATA_FIELDS}, sort_keys=True)


def _data_hashes(data: EnsembleData) -> dict[str, str]:
    return {
        "train": data.splits.train.sha256(),
        "test": data.splits.test.sha256(),
        "poisoned_train": data.poisoned.dataset.sha256(),
    }


def _cached_data(spec: EnsembleSpec, download: bool = False) -> tuple[EnsembleData, dict[str, str]]:
    key = _data_key(spec)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    data = prepare_ensemble_data(spec, download=download)
    entry = (data, _data_hashes(data))
    with _cache_lock:
        _cache[key] = entry
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return entry


def _check_data_hashes(run: RunDirectory, hashes: Mapping[str, str]) -> None:
    recorded = run.manifest.get("data_hashes", {})
    differ = [k for k, v in hashes.items() if k in recorded and recorded[k] != v]
    if differ:
        raise RecordError(
            f"the data of run directory {run.path} changed since its members were trained "
            f"({', '.join(differ)} hash differs); the new members would not be trained on the same data. "
            "Use a new output directory (or restore the original data)"
        )


# ----------------------------------------------------------------------------------------------------------
# one member

_member_lock = threading.Lock()


@contextlib.contextmanager
def _exclusive_training(threads: int) -> Iterator[None]:
    """Hold this process's member lock with ``torch.set_num_threads(threads)``; restore afterwards.

    Weight initialisation and the model's own randomness use the process-global torch RNG (forked and
    seeded), so two members must not train concurrently in one process: threads (joblib's ``threading``
    backend, multi-threaded Dask workers) train one member at a time; parallelism comes from processes.
    """
    with _member_lock:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(saved)


def _config(spec: EnsembleSpec) -> dict[str, Any]:
    return {"ensemble": spec.to_dict()}


def _open_run(run_dir: RunDirectory | str | os.PathLike, spec: EnsembleSpec) -> RunDirectory:
    if isinstance(run_dir, RunDirectory):
        run_dir = run_dir.path
    if not isinstance(run_dir, (str, os.PathLike)):
        raise InputError(f"run_dir must be a RunDirectory or a path, got {type(run_dir).__name__}")
    return RunDirectory.create(run_dir, _config(spec), kind=RUN_KIND)


def _checkpoint_problem(run: RunDirectory, name: str, recorded: Collection[str] | None = None) -> str | None:
    """``None`` if model ``name`` is recorded, hashes correctly and loads; ``"missing"`` if it is not
    recorded; otherwise the reason it is corrupt. ``recorded``: the recorded model names, if known."""
    if name not in (run.models() if recorded is None else recorded):
        return "missing"
    try:
        run.load_model(name, device="cpu")
    except CertkitError as exc:
        return str(exc)
    return None


def _record_of(run: RunDirectory, spec: EnsembleSpec, m: int, trained: bool) -> dict[str, Any]:
    name = member_name(m)
    manifest = run.manifest
    step = manifest["steps"].get(f"train/{name}") or {}
    return {
        "member": m,
        "name": name,
        "sha256": manifest["models"][name]["sha256"],
        "seconds": manifest["timings"].get(f"train/{name}", step.get("seconds")),
        "final_loss": step.get("final_loss"),
        "final_accuracy": step.get("final_accuracy"),
        "seed": derive_seed(spec.seed, STREAM_MEMBER_INIT, m),
        "trained": trained,
    }


def train_member(
    spec: EnsembleSpec | Mapping[str, Any],
    m: int,
    run_dir: RunDirectory | str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    download: bool = False,
) -> dict[str, Any]:
    """Train ensemble member ``m`` into ``run_dir`` (pure and idempotent) and return its record.

    If the run already holds a verified, loadable checkpoint of member ``m`` it is returned without
    training (``"trained": False``). Otherwise the model is built with weights initialised from
    ``derive_seed(spec.seed, STREAM_MEMBER_INIT, m)``, trained with :func:`certkit.training.train_model` on
    the poisoned training set plus :func:`member_train_noise` (fixed for all epochs; batch order from the
    same seed) under ``torch.set_num_threads(spec.threads_per_member)``, saved atomically as
    :func:`member_name` ``(m)`` and marked done.

    ``run_dir`` is created if missing; a run directory made with another config or kind is refused
    (:class:`RecordError`). Returns ``{"member", "name", "sha256", "seconds", "final_loss",
    "final_accuracy", "seed", "trained"}`` (plus ``"loss"``, the per-epoch losses, when trained).
    """
    from .models import build_model
    from .training import train_model

    spec = _as_spec(spec)
    m = _member_index(m, spec.members)
    run = _open_run(run_dir, spec)
    name = member_name(m)
    if _checkpoint_problem(run, name) is None:
        if not run.is_done(f"train/{name}"):  # killed between saving and marking
            run.mark_done(f"train/{name}", member=m, sha256=run.manifest["models"][name]["sha256"])
        return _record_of(run, spec, m, trained=False)
    data, hashes = _cached_data(spec, download=download)
    _check_data_hashes(run, hashes)
    seed = derive_seed(spec.seed, STREAM_MEMBER_INIT, m)
    train = data.poisoned.dataset
    with _exclusive_training(spec.threads_per_member):
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(
                spec.model,
                num_classes=data.splits.num_classes,
                input_shape=data.splits.input_shape,
                mean=data.splits.mean,
                std=data.splits.std,
            )
        noise = member_train_noise(spec, m, train.x.shape)
        history = train_model(
            model,
            train,
            epochs=spec.epochs,
            lr=spec.lr,
            batch_size=spec.batch_size,
            fixed_noise=noise,
            seed=seed,
            device=device,
            progress=progress,
            desc=name,
        )
        del noise
        seconds = time.perf_counter() - t0
    run.save_model(name, model, model.certkit_spec)
    sha = run.manifest["models"][name]["sha256"]
    run.record_timing(f"train/{name}", seconds)
    final_loss = history.loss[-1] if history.loss else None
    final_acc = history.accuracy[-1] if history.accuracy else None
    run.mark_done(
        f"train/{name}",
        member=m,
        sha256=sha,
        seed=seed,
        seconds=seconds,
        final_loss=final_loss,
        final_accuracy=final_acc,
    )
    return {
        "member": m,
        "name": name,
        "sha256": sha,
        "seconds": seconds,
        "final_loss": final_loss,
        "final_accuracy": final_acc,
        "seed": seed,
        "trained": True,
        "loss": list(history.loss),
    }


# ----------------------------------------------------------------------------------------------------------
# the ensemble


def _member_task(spec: EnsembleSpec, m: int, path: str, device: str, download: bool) -> dict[str, Any]:
    """What a joblib/Dask worker runs (module level, so it pickles by reference)."""
    return train_member(spec, m, path, device=device, progress=False, download=download)


def _check_n_jobs(n_jobs: Any) -> int:
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or int(n_jobs) == 0:
        raise InputError(f"n_jobs must be a non-zero integer (>= 1, or -1 for all cores), got {n_jobs!r}")
    return int(n_jobs)


def _check_backend(backend: Any) -> str:
    from joblib.parallel import BACKENDS

    if not isinstance(backend, str):
        raise InputError(f"backend must be a string, got {backend!r}")
    return check_choice(backend, sorted(BACKENDS), "joblib backend")


def _iter_joblib(tasks: list[tuple], n_jobs: int, backend: str) -> Iterator[dict[str, Any]]:
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=n_jobs, backend=backend, return_as="generator_unordered")
    yield from parallel(delayed(_member_task)(*t) for t in tasks)


def _device_name(device: Any) -> str:
    from .devices import DEVICE_CHOICES

    if isinstance(device, str) and device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICE_CHOICES)}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; use one of {', '.join(DEVICE_CHOICES)}")
    return str(dev)


def _check_client(scheduler: Any) -> None:
    try:
        from distributed import Client
    except ImportError:
        Client = None  # noqa: N806
    if Client is None or not isinstance(scheduler, Client):
        raise InputError(
            f"scheduler must be an address such as 'tcp://host:8786' or a distributed.Client, got {scheduler!r}"
        )


def _connect(scheduler: Any, timeout: float) -> tuple[Any, bool]:
    """A connected :class:`distributed.Client` with >= 1 worker and whether we own (must close) it."""
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - dask is a test dependency
        raise InputError(
            "scheduler= needs Dask distributed, which is not installed: pip install 'certkit[dask]'"
        ) from exc
    if isinstance(scheduler, Client):
        client, own, where = scheduler, False, getattr(scheduler.scheduler, "address", repr(scheduler))
    elif isinstance(scheduler, str) and scheduler.strip():
        where = scheduler.strip()
        try:
            client = Client(where, timeout=f"{timeout}s", set_as_default=False)
        except Exception as exc:
            raise InputError(
                f"cannot connect to the Dask scheduler at {where!r} within {timeout:g} s "
                f"({type(exc).__name__}: {exc}); is it running and reachable?"
            ) from exc
        own = True
    else:
        raise InputError(
            f"scheduler must be an address such as 'tcp://host:8786' or a distributed.Client, got {scheduler!r}"
        )
    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception as exc:
        if own:
            client.close()
        raise InputError(
            f"the Dask scheduler at {where!r} has no workers (waited {timeout:g} s); start some with "
            f"`dask worker {where}`"
        ) from exc
    return client, own


def _iter_dask(tasks: list[tuple], scheduler: Any, timeout: float) -> Iterator[dict[str, Any]]:
    from distributed import as_completed

    client, own = _connect(scheduler, timeout)
    futures: list[Any] = []
    try:
        token = os.urandom(4).hex()
        keys = [f"certkit-train-{member_name(t[1])}-{token}" for t in tasks]
        cols = list(zip(*tasks))
        futures = client.map(_member_task, *cols, key=keys, pure=False)
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        if futures:
            with contextlib.suppress(Exception):
                client.cancel(futures)
        if own:
            client.close()


def train_ensemble(
    spec: EnsembleSpec | Mapping[str, Any],
    out: str | os.PathLike,
    *,
    n_jobs: int = 1,
    backend: str = "loky",
    scheduler: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    retrain_corrupt: bool = True,
    scheduler_timeout: float = 10.0,
    download: bool = False,
) -> RunDirectory:
    """Train every member of the ensemble that ``out`` does not hold yet; return the run directory.

    Args:
        spec: the :class:`EnsembleSpec` (or its dict).
        out: run directory, created or resumed (same spec required; see :class:`RunDirectory`).
        n_jobs, backend: joblib map over the members (``Parallel(n_jobs, backend=backend,
            return_as="generator_unordered")``: each member is saved by its worker as soon as it is done).
            ``n_jobs=1`` trains in this process.
        scheduler: Dask distributed instead of joblib: an address (``"tcp://host:port"``) or a
            :class:`distributed.Client` (not closed here). The workers must see ``out`` at the same path.
        device: ``"cpu"`` (default: bit-reproducible), ``"cuda"`` or ``"auto"``, passed to
            :func:`~certkit.training.train_model`; resolved in this process for joblib (every worker uses
            the same), on each worker for Dask (a CPU-only client may drive GPU workers).
        progress: tqdm bar over the members.
        retrain_corrupt: retrain members whose checkpoint is recorded but missing, modified or unloadable
            (with a :class:`RuntimeWarning`); ``False`` raises :class:`RecordError` naming them instead.
        scheduler_timeout: seconds to connect to ``scheduler`` and to wait for its first worker before an
            :class:`InputError` naming the address.
        download: let torchvision datasets download.

    The weights do not depend on ``n_jobs``, ``backend`` or ``scheduler`` (see module docstring).
    """
    from tqdm.auto import tqdm

    from .devices import resolve_device

    spec = _as_spec(spec)
    n_jobs = _check_n_jobs(n_jobs)
    backend = _check_backend(backend)
    timeout = _number(scheduler_timeout, "scheduler_timeout")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InputError(
            f"scheduler_timeout must be a finite number of seconds > 0, got {scheduler_timeout!r}"
        )
    if scheduler is not None and not (isinstance(scheduler, str) and scheduler.strip()):
        _check_client(scheduler)
    if not isinstance(out, (str, os.PathLike)):
        raise InputError(f"out must be a path, got {type(out).__name__}")
    if scheduler is None:
        dev = str(resolve_device(device))  # fails here if CUDA is asked for but missing
    else:  # the workers may have devices this process lacks: check the name only, resolve on the worker
        dev = _device_name(device)
    # the data first: a bad target or dataset fails before anything is written
    data, hashes = _cached_data(spec, download=download)
    del data
    run = RunDirectory.create(out, _config(spec), kind=RUN_KIND)
    _check_data_hashes(run, hashes)
    recorded = run.manifest["data_hashes"]
    for key, sha in hashes.items():
        if key not in recorded:
            run.record_data_hash(key, sha)
    if "ensemble" not in run.manifest["seeds"]:
        run.record_seed("ensemble", spec.seed)
        run.record_seed(
            "streams",
            {
                "train_noise": STREAM_TRAIN_NOISE,
                "test_noise": STREAM_TEST_NOISE,
                "member_init": STREAM_MEMBER_INIT,
                "derivation": "derive_seed(seed, stream, member)",
            },
        )

    todo: list[int] = []
    corrupt: dict[str, str] = {}
    recorded = set(run.models())
    for m in range(spec.members):
        problem = _checkpoint_problem(run, member_name(m), recorded)
        if problem is None:
            continue
        todo.append(m)
        if problem != "missing":
            corrupt[member_name(m)] = problem
    if corrupt:
        listing = "; ".join(f"{n}: {why}" for n, why in corrupt.items())
        if not retrain_corrupt:
            raise RecordError(
                f"{len(corrupt)} member checkpoint(s) in {run.path} failed verification: {listing}. "
                "Pass retrain_corrupt=True to retrain them"
            )
        warnings.warn(
            f"retraining {len(corrupt)} corrupt member checkpoint(s): {listing}", RuntimeWarning, stacklevel=2
        )

    path = str(Path(run.path).resolve())
    tasks = [(spec, m, path, dev, bool(download)) for m in todo]
    t0 = time.perf_counter()
    bar = tqdm(
        total=spec.members,
        initial=spec.members - len(todo),
        desc="members",
        unit="member",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        if tasks:
            results = (
                _iter_dask(tasks, scheduler, timeout)
                if scheduler is not None
                else _iter_joblib(tasks, n_jobs, backend)
            )
            for rec in results:
                bar.update(1)
                if rec.get("final_loss") is not None:
                    bar.set_postfix(last=rec["name"], loss=f"{rec['final_loss']:.4f}")
    finally:
        bar.close()
    if tasks:
        run.record_timing("train_ensemble", time.perf_counter() - t0)
    run.reload()
    missing = [member_name(m) for m in range(spec.members) if not run.has_model(member_name(m))]
    if missing:  # pragma: no cover - a worker returned without saving
        raise CertkitError(f"members {', '.join(missing)} are missing from {run.path} after training")
    return run
