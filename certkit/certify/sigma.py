"""Sample-specific noise levels: stochastic gradient ascent on the proxy certified radius (DDRS / Cert-SSB).

References:

* DDRS: Alfarra, Bibi, Torr and Ghanem, "Data Dependent Randomized Smoothing", AAAI 2022
  (MotasemAlfarra/Data_Dependent_Randomized_Smoothing: ``CIFAR10/train_macer.py``, ``optimize_sigma.py``).
* Cert-SSB: Qiao, Wang, Liu, Wu, Li and Li, "Cert-SSB: Toward Certified Sample-Specific Backdoor Defense",
  arXiv 2504.21730, 2025 (NcepuQiaoTing/Cert-SSB: ``utils.py`` ``get_sigma``).

For each input ``x_i`` :func:`optimize_sigma` maximises the proxy radius

    R_i(sigma) = sigma / 2 * (PhiInv(clamp(p1)) - PhiInv(clamp(p2)))

where ``p1 >= p2`` are the two largest entries of the mean softmax of the model under the noise
``x_i + sigma * z`` (reparameterised: ``z ~ N(0, I)`` is drawn once per step and ``sigma`` enters
differentiably), ``clamp`` clips to ``[0.02, 0.98]`` (the released scripts; the ``ddsmoothing`` package uses
``[0.001, 0.999]``), and each step is ``sigma <- sigma + lr * d ReLU(R) / d sigma``: no update where
``R <= 0``. Released defaults: ``lr = 1e-4``, start at the base sigma, one noise draw per step.

``detach_model`` (which gradient):

* ``True`` (default; the released Cert-SSB update): the model output is treated as a constant, so
  ``dR/dsigma = (PhiInv(clamp(p1)) - PhiInv(clamp(p2))) / 2 >= 0``: sigma never decreases, and one step
  moves it by at most ``lr * PhiInv(0.98) = 2.05375e-4`` (at ``p1 = 0.9, p2 = 0.1``: ``1.28155e-4``).
  Confident samples grow fastest; the optimisation only needs forward passes.
* ``False`` (DDRS): the gradient also flows through the model (autograd w.r.t. sigma; the model in eval
  mode, its parameters frozen for the call and never updated), so sigma decreases where more noise costs
  more confidence than the ``sigma/2`` factor gains. DDRS averages 64 noise draws per step
  (``gaussian_num``): pass ``draws=64`` to reproduce it; ``draws=1`` gives a noisier gradient.

Default number of steps (:data:`DEFAULT_STEPS` = 1000): the iteration count is not released, but every
released Cert-SSB test-sigma file satisfies ``max_i sigma_i - sigma_base = K * 1e-4 * PhiInv(0.98)`` with
``K = 850`` (one-pixel trigger) or ``K = 1100`` (four-pixel, blending) at ``lr = 1e-4`` (certification notes,
section 1.a and fact 18). 1000 lies between the two (within 18 % and 9 % of them), so with the default ``lr``
the largest possible growth, ``1000 * 2.05375e-4 = 0.205`` pixel units, is of the size the released sigmas
show; pass ``steps=850`` or ``steps=1100`` to match one of those runs exactly. Fewer steps simply stop
earlier on the same noise sequence (seeding: see below).

Mode A and Mode B:

* **Mode A** (``model_or_members`` is an ``nn.Module``): test-time smoothing of one model. Each step draws
  ``draws`` fresh noise vectors ``z`` per input and averages the softmax over them.
* **Mode B** (``model_or_members`` is a sequence of members, or a loader ``m -> nn.Module`` with
  ``n_members``): training-time smoothing (RAB / Cert-SSB ensembles). Member ``m`` evaluates a test input
  with its *own fixed* test draw, so certkit defines member ``m``'s noise at input ``i`` as
  ``sigma_i * z_m``, where ``z_m = test_noise(m) / test_noise_scale`` is member ``m``'s fixed standard-normal
  test draw (pass :func:`certkit.runs.ensemble_train.member_test_noise` with ``test_noise_scale=spec.sigma``,
  since that returns ``spec.sigma * z_m``). ``p1, p2`` come from the mean over members of
  ``softmax(f_m(x_i + sigma_i z_m))``: the soft vote the ensemble certifies with, at the scale ``sigma_i``.
  One "draw" is one member: each step uses ``draws`` members picked at random without replacement (one
  choice per step, shared by all inputs; seeded), or all ``M`` members, in member order, when
  ``draws >= M`` (then the proxy is a deterministic function of sigma and the ascent is plain gradient
  ascent). Members are moved to ``device`` and kept in memory for the call (a loader is called at most
  once per member).

How certkit differs from the released code:

* Every noise draw comes from a seeded ``torch.Generator`` (DDRS and Cert-SSB use the global RNG): the noise
  of input ``i`` for steps ``[k*B, (k+1)*B)`` (``B`` = :data:`NOISE_BLOCK`) is drawn from a generator
  seeded with ``derive_seed(seed, STREAM_SIGMA, id_i, k)``, and Mode B's member choice at step ``t`` from
  ``derive_seed(seed, STREAM_SIGMA, t)``. Results do not depend on ``batch_size``, on the order of the
  inputs, or on ``steps`` (a shorter run is a prefix of a longer one); ids default to positions and can be
  given (``ids=``) so a subset reproduces the full run. Same device type, same results (CPU and CUDA
  generators differ).
* Optional bounds ``sigma_min`` / ``sigma_max`` (projected ascent: base sigmas and every iterate are clipped
  into them); without ``sigma_min`` sigma is kept >= :data:`SIGMA_FLOOR` so it stays a valid noise level
  (only reachable with ``detach_model=False``).
* Batched over inputs: one forward pass per step for ``batch_size`` inputs (``batch_size * draws`` rows in
  Mode A, ``batch_size`` rows per selected member in Mode B); binary one-logit models (Cert-SSB's sigmoid)
  are covered by a two-logit model: with two classes ``p2 = 1 - p1`` and the proxy equals Cert-SSB's
  ``|PhiInv(p) - PhiInv(1 - p)|`` form.
* Mode B over ensemble members (the released code optimises test sigmas on one model's output).

Soundness: these sigmas are a *data-dependent* choice. A certificate that uses a per-sample sigma must
sample its noise at that sigma and use the same sigma in its radius; :class:`certkit.RandomizedSmoothing`
with a per-sample sigma tensor does exactly that (the released Cert-SSB evaluator samples at the base sigma
but scales radii by the optimised sigma; certkit does not). Because sigma depends on the input, certificates
of nearby inputs can conflict: the order-dependent storage-update ("memory") certifier handles that and
stores the certified balls (a separate module, ``certkit.certify.storage``). The proxy radius reported here is a
noisy optimisation target, not a certificate.
"""

