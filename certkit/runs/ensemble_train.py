"""Training-time smoothing ensembles (Mode B; RAB, Weber et al. 2023): train ``M`` members, each on the
poisoned training set plus its own fixed Gaussian noise, in parallel (joblib or Dask), resumably.

An ensemble run is a run directory (``kind="ensemble"``) whose config is ``{"ensemble": spec.to_dict()}``
(:class:`EnsembleSpec`). Member ``m`` is saved as model ``member-000m`` (:func:`member_name`) with its
sha256 in the manifest, its wall time under ``timings["train/member-000m"]`` and its final loss under
``steps["train/member-000m"]``. The certification side (:mod:`certkit.ensemble`) loads the members with
:meth:`RunDirectory.load_model` and evaluates member ``m`` on ``x + member_test_noise(spec, m, shape)``.

Randomness (docs/design.md section 8): every random stream of member ``m`` has its own seed derived from
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

Decisions (not fixed by docs/design.md):

* **Threads.** Each member trains with ``torch.set_num_threads(spec.threads_per_member)`` (restored
  afterwards), so the floating-point reductions and hence the weights are the same whatever ``n_jobs`` or
  backend. Weight initialisation (and e.g. dropout) uses the process-global torch RNG, forked and seeded,
  so within one process members train one at a time (a lock): the ``threading`` backend and Dask workers
  with several threads stay bit-identical but gain no parallelism; use processes (``loky``, the default,
  ``multiprocessing``, Dask worker processes). Bit-identity is promised on the CPU (``device="cpu"``, the
  default); CUDA kernels need not be deterministic.
* **Data.** :func:`certkit.backdoor.prepare.prepare_data` loads the dataset with ``seed=spec.seed`` (the split of
  datasets without one), poisons ``round(poison_rate * n_train)`` non-target inputs chosen with
  ``spec.seed`` and builds the triggered non-target test set, with exactly the calls of
  :func:`certkit.runs.single.prepare` (so a single-model run with the same settings sees the same data).
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

Sample-specific training noise (``noise="sample-specific"``; Cert-SSB, Qiao et al. 2025, docs/design.md section 3)
-----------------------------------------------------------------------------------------------------------------

Member ``m`` trains on ``x_j + s_j * z_{m,j}``: ``z_{m,j}`` is the member's fixed standard-normal draw (the
same ``STREAM_TRAIN_NOISE`` generator as RAB, so with every ``s_j = sigma`` the members are bit-identical to
``noise="fixed"`` members) and ``s_j`` is a per-training-sample scale shared by all members. The scales are
computed ONCE per run, before any member trains (:func:`ensure_training_scales`):

1. a *reference model* (``models/sigma-reference.pt``) is trained on the poisoned training set with fresh
   Gaussian augmentation at the base ``sigma`` (Cohen-style; weights and batch order seeded
   ``derive_seed(seed, STREAM_SIGMA_REFERENCE, 0)``, ``spec.epochs``/``lr``/``batch_size``);
2. :func:`certkit.certify.sigma.optimize_sigma` runs ``sigma_steps`` steps of stochastic gradient ascent on the DDRS
   proxy radius of every training input under that model (start ``sigma``, step ``sigma_lr``,
   ``detach_model=sigma_detach_model``, seed ``derive_seed(seed, STREAM_SIGMA_TRAIN, 0)``); the result is
   clipped to ``sigma_max`` when given;
3. the scales are written to ``training_sigmas.npz`` (``sigma`` float64 ``[N_train]`` and a JSON ``meta``:
   poisoned-train hash, reference-model hash, SGA settings) with their sha256 in the manifest, and the step
   ``training_sigmas`` is marked done. Every later member (this process, a joblib or Dask worker, a resumed
   run) reads and verifies that file; it is never recomputed once recorded.

Deliberate differences from Cert-SSB (whose training code is unreleased; its pipeline figure and
``utils.train_model`` update ``sigma_j`` in every batch of every epoch, redraw the noise each pass, and use a
different scale history per model): here the scales are FIXED before training and identical for all
members, and each member's draw ``z_{m,j}`` is fixed for all epochs (RAB). Only then is the training noise of
every member one sample of a single, fixed distribution ``prod_j N(0, s_j^2 I)``, which the Gaussian
certificate needs. The scales are still chosen from the (possibly poisoned) training data, so the
certificate holds *conditional on the scales as fixed* (docs/design.md section 3 caveat;
:data:`SAMPLE_SPECIFIC_ASSUMPTION`); a reported training-side certificate must state this.

Tamper policy: a recorded ``training_sigmas.npz`` or reference model that is missing, modified or
inconsistent with the run raises :class:`RecordError` (``train_ensemble`` does not retrain or recompute
them, even with ``retrain_corrupt=True``): members already trained used those exact scales, and recomputing
(e.g. on another device, where floating point differs) could silently mix members trained under different
smoothing distributions. Start a new run directory instead. A file written but not yet recorded (process
killed in between) is simply recomputed and overwritten. Concurrent callers (several workers calling
:func:`train_member` directly) serialise on a lock file ``.training_sigmas.lock`` (POSIX ``flock``).

Spec fields of this mode: ``sigma_steps`` (required, >= 1; Cert-SSB's released test sigmas imply 850 to 1100
steps at ``lr = 1e-4``), ``sigma_lr`` (default ``1e-4``), ``sigma_max`` (optional cap, >= ``sigma``),
``sigma_detach_model`` (default ``True``: the released Cert-SSB form; ``False``: DDRS, gradient through the
model). With ``noise="fixed"`` they must keep their defaults and are left out of :meth:`EnsembleSpec.to_dict`,
so fixed-noise run configs are unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from certkit._validation import (
    check_choice,
    check_float,
    check_number,
    check_positive_array,
    check_positive_int,
)
from certkit.backdoor.models import MODELS, build_model
from certkit.backdoor.prepare import DATA_FIELDS, PreparedData, check_data_fields, prepare_data
from certkit.backdoor.training import train_model
from certkit.certify.aggregation import Layout
from certkit.certify.ensemble import SmoothedEnsemble
from certkit.certify.patch import KINDS as ABLATION_KINDS
from certkit.certify.patch import ablation_input_channels, ablation_train_transform
from certkit.certify.sigma import optimize_sigma
from certkit.devices import check_device_name, resolve_device
from certkit.errors import CertkitError, InputError, RecordError
from certkit.io import file_lock
from certkit.parallel import check_backend, check_n_jobs, check_scheduler, map_tasks
from certkit.progress import batches
from certkit.runs.budget import announce, seconds_per_input
from certkit.runs.defaults import ENSEMBLE
from certkit.runs.layouts import LAYOUT_FILE, LAYOUTS, MemberLayout, member_layout
from certkit.runs.models import build_ablated_model, load_run_model
from certkit.runs.rundir import RunDirectory
from certkit.seeding import (
    STREAM_ABLATION,
    STREAM_LAYOUT,
    STREAM_MEMBER_INIT,
    STREAM_SIGMA_REFERENCE,
    STREAM_SIGMA_TEST,
    STREAM_SIGMA_TRAIN,
    STREAM_TEST_NOISE,
    STREAM_TRAIN_NOISE,
    derive_seed,
)

__all__ = [
    "announce_member_passes",
    "ensemble_layout",
    "load_ensemble",
    "read_layout",
    "record_layout",
    "NOISE_MODES",
    "REFERENCE_MODEL",
    "RUN_KIND",
    "SAMPLE_SPECIFIC_ASSUMPTION",
    "TRAINING_SIGMAS",
    "EnsembleSpec",
    "ensure_training_scales",
    "load_training_scales",
    "member_name",
    "member_test_noise",
    "member_train_noise",
    "check_scales",
    "optimize_sample_sigmas",
    "train_ensemble",
    "train_member",
]

#: Run-directory kind of an ensemble run.
RUN_KIND = "ensemble"
#: Training-noise modes: ``"fixed"`` = RAB (one fixed N(0, sigma^2 I) draw per training input and member);
#: ``"sample-specific"`` = Cert-SSB-style per-training-sample scales ``s_j``, fixed per run (module docstring).
NOISE_MODES: tuple[str, ...] = ("fixed", "sample-specific")
#: Model name of the reference model the sample-specific scales are optimised with.
REFERENCE_MODEL = "sigma-reference"
#: Run-directory file holding the training scales ``s_j`` of a sample-specific run.
TRAINING_SIGMAS = "training_sigmas.npz"
#: The caveat that goes with every training-side certificate of a sample-specific run (docs/design.md section 3).
SAMPLE_SPECIFIC_ASSUMPTION = (
    "sample-specific noise: member m trains on x_j + s_j * z_mj (z_mj a fixed N(0, I) draw per member) and "
    "evaluates test query i at x_i + sigma_i * z_m; the training scales s_j were chosen by gradient ascent on "
    "the (possibly poisoned) training data, so every guarantee against training-set perturbations holds only "
    "conditional on these scales as fixed and is reported in *_conditional_on_scales columns, never as "
    "certified accuracy or CTR; the test scales sigma_i are chosen on each query itself (deployable). "
    "radius = sigma_i * gap / 2 (test-sigma units, Cert-SSB convention: a test-input perturbation with the "
    "deployed members fixed; storage-update certificates, transductive); joint l2 radius = "
    "min(min_j s_j, sigma_i) * gap / 2; a concrete attack is covered when "
    "sum_j ||Delta_j||^2 / s_j^2 + ||t_i||^2 / sigma_i^2 < (gap / 2)^2 (conditional on the scales)"
)
_SEED_LIMIT = 2**32
_SCALES_FORMAT = 1
#: Stream tags of the sample-specific scales (apart from certkit.seeding's tags; the seeds derived with them
#: are the ``seed`` handed to :func:`certkit.certify.sigma.optimize_sigma`, which derives its own per-input streams).
_SIGMA_DEFAULTS = {"sigma_steps": None, "sigma_lr": 1e-4, "sigma_max": None, "sigma_detach_model": True}
_LAYOUT_DEFAULTS = {"layout": "full-noise", "k": None, "d": None, "ablation": None, "band": None, "versions": None}


# ----------------------------------------------------------------------------------------------------------
# spec


_number = check_number


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
        dataset, data_root: dataset spec and torchvision root (see :func:`certkit.backdoor.data.load_dataset`).
        model: model name (:data:`certkit.backdoor.models.MODELS`).
        attack, attack_params: backdoor attack (:func:`certkit.backdoor.attacks.make_attack`) poisoning the
            training set; ``poison_rate`` in ``[0, 1)`` of the whole training set, relabelled to ``target``.
        members: number of members ``M`` (>= 1).
        sigma: std of the training and test noise, pixel units (> 0, finite). With
            ``noise="sample-specific"`` the base sigma: the SGA of the scales starts there and
            :func:`member_test_noise` stays ``sigma * z_m`` (rescaled per test point at certification).
        noise: training-noise mode, one of :data:`NOISE_MODES` (``"fixed"``: RAB; ``"sample-specific"``:
            per-sample training scales fixed per run, see the module docstring).
        epochs, lr, batch_size: Adam training of each member.
        seed: run seed in ``[0, 2**32)``: data split, poisoned samples, and (via ``derive_seed``) every
            member's noise, initialisation and batch order.
        threads_per_member: torch intra-op threads while a member trains (numerics do not depend on
            ``n_jobs``, only on this).
        sigma_steps, sigma_lr, sigma_max, sigma_detach_model: ``noise="sample-specific"`` only: SGA steps
            (required, >= 1), step size (> 0, default ``1e-4``), optional cap on the optimised scales
            (>= ``sigma``) and whether the model output is detached in the ascent (default ``True``,
            Cert-SSB's released form). See the module docstring.
        layout: which samples each member sees (:data:`certkit.runs.layouts.LAYOUTS`): ``"full-noise"``
            (RAB, the default: the whole training set plus noise) or an aggregation layout (Mode D) whose
            members train *without noise* on a piece of the data: ``"partition"`` (DPA, ``k`` members),
            ``"finite-aggregation"`` (FA, ``k * d`` members) or ``"bootstrap"`` (bagging: ``members`` draws of
            ``k`` samples). ``sigma`` and ``noise`` apply to ``full-noise`` only.
        k, d: the layout's ``k`` (partitions; FA's ``k``; bagging's bootstrap size) and FA's ``d``.
        ablation, band: aggregation layouts only: train every member as a de-randomized smoothing model
            (``"column"`` or ``"block"`` ablation of width ``band``), as the joint certificate needs.
        versions: partition layout only: seeded versions per partition (DPA*, ``k * versions`` members whose
            logits are averaged per partition when certified); ``None`` = 1.

    With ``layout="full-noise"`` the fields ``layout, k, d, ablation, band`` keep their defaults and are left
    out of :meth:`to_dict` (configs of earlier certkit versions are unchanged); with an aggregation layout,
    ``sigma`` and ``noise`` are left out and ``members`` defaults to ``k`` (``k * d``; bagging: 50 draws).
    """

    dataset: str = "digits"
    data_root: str | None = None
    model: str = ENSEMBLE["model"]
    attack: str = "badnets"
    attack_params: dict[str, Any] = field(default_factory=dict)
    poison_rate: float = ENSEMBLE["poison_rate"]
    target: int = 0
    members: int | None = None
    sigma: float = ENSEMBLE["sigma"]
    noise: str = ENSEMBLE["noise"]
    epochs: int = ENSEMBLE["epochs"]
    lr: float = ENSEMBLE["lr"]
    batch_size: int = ENSEMBLE["batch_size"]
    seed: int = 0
    threads_per_member: int = 1
    sigma_steps: int | None = None
    sigma_lr: float = ENSEMBLE["sigma_lr"]
    sigma_max: float | None = None
    sigma_detach_model: bool = True
    layout: str = "full-noise"
    k: int | None = None
    d: int | None = None
    ablation: str | None = None
    band: int | None = None
    versions: int | None = None

    def __post_init__(self) -> None:

        for k, v in check_data_fields(**{k: getattr(self, k) for k in DATA_FIELDS}).items():
            setattr(self, k, v)
        if not isinstance(self.model, str):
            raise InputError(f"model must be a string, got {self.model!r}")
        check_choice(self.model, MODELS, "model")
        self.sigma = check_float(self.sigma, "sigma", strict=True)
        if not isinstance(self.noise, str):
            raise InputError(f"noise must be a string, got {self.noise!r}")
        check_choice(self.noise, NOISE_MODES, "noise mode")
        self.epochs = check_positive_int(self.epochs, "epochs")
        self.lr = check_float(self.lr, "lr", strict=True)
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        self.threads_per_member = check_positive_int(self.threads_per_member, "threads_per_member")
        self._check_sigma_fields()
        self._check_layout_fields()

    def _check_layout_fields(self) -> None:
        if self.versions is not None:  # 1 (the default) is accepted with every layout
            self.versions = check_positive_int(self.versions, "versions")
            self.versions = None if self.versions == 1 else self.versions
        if not isinstance(self.layout, str):
            raise InputError(f"layout must be a string, got {self.layout!r}")
        check_choice(self.layout, LAYOUTS, "layout")
        if self.versions is not None and self.layout != "partition":
            raise InputError(f"versions (DPA*) apply to the partition layout only; this spec has "
                             f"layout={self.layout!r}")
        if self.layout == "full-noise":
            changed = [k for k, v in _LAYOUT_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                raise InputError(f"{', '.join(changed)} only apply to the aggregation layouts (partition, "
                                 "finite-aggregation, bootstrap); this spec has layout='full-noise'")
            self.members = check_positive_int(ENSEMBLE["members"] if self.members is None else self.members,
                                              "members")
            return
        if self.noise != "fixed" or self.sigma != ENSEMBLE["sigma"]:
            raise InputError(f"sigma and noise apply to the full-noise (RAB) layout only; the {self.layout} "
                             "layout trains its members on its piece of the data without noise")
        if self.k is None:
            what = "bootstrap sample size" if self.layout == "bootstrap" else "number of partitions"
            raise InputError(f"the {self.layout} layout needs k (the {what}, >= 2)")
        self.k = check_positive_int(self.k, "k", minimum=2)
        if self.layout == "finite-aggregation":
            if self.d is None:
                raise InputError("the finite-aggregation layout needs d (subsets per sample, >= 1)")
            self.d = check_positive_int(self.d, "d")
        elif self.d is not None:
            raise InputError(f"d applies to the finite-aggregation layout only (this spec has layout={self.layout!r})")
        if self.versions is not None:
            if self.ablation is not None:
                raise InputError("versions (DPA*) and ablation (the joint certificate) cannot be combined: the joint "
                                 "certificate needs one member per partition")
        want = {"partition": self.k * (self.versions or 1), "finite-aggregation": self.k * (self.d or 1)}.get(self.layout)
        if want is None:  # bootstrap: the number of draws
            self.members = check_positive_int(ENSEMBLE["members"] if self.members is None else self.members,
                                              "members")
        elif self.members is None:
            self.members = want
        elif check_positive_int(self.members, "members") != want:
            raise InputError(f"the {self.layout} layout has {want} members (one per subset"
                             + (f", {self.versions} versions each" if self.versions else "") + f"), got members={self.members}")
        if self.ablation is None:
            if self.band is not None:
                raise InputError("band applies only with an ablation (column or block)")
            return
        if not isinstance(self.ablation, str):
            raise InputError(f"ablation must be a string, got {self.ablation!r}")
        check_choice(self.ablation, ABLATION_KINDS, "ablation")
        if self.band is None:
            raise InputError(f"ablation={self.ablation!r} needs band (the width kept, >= 1)")
        self.band = check_positive_int(self.band, "band")

    def _check_sigma_fields(self) -> None:
        self.sigma_lr = _number(self.sigma_lr, "sigma_lr")
        if not math.isfinite(self.sigma_lr) or self.sigma_lr <= 0:
            raise InputError(f"sigma_lr must be a finite number > 0, got {self.sigma_lr!r}")
        if self.sigma_max is not None:
            self.sigma_max = _number(self.sigma_max, "sigma_max")
            if not math.isfinite(self.sigma_max) or self.sigma_max < self.sigma:
                raise InputError(
                    f"sigma_max must be a finite number >= sigma ({self.sigma:g}) or None, got {self.sigma_max!r}"
                )
        if not isinstance(self.sigma_detach_model, (bool, np.bool_)):
            raise InputError(f"sigma_detach_model must be True or False, got {self.sigma_detach_model!r}")
        self.sigma_detach_model = bool(self.sigma_detach_model)
        if self.noise == "fixed":
            changed = [k for k, v in _SIGMA_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                raise InputError(
                    f"{', '.join(changed)} only apply to noise='sample-specific' (this spec has noise='fixed')"
                )
            return
        if self.sigma_steps is None:
            raise InputError(
                "noise='sample-specific' needs sigma_steps, the number of SGA steps per sample (>= 1; Cert-SSB's "
                "released sigmas imply 850 to 1100 at sigma_lr=1e-4); noise='fixed' (RAB) needs none"
            )
        self.sigma_steps = check_positive_int(self.sigma_steps, "sigma_steps")

    @property
    def sample_specific(self) -> bool:
        """Whether the members train with per-sample scales (``noise == "sample-specific"``)."""
        return self.noise == "sample-specific"

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-serialisable dict (the run's ``config["ensemble"]``). With ``noise="fixed"`` the
        ``sigma_*`` fields (all at their defaults) are left out, so such configs are those of earlier certkit
        versions."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["attack_params"] = copy.deepcopy(self.attack_params)
        if not self.sample_specific:
            for k in _SIGMA_DEFAULTS:
                del d[k]
        if self.layout == "full-noise":
            for k in _LAYOUT_DEFAULTS:
                del d[k]
        else:
            del d["sigma"], d["noise"]
            if self.versions is None:  # aggregation configs without DPA* versions stay as they were
                del d["versions"]
        return d

    @property
    def aggregation(self) -> bool:
        """Whether the members follow an aggregation layout (Mode D) rather than RAB's full noise."""
        return self.layout != "full-noise"

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


def _seeded_model(spec: EnsembleSpec, data: PreparedData, seed: int) -> torch.nn.Module:
    """A fresh ``spec.model`` for ``data`` whose initial weights depend on ``seed`` only (global RNG untouched)."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.ablation is not None:
            return build_ablated_model(spec.model, data, spec.ablation, spec.band)
        return build_model(spec.model, num_classes=data.splits.num_classes, input_shape=data.splits.input_shape,
                           mean=data.splits.mean, std=data.splits.std)


def member_name(m: int) -> str:
    """Model name of member ``m`` in the run directory: ``member-0000``, ``member-0001``, ...
    (at least four digits; names sort in member order up to 9999)."""
    return f"member-{_member_index(m):04d}"


# ----------------------------------------------------------------------------------------------------------
# data and noise


def _shape(shape: Any, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as exc:
        raise InputError(f"{name} must be a sequence of sizes, got {shape!r}") from exc
    if any(isinstance(s, bool) for s in shape) or any(s < 0 for s in out):
        raise InputError(f"{name} must hold non-negative sizes, got {tuple(shape)!r}")
    return out


def _unit_gaussian(spec: EnsembleSpec, stream: int, m: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(spec.seed, stream, m))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _gaussian(spec: EnsembleSpec, stream: int, m: int, shape: tuple[int, ...]) -> torch.Tensor:
    return _unit_gaussian(spec, stream, m, shape).mul_(spec.sigma)


def check_scales(scales: Any, n: int | None = None, name: str = "scales") -> np.ndarray:
    """Per-sample noise scales as a float64 array ``[n]``: 1-D, finite and > 0 (InputError otherwise)."""
    return check_positive_array(scales, name, n)


def member_train_noise(
    spec: EnsembleSpec | Mapping[str, Any], m: int, shape: Sequence[int], *, scales: Any = None
) -> torch.Tensor:
    """Member ``m``'s fixed training noise of ``shape`` (the whole training set, ``[N, C, H, W]``), float32 on
    the CPU: ``z * spec.sigma`` (RAB), or ``z * scales[j]`` on row ``j`` when the per-sample ``scales``
    (``[N]``, finite, > 0; sample-specific noise) are given, where ``z ~ N(0, I)`` comes from a generator
    seeded ``derive_seed(spec.seed, STREAM_TRAIN_NOISE, m)``: the same draw in both modes, so scales all
    equal to ``spec.sigma`` give exactly the RAB noise. Row ``j`` is added to training input ``j`` in every
    epoch."""
    spec = _as_spec(spec)
    shape = _shape(shape, "shape")
    if scales is None:
        return _gaussian(spec, STREAM_TRAIN_NOISE, _member_index(m), shape)
    if not shape:
        raise InputError("shape must start with the number of training inputs when scales are given")
    s = check_scales(scales, shape[0], "scales")
    z = _unit_gaussian(spec, STREAM_TRAIN_NOISE, _member_index(m), shape)
    return z.mul_(torch.from_numpy(s).to(torch.float32).view(-1, *([1] * (len(shape) - 1))))


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


def _cached_data(spec: EnsembleSpec, download: bool = False) -> tuple[PreparedData, dict[str, str]]:
    """The run's data (:func:`certkit.backdoor.prepare.prepare_data`, cached per process) and its hashes."""
    data = prepare_data(spec, download=download)
    return data, data.data_hashes


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
        load_run_model(run, name, device="cpu")
    except CertkitError as exc:
        return str(exc)
    return None


#: the last two member layouts computed in this process, with the training set object they were computed on
_LAYOUT_CACHE: list[tuple[Any, tuple[Any, ...], MemberLayout]] = []


def ensemble_layout(spec: EnsembleSpec, data: PreparedData) -> MemberLayout:
    """The member layout of an aggregation spec on its (poisoned) training set
    (:func:`certkit.runs.layouts.member_layout`). Computed once per process and training set (the data of a run
    is cached per process, so every member a worker trains reuses it: the hash and content sort of the whole
    training set took ~0.1 s a member at 60k samples)."""
    if not spec.aggregation:
        raise InputError("a full-noise (RAB) ensemble has no aggregation layout: every member sees all the data")
    train = data.poisoned.dataset
    key = (spec.layout, spec.k, spec.d, spec.members, spec.seed, spec.versions)
    for cached_train, cached_key, lay in _LAYOUT_CACHE:
        if cached_train is train and cached_key == key:
            return lay
    lay = member_layout(spec.layout, train, k=spec.k, d=spec.d, members=spec.members, seed=spec.seed,
                        versions=spec.versions)
    _LAYOUT_CACHE[:] = [*_LAYOUT_CACHE[-1:], (train, key, lay)]
    return lay


def record_layout(run: RunDirectory, spec: EnsembleSpec, data: PreparedData) -> MemberLayout:
    """Write ``layout.json`` on the first call; later calls check the stored record against the spec's layout
    (a :class:`RecordError` names the difference)."""
    lay = ensemble_layout(spec, data)
    rec = lay.record()
    if LAYOUT_FILE in run.manifest["files"]:
        old = run.read_json(LAYOUT_FILE)
        if old != json.loads(json.dumps(rec)):
            raise RecordError(f"{run.path / LAYOUT_FILE} does not match the layout of this spec and data; start a "
                              "new run directory")
        return lay
    run.write_json(LAYOUT_FILE, rec)
    run.mark_done("layout", kind=spec.layout, members=spec.members, sha256=run.manifest["files"][LAYOUT_FILE]["sha256"])
    return lay


def read_layout(run: RunDirectory) -> Layout:
    """The :class:`~certkit.certify.aggregation.Layout` recorded in an ensemble run (hash-checked);
    ``Layout("full-noise")`` for RAB runs."""
    spec = EnsembleSpec.from_run(run)
    if not spec.aggregation:
        return Layout("full-noise", member_subset=None)
    if LAYOUT_FILE not in run.manifest["files"]:
        raise RecordError(f"ensemble run {run.path} has no {LAYOUT_FILE}; train it with `certkit ensemble train`")
    return Layout.from_dict(run.read_json(LAYOUT_FILE)["layout"])


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


# ----------------------------------------------------------------------------------------------------------
# sample-specific scales (noise="sample-specific")




def optimize_sample_sigmas(
    spec: EnsembleSpec | Mapping[str, Any],
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    seed: int,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Per-sample sigmas of the inputs ``x`` (``[N, C, H, W]``) under ``model``: ``spec.sigma_steps`` steps of
    :func:`certkit.certify.sigma.optimize_sigma` (start ``spec.sigma``, step ``spec.sigma_lr``,
    ``detach_model=spec.sigma_detach_model``, the given ``seed``; ``sigma_max=spec.sigma_max``, ``device``
    and ``progress=False`` where the optimiser accepts them), clipped to ``spec.sigma_max`` when set. Input
    ``i`` is optimised as id ``i`` (its position), so its sigma depends on neither the batch nor the other
    inputs (with :mod:`certkit.certify.sigma`'s per-id noise streams).

    Returns float64 ``[N]``, finite and > 0 (a :class:`CertkitError` if the optimiser returns anything else).
    Used for the training scales (:func:`ensure_training_scales`) and the test scales
    (:func:`certkit.runs.ensemble_certify.certify_ensemble_run`) of a sample-specific run.
    """
    spec = _as_spec(spec)
    if not spec.sample_specific:
        raise InputError("per-sample sigmas need a spec with noise='sample-specific'")
    kwargs: dict[str, Any] = dict(base_sigma=spec.sigma, steps=spec.sigma_steps, lr=spec.sigma_lr,
                                  detach_model=spec.sigma_detach_model, seed=int(seed), device=device,
                                  progress=False, sigma_max=spec.sigma_max)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) & ((1 << 63) - 1))
            out = optimize_sigma(model, x, **kwargs)
    finally:
        model.train(was_training)
    try:
        sig = check_scales(out.sigma, int(x.shape[0]), "optimize_sigma(...).sigma")
    except InputError as exc:
        raise CertkitError(f"the sigma optimiser returned unusable sigmas: {exc}") from exc
    if spec.sigma_max is not None:
        sig = np.minimum(sig, spec.sigma_max)
    return sig.astype(np.float64, copy=True)


def _scales_meta(spec: EnsembleSpec, poisoned_sha: str, reference_sha: str) -> dict[str, Any]:
    return {
        "format": _SCALES_FORMAT,
        "poisoned_train_sha256": poisoned_sha,
        "reference_sha256": reference_sha,
        "base_sigma": spec.sigma,
        "steps": spec.sigma_steps,
        "lr": spec.sigma_lr,
        "sigma_max": spec.sigma_max,
        "detach_model": spec.sigma_detach_model,
        "seed": derive_seed(spec.seed, STREAM_SIGMA_TRAIN, 0),
    }


def _read_scales(run: RunDirectory, n: int | None, expect: Mapping[str, Any] | None) -> np.ndarray:
    """The recorded training scales, verified (RecordError if missing, modified or inconsistent)."""
    import io
    import zipfile

    data = run.read_bytes(TRAINING_SIGMAS)  # RecordError on a missing or modified file
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            sig = np.array(z["sigma"], dtype=np.float64)
            meta = json.loads(str(z["meta"]))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise RecordError(f"{TRAINING_SIGMAS} in {run.path} is corrupt: {exc}") from exc
    try:
        sig = check_scales(sig, n, "training scales")
    except InputError as exc:
        raise RecordError(f"{TRAINING_SIGMAS} in {run.path} is inconsistent with the run: {exc}") from exc
    if expect is not None:
        differ = sorted(k for k, v in expect.items() if meta.get(k) != v)
        if differ:
            raise RecordError(
                f"{TRAINING_SIGMAS} in {run.path} was not computed for this run ({', '.join(differ)} differ); "
                "the members were trained with other scales: use a new run directory"
            )
    return sig


def load_training_scales(run_dir: RunDirectory | str | os.PathLike) -> np.ndarray:
    """The training scales ``s_j`` (float64 ``[N_train]``) of a sample-specific run, verified against the
    manifest hash, the run's poisoned training set hash and the reference model (:class:`RecordError` if
    they are missing, modified or inconsistent)."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    spec = EnsembleSpec.from_run(run)
    if not spec.sample_specific:
        raise InputError(f"run {run.path} uses noise={spec.noise!r}: it has no per-sample training scales")
    if TRAINING_SIGMAS not in run.manifest["files"]:
        raise RecordError(
            f"run {run.path} has no training scales yet; train the ensemble (`certkit.train_ensemble`) first"
        )
    return _read_scales(run, None, _expected_scales_meta(run, spec))


def _expected_scales_meta(run: RunDirectory, spec: EnsembleSpec) -> dict[str, Any]:
    ref = run.manifest["models"].get(REFERENCE_MODEL, {}).get("sha256")
    poisoned = run.manifest["data_hashes"].get("poisoned_train")
    expect = _scales_meta(spec, poisoned or "", ref or "")
    if poisoned is None:
        del expect["poisoned_train_sha256"]
    if ref is None:
        del expect["reference_sha256"]
    return expect


def _reference_model(
    run: RunDirectory, spec: EnsembleSpec, data: PreparedData, device: str | torch.device, progress: bool
) -> torch.nn.Module:
    """Load (verified) or train the run's reference model (Gaussian augmentation at the base sigma)."""

    if REFERENCE_MODEL in run.models():
        try:
            return run.load_model(REFERENCE_MODEL, device="cpu")
        except CertkitError as exc:
            raise RecordError(
                f"the reference model of run {run.path} (used to choose the sample-specific sigmas) failed "
                f"verification: {exc}. Its scales may already have been used: use a new run directory"
            ) from exc
    seed = derive_seed(spec.seed, STREAM_SIGMA_REFERENCE, 0)
    t0 = time.perf_counter()
    model = _seeded_model(spec, data, seed)
    history = train_model(
        model,
        data.poisoned.dataset,
        epochs=spec.epochs,
        lr=spec.lr,
        batch_size=spec.batch_size,
        noise_sigma=spec.sigma,
        seed=seed,
        device=device,
        progress=progress,
        desc=REFERENCE_MODEL,
    )
    seconds = time.perf_counter() - t0
    run.save_model(REFERENCE_MODEL, model, model.certkit_spec)
    run.record_timing(f"train/{REFERENCE_MODEL}", seconds)
    run.mark_done(
        f"train/{REFERENCE_MODEL}",
        seed=seed,
        seconds=seconds,
        noise_sigma=spec.sigma,
        final_loss=history.loss[-1] if history.loss else None,
        sha256=run.manifest["models"][REFERENCE_MODEL]["sha256"],
    )
    return model


def ensure_training_scales(
    spec: EnsembleSpec | Mapping[str, Any],
    run_dir: RunDirectory | str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    download: bool = False,
) -> np.ndarray:
    """The training scales ``s_j`` (float64 ``[N_train]``) of a sample-specific run: read and verified from
    ``training_sigmas.npz`` when recorded, otherwise computed once (reference model, then SGA; see the module
    docstring) and recorded. Called by :func:`train_ensemble` before any member trains and by
    :func:`train_member`. Raises :class:`RecordError` if recorded scales or the reference model fail
    verification (never recomputed), :class:`InputError` for a fixed-noise spec."""

    spec = _as_spec(spec)
    if not spec.sample_specific:
        raise InputError("training scales exist only for noise='sample-specific' runs")
    run = _open_run(run_dir, spec)
    data, hashes = _cached_data(spec, download=download)
    _check_data_hashes(run, hashes)
    n = len(data.poisoned.dataset)
    with file_lock(run.path / ".training_sigmas.lock"):
        run.reload()
        if TRAINING_SIGMAS in run.manifest["files"]:
            expect = _expected_scales_meta(run, spec)
            expect["poisoned_train_sha256"] = hashes["poisoned_train"]
            return _read_scales(run, n, expect)
        dev = resolve_device(device)
        t0 = time.perf_counter()
        with _exclusive_training(spec.threads_per_member):
            model = _reference_model(run, spec, data, dev, progress)
            sig = optimize_sample_sigmas(
                spec,
                model,
                data.poisoned.dataset.x,
                seed=derive_seed(spec.seed, STREAM_SIGMA_TRAIN, 0),
                device=dev,
            )
        ref_sha = run.manifest["models"][REFERENCE_MODEL]["sha256"]
        meta = _scales_meta(spec, hashes["poisoned_train"], ref_sha)
        buf = io.BytesIO()
        np.savez_compressed(buf, format=np.array(_SCALES_FORMAT), sigma=sig, meta=np.array(json.dumps(meta)))
        run.write_bytes(TRAINING_SIGMAS, buf.getvalue())
        seconds = time.perf_counter() - t0
        run.record_timing("training_sigmas", seconds)
        run.mark_done(
            "training_sigmas",
            sha256=run.manifest["files"][TRAINING_SIGMAS]["sha256"],
            n=n,
            min=float(sig.min()),
            median=float(np.median(sig)),
            max=float(sig.max()),
            seconds=seconds,
        )
        return sig


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
    ``derive_seed(spec.seed, STREAM_MEMBER_INIT, m)``, trained with :func:`certkit.backdoor.training.train_model` on
    the poisoned training set plus :func:`member_train_noise` (fixed for all epochs; batch order from the
    same seed; with ``noise="sample-specific"`` row ``j`` scaled by the run's training scale ``s_j`` from
    :func:`ensure_training_scales`, computed first if the run has none yet) under ``torch.set_num_threads(spec.threads_per_member)``, saved atomically as
    :func:`member_name` ``(m)`` and marked done.

    ``run_dir`` is created if missing; a run directory made with another config or kind is refused
    (:class:`RecordError`). Returns ``{"member", "name", "sha256", "seconds", "final_loss",
    "final_accuracy", "seed", "trained"}`` (plus ``"loss"``, the per-epoch losses, when trained).
    """

    spec = _as_spec(spec)
    m = _member_index(m, spec.members)
    run = _open_run(run_dir, spec)
    name = member_name(m)
    if _checkpoint_problem(run, name) is None:
        if not run.is_done(f"train/{name}"):  # saved by an older certkit that was killed before marking it
            run.mark_done(f"train/{name}", member=m, sha256=run.manifest["models"][name]["sha256"],
                          seed=derive_seed(spec.seed, STREAM_MEMBER_INIT, m), seconds=None, recovered=True)
        return _record_of(run, spec, m, trained=False)
    data, hashes = _cached_data(spec, download=download)
    _check_data_hashes(run, hashes)
    # one code path for both modes: RAB scales every row by sigma, sample-specific by the run's s_j
    scales = (
        ensure_training_scales(spec, run, device=device, progress=progress, download=download)
        if spec.sample_specific
        else None
    )
    seed = derive_seed(spec.seed, STREAM_MEMBER_INIT, m)
    train = data.poisoned.dataset
    extra: dict[str, Any] = {}
    if spec.aggregation:  # the member's piece of the data, no noise
        train = train.subset(ensemble_layout(spec, data).indices[m])
        extra["samples"] = len(train)
    transform = (ablation_train_transform(spec.ablation, spec.band, derive_seed(spec.seed, STREAM_ABLATION, m))
                 if spec.ablation is not None else None)
    with _exclusive_training(spec.threads_per_member):
        t0 = time.perf_counter()
        model = _seeded_model(spec, data, seed)
        noise = None if spec.aggregation else member_train_noise(spec, m, train.x.shape, scales=scales)
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
            input_transform=transform,
        )
        del noise
        seconds = time.perf_counter() - t0
    final_loss = history.loss[-1] if history.loss else None
    final_acc = history.accuracy[-1] if history.accuracy else None
    run.save_model(name, model, model.certkit_spec, step=f"train/{name}", seconds=seconds, member=m, seed=seed,
                   final_loss=final_loss, final_accuracy=final_acc, **extra)
    sha = run.manifest["models"][name]["sha256"]
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


def _announce_members(spec: EnsembleSpec, todo: Sequence[int], device: str | None, workers: int, download: bool,
                      log: Any) -> None:
    """The budget line of :func:`train_ensemble`: epochs x batches of each member still to train, timed on one
    training step of a fresh member (no estimate for a Dask cluster: ``device`` None)."""
    data, _ = _cached_data(spec, download=download)
    sizes = ([len(ensemble_layout(spec, data).indices[m]) for m in todo] if spec.aggregation
             else [len(data.poisoned.dataset)] * len(todo))
    per_member = [batches(n, spec.batch_size) for n in sizes]
    per = None
    if device is not None:
        c, h, w = data.splits.input_shape
        shape = (ablation_input_channels(c), h, w) if spec.ablation is not None else (c, h, w)
        per = seconds_per_input(_seeded_model(spec, data, spec.seed), shape, batch=spec.batch_size, device=device,
                                backward=True)
    mean = sum(per_member) / len(per_member)
    announce(log, "ensemble train", spec.epochs * sum(per_member), "training steps",
             detail=f"{len(todo)} member(s) x {spec.epochs} epochs x "
             f"{'' if len(set(per_member)) == 1 else '~'}{mean:.0f} batches of {spec.batch_size}",
             seconds_per_unit=None if per is None else per * spec.batch_size, device=device, workers=workers)


def announce_member_passes(run: RunDirectory, spec: EnsembleSpec, inputs: int, *, batch_size: int,
                           device: str | torch.device, log: Any, what: str, note: str = "") -> None:
    """The budget line of collecting the members' outputs: members x ``inputs`` forward passes (x the
    ablations of each input for de-randomized smoothing members), timed on one batch through member 0."""
    data = prepare_data(spec)
    c, h, w = data.splits.input_shape
    shape, ablations = (c, h, w), 1
    if spec.ablation is not None:
        shape, ablations = (ablation_input_channels(c), h, w), (w if spec.ablation == "column" else h * w)
    per = seconds_per_input(load_run_model(run, member_name(0), device="cpu"), shape, batch=batch_size,
                            device=device)
    announce(log, what, spec.members * inputs * ablations, "forward passes",
             detail=f"{spec.members} members x {inputs} inputs (clean + triggered)"
             + (f" x {ablations} ablations" if ablations > 1 else ""), seconds_per_unit=per,
             device=resolve_device(device), note=note)


def _member_task(spec: EnsembleSpec, m: int, path: str, device: str, download: bool) -> dict[str, Any]:
    """What a joblib/Dask worker runs (module level, so it pickles by reference)."""
    return train_member(spec, m, path, device=device, progress=False, download=download)


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
    log: Any = print,
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
            :func:`~certkit.backdoor.training.train_model`; resolved in this process for joblib (every worker uses
            the same), on each worker for Dask (a CPU-only client may drive GPU workers).
        progress: tqdm bar over the members.
        retrain_corrupt: retrain members whose checkpoint is recorded but missing, modified or unloadable
            (with a :class:`RuntimeWarning`); ``False`` raises :class:`RecordError` naming them instead.
        scheduler_timeout: seconds to connect to ``scheduler`` and to wait for its first worker before an
            :class:`InputError` naming the address.
        download: let torchvision datasets download.
        log: where the budget line goes (members x epochs x batches still to train and a time estimate).

    The weights do not depend on ``n_jobs``, ``backend`` or ``scheduler`` (see module docstring). With
    ``noise="sample-specific"`` the reference model and the training scales are computed here, in this
    process, before any member is dispatched (:func:`ensure_training_scales`); a recorded reference model
    or scales file that fails verification raises :class:`RecordError` whatever ``retrain_corrupt`` says.
    """


    spec = _as_spec(spec)
    n_jobs = check_n_jobs(n_jobs)
    backend = check_backend(backend)
    scheduler = check_scheduler(scheduler)
    timeout = _number(scheduler_timeout, "scheduler_timeout")
    if not math.isfinite(timeout) or timeout <= 0:
        raise InputError(
            f"scheduler_timeout must be a finite number of seconds > 0, got {scheduler_timeout!r}"
        )
    if not isinstance(out, (str, os.PathLike)):
        raise InputError(f"out must be a path, got {type(out).__name__}")
    if scheduler is None:
        dev = str(resolve_device(device))  # fails here if CUDA is asked for but missing
    else:  # the workers may have devices this process lacks: check the name only, resolve on the worker
        dev = check_device_name(device)
    # the data first: a bad target or dataset fails before anything is written
    data, hashes = _cached_data(spec, download=download)
    if spec.aggregation:  # a bad k or an empty partition fails here, before anything is written
        ensemble_layout(spec, data)
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
                **(
                    {
                        "sigma_reference": STREAM_SIGMA_REFERENCE,
                        "sigma_train": STREAM_SIGMA_TRAIN,
                        "sigma_test": STREAM_SIGMA_TEST,
                    }
                    if spec.sample_specific
                    else {}
                ),
            },
        )
    if spec.aggregation:  # the layout record, once per run, before any member trains; verified on resume
        data, _ = _cached_data(spec, download=download)
        record_layout(run, spec, data)
        if "layout" not in run.manifest["seeds"]:
            run.record_seed("layout", {"stream": STREAM_LAYOUT, "ablation_stream": STREAM_ABLATION,
                                       "derivation": "derive_seed(seed, STREAM_LAYOUT, 0) mod 2**32"})
        del data
    if spec.sample_specific:  # once per run, before any member trains; verified on resume
        try:
            scale_dev = dev if scheduler is None else str(resolve_device(dev))
        except CertkitError:  # a CUDA device only the Dask workers have: choose the scales on the CPU
            scale_dev = "cpu"
        ensure_training_scales(spec, run, device=scale_dev, progress=progress, download=download)

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
    if tasks:
        _announce_members(spec, todo, dev if scheduler is None else None, min(n_jobs, len(todo)), download, log)
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
            results = map_tasks(_member_task, tasks, n_jobs=n_jobs, backend=backend, scheduler=scheduler,
                                timeout=timeout, names=[f"train-{member_name(m)}" for m in todo])
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


def load_ensemble(run_dir: RunDirectory | str | os.PathLike, *, batch_size: int = 1024,
                  device: str | torch.device = "auto", progress: bool = True) -> SmoothedEnsemble:
    """The :class:`~certkit.certify.ensemble.SmoothedEnsemble` of an ensemble run trained by
    :func:`train_ensemble` (members verified against their sha256 and loaded one at a time)."""
    run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
    if run.kind != "ensemble":
        raise RecordError(f"{run.path} is a {run.kind!r} run, not an ensemble run")
    spec = EnsembleSpec.from_dict(run.config["ensemble"])
    if spec.aggregation:
        raise InputError(f"{run.path} is a {spec.layout} ensemble (Mode D): its members vote without noise, so "
                         "it has no l2 smoothing certificate; certify it with `certkit ensemble certify RUN "
                         "--certificate dpa|roe|fa|fa-roe|bagging|joint`")
    names = [member_name(m) for m in range(spec.members)]
    missing = [nm for nm in names if nm not in run.manifest["models"]]
    if missing:
        raise RecordError(f"ensemble run {run.path} lacks {len(missing)} of {spec.members} members "
                          f"(first: {missing[0]}); resume training with `certkit ensemble train`")
    first = run.model_spec(names[0])["kwargs"]
    num_classes, input_shape = int(first["num_classes"]), tuple(first["input_shape"])
    member_sha = {nm: run.manifest["models"][nm]["sha256"] for nm in names}
    return SmoothedEnsemble(
        lambda m: run.load_model(names[m], device="cpu"), num_classes, spec.sigma,
        lambda m: member_test_noise(spec, m, input_shape), n_members=spec.members, batch_size=batch_size,
        device=device, progress=progress,
        meta={"run": str(run.path), "member_sha256": member_sha, "noise": spec.noise},
    )