from __future__ import annotations

import io
import json
import math
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from certkit._validation import check_finite_tensor, check_number, check_positive_int, check_seed, check_sigma
from certkit.devices import resolve_device
from certkit.errors import InputError, RecordError
from certkit.io import atomic_write_bytes, to_jsonable
from certkit.seeding import STREAM_SIGMA, derive_seed

__all__ = ["DEFAULT_STEPS", "NOISE_BLOCK", "SIGMA_FLOOR", "SigmaResult", "optimize_sigma", "proxy_radius"]

#: Default number of SGA steps (between the released Cert-SSB runs' 850 and 1100; module docstring).
DEFAULT_STEPS = 1000


class CertifyingDrawsWarning(UserWarning):
    """A smoothing parameter was chosen from the same noise draws a certificate will bound."""
#: Steps per seeded noise block of one input in Mode A (part of the random stream's definition).
NOISE_BLOCK = 16
#: Lower limit on sigma when no ``sigma_min`` is given.
SIGMA_FLOOR = 1e-6
SIGMA_FORMAT = 1


# ---------------------------------------------------------------------------------------------- result
@dataclass
class SigmaResult:
    """Output of :func:`optimize_sigma`.

    Attributes:
        sigma: optimised sigma per input, ``[N]`` float64 (pixel units).
        base_sigma: starting sigma per input, ``[N]`` float64 (after clipping into the bounds).
        steps: number of SGA steps.
        lr: step size.
        detach_model: ``True`` = released Cert-SSB gradient (model output detached), ``False`` = DDRS.
        proxy_radius: proxy radius ``R_i`` at the returned sigma, ``[N]`` float64, from one more noisy
            evaluation (step index ``steps`` of the stream); an optimisation target, not a certificate.
        index: the ids that seeded each input's noise, ``[N]`` int64.
        trajectory: ``[T, N]`` sigma at the steps in ``trajectory_steps`` (``0, k, 2k, ... <= steps``)
            when ``record_every = k > 0``, else ``None``.
        trajectory_steps: ``[T]`` int64 or ``None``.
        meta: settings (mode, draws, clamp, bounds, seed, members, ...).
    """

    sigma: np.ndarray
    base_sigma: np.ndarray
    steps: int
    lr: float
    detach_model: bool
    proxy_radius: np.ndarray
    index: np.ndarray | None = None
    trajectory: np.ndarray | None = None
    trajectory_steps: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sigma = np.asarray(self.sigma, dtype=np.float64).reshape(-1)
        n = self.sigma.shape[0]
        self.base_sigma = np.asarray(self.base_sigma, dtype=np.float64).reshape(-1)
        self.proxy_radius = np.asarray(self.proxy_radius, dtype=np.float64).reshape(-1)
        self.index = np.arange(n, dtype=np.int64) if self.index is None else np.asarray(self.index, dtype=np.int64)
        for name in ("base_sigma", "proxy_radius", "index"):
            if getattr(self, name).shape != (n,):
                raise InputError(f"{name} must have shape [{n}], got {getattr(self, name).shape}")
        if (self.trajectory is None) != (self.trajectory_steps is None):
            raise InputError("trajectory and trajectory_steps must be given together")
        if self.trajectory is not None:
            self.trajectory = np.asarray(self.trajectory, dtype=np.float64)
            self.trajectory_steps = np.asarray(self.trajectory_steps, dtype=np.int64).reshape(-1)
            if self.trajectory.shape != (self.trajectory_steps.shape[0], n):
                raise InputError(f"trajectory must have shape [{self.trajectory_steps.shape[0]}, {n}], "
                                 f"got {self.trajectory.shape}")
        self.steps = int(self.steps)
        self.lr = float(self.lr)
        self.detach_model = bool(self.detach_model)

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists for the arrays)."""

        return to_jsonable({
            "sigma": self.sigma, "base_sigma": self.base_sigma, "steps": self.steps, "lr": self.lr,
            "detach_model": self.detach_model, "proxy_radius": self.proxy_radius, "index": self.index,
            "trajectory": self.trajectory, "trajectory_steps": self.trajectory_steps, "meta": self.meta,
        })

    def save(self, path: str | Path) -> Path:
        """Write a ``.npz`` file atomically (no pickled objects)."""

        arrays: dict[str, np.ndarray] = {
            "format": np.array(SIGMA_FORMAT), "sigma": self.sigma, "base_sigma": self.base_sigma,
            "steps": np.array(self.steps), "lr": np.array(self.lr), "detach_model": np.array(self.detach_model),
            "proxy_radius": self.proxy_radius, "index": self.index,
            "meta": np.array(json.dumps(to_jsonable(self.meta))),
        }
        if self.trajectory is not None:
            arrays["trajectory"] = self.trajectory
            arrays["trajectory_steps"] = self.trajectory_steps
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> SigmaResult:
        """Read a file written by :meth:`save` (``allow_pickle=False``); RecordError if missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise RecordError(f"sigma file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != SIGMA_FORMAT:
                    raise RecordError(f"sigma file {path} has format {int(z['format'])}, expected {SIGMA_FORMAT}")
                has_traj = "trajectory" in z.files
                return cls(
                    sigma=z["sigma"], base_sigma=z["base_sigma"], steps=int(z["steps"]), lr=float(z["lr"]),
                    detach_model=bool(z["detach_model"]), proxy_radius=z["proxy_radius"], index=z["index"],
                    trajectory=z["trajectory"] if has_traj else None,
                    trajectory_steps=z["trajectory_steps"] if has_traj else None,
                    meta=json.loads(str(z["meta"])),
                )
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError, InputError) as exc:
            raise RecordError(f"sigma file {path} is corrupt or not a certkit sigma file: {exc}") from exc


# ---------------------------------------------------------------------------------------------- proxy
def proxy_radius(probs: torch.Tensor, sigma: torch.Tensor, clamp: tuple[float, float] = (0.02, 0.98)) -> torch.Tensor:
    """``sigma / 2 * (PhiInv(clamp(p1)) - PhiInv(clamp(p2)))`` per row of ``probs`` ``[N, C]`` (C >= 2);
    differentiable in ``probs`` and ``sigma``."""
    top2 = probs.topk(2, dim=1).values.clamp(clamp[0], clamp[1])
    gap = torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1])
    return sigma / 2 * gap


# ---------------------------------------------------------------------------------------------- checks
def _finite_number(value: Any, name: str) -> float:
    v = check_number(value, name)
    if not math.isfinite(v):
        raise InputError(f"{name} must be finite, got {value!r}")
    return v


def _check_clamp(clamp: Any) -> tuple[float, float]:
    try:
        lo, hi = clamp
    except (TypeError, ValueError) as exc:
        raise InputError(f"clamp must be a pair (lo, hi) with 0 < lo < hi < 1, got {clamp!r}") from exc
    lo, hi = _finite_number(lo, "clamp[0]"), _finite_number(hi, "clamp[1]")
    if not (0.0 < lo < hi < 1.0):
        raise InputError(f"clamp must satisfy 0 < lo < hi < 1, got ({lo}, {hi})")
    return lo, hi


def _check_bound(value: Any, name: str) -> float | None:
    if value is None:
        return None
    v = _finite_number(value, name)
    if v <= 0:
        raise InputError(f"{name} must be > 0, got {value!r}")
    return v


def _point_ids(ids: Any, n: int) -> torch.Tensor:
    if ids is None:
        return torch.arange(n, dtype=torch.int64)
    t = torch.as_tensor(ids).detach().cpu()
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1 or t.shape[0] != n:
        raise InputError(f"ids must be {n} integers, got dtype {t.dtype} and shape {tuple(t.shape)}")
    return t.long()


def _module_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return fallback


class _Prepared:
    """Puts modules in eval mode on the device (and freezes their parameters); restores them afterwards."""

    def __init__(self, device: torch.device, freeze: bool) -> None:
        self.device, self.freeze = device, freeze
        self._saved: list[tuple[nn.Module, bool, list[tuple[nn.Parameter, bool]]]] = []

    def __call__(self, model: nn.Module) -> nn.Module:
        params = [(p, p.requires_grad) for p in model.parameters()] if self.freeze else []
        self._saved.append((model, model.training, params))
        model.eval().to(self.device)
        for p, _ in params:
            p.requires_grad_(False)
        return model

    def restore(self) -> None:
        for model, was_training, params in self._saved:
            model.train(was_training)
            for p, flag in params:
                p.requires_grad_(flag)
        self._saved.clear()


# ---------------------------------------------------------------------------------------------- main
def optimize_sigma(
    model_or_members: nn.Module | Sequence[nn.Module] | Callable[[int], nn.Module],
    x: torch.Tensor,
    *,
    base_sigma: float | Sequence[float] | torch.Tensor | np.ndarray,
    num_classes: int | None = None,
    steps: int = DEFAULT_STEPS,
    lr: float = 1e-4,
    draws: int = 1,
    clamp: tuple[float, float] = (0.02, 0.98),
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    detach_model: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    test_noise: Sequence[torch.Tensor] | Callable[[int], torch.Tensor] | None = None,
    n_members: int | None = None,
    test_noise_scale: float = 1.0,
    record_every: int = 0,
    ids: torch.Tensor | Sequence[int] | None = None,
) -> SigmaResult:
    """Per-sample sigma by stochastic gradient ascent on the proxy radius (module docstring).

    Args:
        model_or_members: an ``nn.Module`` (Mode A), or the ensemble members (Mode B): a sequence of modules
            or a loader ``m -> nn.Module`` together with ``n_members``. Models map ``[B, *input_shape]``
            inputs in [0, 1] to ``[B, num_classes]`` logits; they are put in eval mode on ``device`` (their
            mode and ``requires_grad`` flags are restored afterwards; parameters are never updated).
        x: inputs ``[N, *input_shape]`` (pixel units).
        base_sigma: starting sigma, a positive scalar or one value per input.
        num_classes: number of logits (default: taken from the first model output; must be >= 2).
        steps: SGA steps (default :data:`DEFAULT_STEPS` = 1000; see the module docstring for why).
        lr: step size (released default 1e-4).
        draws: noise draws per step and input (Mode A) / members per step (Mode B).
        clamp: ``(lo, hi)`` clip of ``p1, p2`` before ``PhiInv`` (released scripts: (0.02, 0.98)).
        sigma_min, sigma_max: optional bounds (projected ascent).
        detach_model: ``True`` = released Cert-SSB update (sigma never decreases), ``False`` = DDRS gradient
            through the model.
        batch_size: inputs per forward pass (does not change results).
        seed: base seed of the noise (Mode A) and of the member choice (Mode B).
        device: ``"auto" | "cpu" | "cuda"`` or a torch.device.
        progress: tqdm bar over input-steps.
        test_noise: Mode B only: member ``m``'s fixed test draw, a sequence or a callable ``m -> Tensor`` of
            one input's shape, equal to ``test_noise_scale * z_m`` with ``z_m ~ N(0, I)``.
        n_members: Mode B with a loader: the number of members.
        test_noise_scale: the std the ``test_noise`` tensors were drawn with (1 = standard normal; use the
            ensemble's sigma for :func:`~certkit.runs.ensemble_train.member_test_noise`).
        record_every: ``k > 0`` records sigma at steps ``0, k, 2k, ...`` in ``trajectory``.
        ids: per-input ids that seed the noise (default ``0..N-1``).

    Returns a :class:`SigmaResult`.
    """
    # ---- arguments
    lr = _finite_number(lr, "lr")
    if lr <= 0:
        raise InputError(f"lr must be > 0, got {lr}")
    steps = check_positive_int(steps, "steps")
    draws = check_positive_int(draws, "draws")
    lo, hi = _check_clamp(clamp)
    s_min, s_max = _check_bound(sigma_min, "sigma_min"), _check_bound(sigma_max, "sigma_max")
    if s_min is not None and s_max is not None and s_min > s_max:
        raise InputError(f"sigma_min ({s_min}) must not exceed sigma_max ({s_max})")
    batch_size = check_positive_int(batch_size, "batch_size")
    record_every = check_positive_int(record_every, "record_every", minimum=0)
    if num_classes is not None:
        num_classes = check_positive_int(num_classes, "num_classes", minimum=2)
    test_noise_scale = _finite_number(test_noise_scale, "test_noise_scale")
    if test_noise_scale <= 0:
        raise InputError(f"test_noise_scale must be > 0, got {test_noise_scale}")
    seed = check_seed(seed, limit=2**63)
    detach_model = bool(detach_model)
    dev = resolve_device(device)

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch.Tensor of shape [N, *input_shape], got {type(x).__name__}")
    if x.dim() < 2:
        raise InputError(f"x must have shape [N, *input_shape], got {tuple(x.shape)}")
    check_finite_tensor(x, "x")
    N, shape = int(x.shape[0]), tuple(x.shape[1:])
    base = check_sigma(base_sigma, N, name="base_sigma")
    base = base.expand(N).clone() if base.dim() == 0 else base.clone()
    point_ids = _point_ids(ids, N)

    # ---- mode
    if isinstance(model_or_members, nn.Module) and not isinstance(model_or_members, nn.ModuleList):
        mode = "A"
        if test_noise is not None:
            raise InputError("test_noise applies to ensemble members (Mode B); a single model draws fresh noise")
        if n_members is not None:
            raise InputError("n_members applies to a members loader (Mode B), not to a single model")
        load: Callable[[int], nn.Module] | None = None
        M = 0
    else:
        mode = "B"
        if isinstance(model_or_members, (list, tuple, nn.ModuleList)):
            members = list(model_or_members)
            if not members:
                raise InputError("members must hold at least one model")
            bad = [i for i, m in enumerate(members) if not isinstance(m, nn.Module)]
            if bad:
                raise InputError(f"members must be torch.nn.Module instances; member {bad[0]} is "
                                 f"{type(members[bad[0]]).__name__}")
            if n_members is not None and check_positive_int(n_members, "n_members") != len(members):
                raise InputError(f"n_members = {n_members} but {len(members)} members were given")
            M, load = len(members), members.__getitem__
        elif callable(model_or_members):
            if n_members is None:
                raise InputError("n_members is required when members is a loader function")
            M, load = check_positive_int(n_members, "n_members"), model_or_members
        else:
            raise InputError("model_or_members must be an nn.Module, a sequence of modules, or a loader "
                             f"m -> nn.Module; got {type(model_or_members).__name__}")
        if test_noise is None:
            raise InputError("test_noise is required for ensemble members (Mode B): member m's fixed test draw")
        if not callable(test_noise) and len(test_noise) != M:
            raise InputError(f"got {len(test_noise)} test-noise tensors for {M} members")
        warnings.warn(
            "optimize_sigma over ensemble members uses the members' fixed test-noise draws, the same draws whose "
            "votes a certificate then bounds: a sigma chosen from them makes the vote counts depend on the "
            "choice, so the bound's coverage is no longer guaranteed. Certify with a sigma chosen on other "
            "draws (e.g. a reference model in Mode A, as certkit's ensemble runs do).",
            CertifyingDrawsWarning, stacklevel=2)

    # bounds: projected ascent starts from the projected base sigma
    floor = s_min if s_min is not None else SIGMA_FLOOR
    base = base.clamp(min=floor)
    if s_max is not None:
        base = base.clamp(max=s_max)

    meta: dict[str, Any] = {
        "mode": mode, "draws": draws, "clamp": [lo, hi], "sigma_min": s_min, "sigma_max": s_max, "seed": seed,
        "batch_size": batch_size, "noise_block": NOISE_BLOCK, "stream": STREAM_SIGMA, "method":
        "cert-ssb-detached" if detach_model else "ddrs", "device_type": dev.type, "num_classes": num_classes,
    }
    if mode == "B":
        meta.update(members=M, test_noise_scale=test_noise_scale)
    n_rec = steps // record_every + 1 if record_every else 0
    trajectory = np.empty((n_rec, N), dtype=np.float64) if record_every else None
    traj_steps = np.arange(n_rec, dtype=np.int64) * record_every if record_every else None
    if N == 0:
        return SigmaResult(sigma=base.numpy(), base_sigma=base.numpy(), steps=steps, lr=lr, detach_model=detach_model,
                           proxy_radius=np.zeros(0), index=point_ids.numpy(), trajectory=trajectory,
                           trajectory_steps=traj_steps, meta=meta)

    # inputs and noise take the model's floating dtype (else x's, else float32)
    fallback = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
    prep = _Prepared(dev, freeze=not detach_model)
    try:
        if mode == "A":
            sga = _SGA(prep, dev, shape, draws, seed, lo, hi, num_classes, meta, fallback, model=model_or_members)
        else:
            sga = _SGA(prep, dev, shape, draws, seed, lo, hi, num_classes, meta, fallback, load=load, n_members=M,
                       test_noise=test_noise, test_noise_scale=test_noise_scale, steps=steps)
        sigma_out = np.empty(N, dtype=np.float64)
        proxy_out = np.empty(N, dtype=np.float64)
        bar = tqdm(total=N * steps, desc="sigma SGA", unit="step", unit_scale=True, disable=not progress,
                   leave=False)
        try:
            for start in range(0, N, batch_size):
                stop = min(N, start + batch_size)
                xb = x[start:stop].detach().to(dev, sga.dtype)
                sig = base[start:stop].to(dev)
                sga.begin_batch(xb, point_ids[start:stop].tolist())
                rec = 0
                for t in range(steps + 1):
                    if record_every and t % record_every == 0:
                        trajectory[rec, start:stop] = sig.cpu().numpy()
                        rec += 1
                    if t == steps:  # proxy radius at the returned sigma, from the noise of step index `steps`
                        with torch.no_grad():
                            proxy_out[start:stop] = proxy_radius(sga.probs(sig, t), sig, (lo, hi)).cpu().numpy()
                        break
                    grad = sga.gradient(sig, t, detach_model)
                    sig = (sig + lr * grad).clamp(min=floor)
                    if s_max is not None:
                        sig = sig.clamp(max=s_max)
                    bar.update(stop - start)
                sigma_out[start:stop] = sig.cpu().numpy()
        finally:
            bar.close()
    finally:
        prep.restore()
    return SigmaResult(sigma=sigma_out, base_sigma=base.numpy(), steps=steps, lr=lr, detach_model=detach_model,
                       proxy_radius=proxy_out, index=point_ids.numpy(), trajectory=trajectory,
                       trajectory_steps=traj_steps, meta=meta)


class _SGA:
    """The noisy soft predictions and proxy gradients of one batch of inputs (Mode A or B)."""

    def __init__(self, prep: _Prepared, device: torch.device, shape: tuple[int, ...], draws: int, seed: int,
                 lo: float, hi: float, num_classes: int | None, meta: dict[str, Any], fallback: torch.dtype, *,
                 model: nn.Module | None = None, load: Callable[[int], nn.Module] | None = None,
                 n_members: int = 0, test_noise: Any = None, test_noise_scale: float = 1.0, steps: int = 0) -> None:
        self.prep, self.device, self.shape, self.draws, self.seed = prep, device, shape, draws, seed
        self.lo, self.hi, self.num_classes, self.meta = lo, hi, num_classes, meta
        self.gen = torch.Generator(device=device)
        self.mode = "A" if model is not None else "B"
        if model is not None:
            self.model = prep(model)
            self.dtype = _module_dtype(self.model, fallback)
            self.selection = None
        else:
            self._load, self._test_noise, self._scale = load, test_noise, test_noise_scale
            self._members: dict[int, nn.Module] = {}
            self._z: dict[int, torch.Tensor] = {}
            self._member(0)  # fixes the dtype
            self.dtype = _module_dtype(self._members[0], fallback)
            if draws >= n_members:  # every member, every step
                self.selection = np.broadcast_to(np.arange(n_members, dtype=np.int64), (steps + 1, n_members))
            else:
                self.selection = np.empty((steps + 1, draws), dtype=np.int64)
                g = torch.Generator()
                for t in range(steps + 1):
                    g.manual_seed(derive_seed(seed, STREAM_SIGMA, t))
                    self.selection[t] = torch.randperm(n_members, generator=g)[:draws].numpy()

    # ---- Mode B members (loaded once, kept on the device)
    def _member(self, m: int) -> tuple[nn.Module, torch.Tensor]:
        if m not in self._members:
            mod = self._load(m)
            if not isinstance(mod, nn.Module):
                raise InputError(f"member {m} is not a torch.nn.Module (got {type(mod).__name__})")
            z = torch.as_tensor(self._test_noise(m) if callable(self._test_noise) else self._test_noise[m])
            if tuple(z.shape) != self.shape:
                raise InputError(f"member {m}'s test noise has shape {tuple(z.shape)}, inputs {self.shape}")
            if not z.is_floating_point() or not bool(torch.isfinite(z).all()):
                raise InputError(f"member {m}'s test noise must be finite floating-point values")
            self._members[m] = self.prep(mod)
            self._z[m] = z.detach().to(self.device, torch.float64) / self._scale  # standard-normal draw z_m
        return self._members[m], self._z[m]

    # ---- one batch
    def begin_batch(self, xb: torch.Tensor, pids: list[int]) -> None:
        self.xb, self.pids, self.b = xb, pids, xb.shape[0]
        self.view = (self.b,) + (1,) * len(self.shape)
        if self.mode == "A":
            self.noise = torch.empty((self.b, NOISE_BLOCK * self.draws, *self.shape), dtype=self.dtype,
                                     device=self.device)
            self._block = -1
        else:
            self._zb = {m: z.to(self.dtype) for m, z in self._z.items()}

    def _fill_noise(self, block: int) -> None:
        with torch.no_grad():
            for j, pid in enumerate(self.pids):
                self.gen.manual_seed(derive_seed(self.seed, STREAM_SIGMA, pid, block))
                torch.randn((NOISE_BLOCK * self.draws, *self.shape), generator=self.gen, out=self.noise[j])
        self._block = block

    def _check(self, who: str, out: Any, rows: int) -> None:
        if self.num_classes is None and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == rows:
            if out.shape[1] < 2:
                raise InputError(f"{who} output must have at least 2 classes, got shape {tuple(out.shape)}")
            self.num_classes = self.meta["num_classes"] = int(out.shape[1])
        expect = (rows, self.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expect:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"{who} output must have shape [batch, num_classes] = {expect}, got {got}")
        if not bool(torch.isfinite(out).all()):
            raise InputError(f"{who} output contains NaN or inf on noisy inputs")

    def probs(self, s: torch.Tensor, t: int) -> torch.Tensor:
        """Mean softmax ``[b, C]`` (float64) under the noise of step ``t`` at the scales ``s`` ``[b]``."""
        b, draws, shape = self.b, self.draws, self.shape
        if self.mode == "A":
            if t // NOISE_BLOCK != self._block:
                self._fill_noise(t // NOISE_BLOCK)
            k = t % NOISE_BLOCK
            z = self.noise[:, k * draws:(k + 1) * draws]
            inp = (self.xb.unsqueeze(1) + s.to(self.dtype).view(b, 1, *self.view[1:]) * z).reshape(b * draws, *shape)
            out = self.model(inp)
            self._check("model", out, b * draws)
            return torch.softmax(out.double(), dim=1).view(b, draws, -1).mean(1)
        acc = None
        members = self.selection[t].tolist()
        for m in members:
            model, _ = self._member(m)
            if m not in self._zb:
                self._zb[m] = self._z[m].to(self.dtype)
            out = model(self.xb + s.to(self.dtype).view(self.view) * self._zb[m])
            self._check(f"member {m}", out, b)
            p = torch.softmax(out.double(), dim=1)
            acc = p if acc is None else acc + p
        return acc / len(members)

    def gradient(self, sig: torch.Tensor, t: int, detach_model: bool) -> torch.Tensor:
        """``d ReLU(R) / d sigma`` per input at step ``t``."""
        if detach_model:  # released Cert-SSB: only the sigma/2 factor carries the gradient
            with torch.no_grad():
                top2 = self.probs(sig, t).topk(2, dim=1).values.clamp(self.lo, self.hi)
                gap = torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1])
                return torch.where(gap > 0, 0.5 * gap, torch.zeros_like(gap))
        s = sig.clone().requires_grad_(True)  # DDRS: through the model too (parameters frozen)
        with torch.enable_grad():
            r = proxy_radius(self.probs(s, t), s, (self.lo, self.hi))
            (g,) = torch.autograd.grad(r.sum(), s)
        return torch.where(r.detach() > 0, g, torch.zeros_like(g))
