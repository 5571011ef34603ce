"""Training-time smoothing (Mode B): certify an ensemble of models trained on noised data.

RAB (Weber et al., "RAB: Provable Robustness Against Backdoor Attacks", IEEE S&P 2023): member ``m`` is
trained on the (possibly poisoned) training set plus one fixed Gaussian draw per training input and adds its
own fixed Gaussian draw ``delta_m`` to every test input. For a test input ``x`` the members' outputs
``f_m(x + delta_m)`` are ``M`` independent samples of the base classifier under the *joint* noise of
(training set, test input), so the ensemble's vote estimates the smoothed classifier, and a certificate
``(c, R)`` covers every joint l2 perturbation of training features and test input below ``R`` (labels as
they are; DESIGN.md section 1).

Votes and bounds (the number of draws is the number of members ``M``, taken from the data):

* ``bound="clopper-pearson"``: hard votes; one-sided Clopper-Pearson bounds.
* ``bound="hoeffding"``: mean soft scores (softmax outputs in [0, 1]); Hoeffding half-width
  ``sqrt(ln(1/alpha') / (2M))`` (the released RAB/Cert-SSB code hard-codes ``M = 1000``).

The top class and the runner-up are chosen from the *same* votes that are bounded, so by default certkit takes
simultaneous one-sided bounds for all ``C`` classes (Bonferroni, ``alpha' = alpha / C`` each): then the
data-chosen classes are covered with probability ``>= 1 - alpha``. With two classes this is the "alpha split
between pA and pB" of DESIGN.md section 2. ``selection_correction=False`` uses ``alpha' = alpha`` for each
bound, as the released RAB/Cert-SSB evaluators do (not covered against the selection; for comparison only).
With ``pA_low`` and ``pB_up = min(upper bound of the runner-up, 1 - pA_low)`` the radius is
``sigma / 2 * (PhiInv(pA_low) - PhiInv(pB_up))``; the ensemble abstains when ``pA_low <= pB_up``.

Votes are collected model-major (load a member once, run the whole test set) and can be saved
(``votes.npz``) so certificates are recomputed offline for another alpha or bound without the models
(the DPA habit of "evaluate once, certify offline").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._validation import check_alpha, check_choice, check_finite_tensor, check_labels, check_positive_int
from .bounds import clopper_pearson, hoeffding_halfwidth
from .devices import resolve_device
from .errors import InputError, RecordError
from .radius import gaussian_radius
from .results import CertificationResult

BOUNDS = ("clopper-pearson", "hoeffding")
VOTES_FORMAT = 1


@dataclass
class EnsembleVotes:
    """Votes of ``M`` members on ``N`` inputs.

    Attributes:
        predictions: ``[M, N]`` int, member m's predicted class for input n.
        soft_sum: ``[N, C]`` float64, sum over members of the softmax scores.
        num_classes: ``C``.
        meta: provenance (test-set hash, member hashes, sigma, ...).
    """

    predictions: np.ndarray
    soft_sum: np.ndarray
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.predictions = np.asarray(self.predictions)
        self.soft_sum = np.asarray(self.soft_sum, dtype=np.float64)
        if self.predictions.ndim != 2:
            raise InputError(f"predictions must have shape [members, points], got {self.predictions.shape}")
        m, n = self.predictions.shape
        if self.soft_sum.shape != (n, self.num_classes):
            raise InputError(f"soft_sum must have shape [{n}, {self.num_classes}], got {self.soft_sum.shape}")
        if m < 1:
            raise InputError("votes need at least one member")
        if n and (self.predictions.min() < 0 or self.predictions.max() >= self.num_classes):
            raise InputError(f"predictions must be class indices in [0, {self.num_classes})")
        if not np.isfinite(self.soft_sum).all() or (self.soft_sum < -1e-9).any() or (self.soft_sum > m + 1e-6).any():
            raise InputError("soft_sum must be finite and within [0, members]")

    @property
    def members(self) -> int:
        return int(self.predictions.shape[0])

    @property
    def points(self) -> int:
        return int(self.predictions.shape[1])

    def counts(self) -> np.ndarray:
        """Hard vote counts ``[N, C]`` (int64)."""
        n, c = self.points, self.num_classes
        flat = (np.arange(n)[None, :] * c + self.predictions.astype(np.int64)).ravel()
        return np.bincount(flat, minlength=n * c).reshape(n, c)

    def soft_mean(self) -> np.ndarray:
        """Mean soft scores ``[N, C]``."""
        return self.soft_sum / self.members

    def save(self, path: str | Path) -> Path:
        """Write a ``.npz`` file atomically (no pickled objects)."""
        import io
        import json

        from .records import atomic_write_bytes, to_jsonable

        buf = io.BytesIO()
        dtype = np.int16 if self.num_classes <= np.iinfo(np.int16).max else np.int32
        np.savez_compressed(buf, format=np.array(VOTES_FORMAT), predictions=self.predictions.astype(dtype),
                            soft_sum=self.soft_sum, num_classes=np.array(self.num_classes),
                            meta=np.array(json.dumps(to_jsonable(self.meta))))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> EnsembleVotes:
        """Read a file written by :meth:`save` (``allow_pickle=False``); RecordError if corrupt."""
        import json
        import zipfile

        path = Path(path)
        if not path.is_file():
            raise RecordError(f"votes file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) != VOTES_FORMAT:
                    raise RecordError(f"votes file {path} has format {int(z['format'])}, expected {VOTES_FORMAT}")
                return cls(predictions=z["predictions"].astype(np.int64), soft_sum=z["soft_sum"],
                           num_classes=int(z["num_classes"]), meta=json.loads(str(z["meta"])))
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError, InputError) as exc:
            raise RecordError(f"votes file {path} is corrupt or not a certkit votes file: {exc}") from exc


def _bounds(votes: EnsembleVotes, bound: str, alpha_each: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top class, pA lower bound, runner-up upper bound) per point."""
    m, n = votes.members, votes.points
    scores = votes.counts() if bound == "clopper-pearson" else votes.soft_mean()
    order = np.argsort(-scores, axis=1, kind="stable")
    top, second = order[:, 0], order[:, 1]
    s_a = scores[np.arange(n), top]
    s_b = scores[np.arange(n), second]
    if bound == "clopper-pearson":
        p_a_low = np.asarray(clopper_pearson(s_a, m, alpha_each, alternative="greater").low, dtype=np.float64)
        p_b_up = np.asarray(clopper_pearson(s_b, m, alpha_each, alternative="less").high, dtype=np.float64)
    else:
        h = float(hoeffding_halfwidth(m, alpha_each))
        p_a_low = np.clip(s_a - h, 0.0, 1.0)
        p_b_up = np.clip(s_b + h, 0.0, 1.0)
    return top, p_a_low, p_b_up


def certify_votes(
    votes: EnsembleVotes,
    y: Any = None,
    *,
    sigma: float,
    alpha: float = 0.001,
    bound: str = "clopper-pearson",
    selection_correction: bool = True,
    ids: Any = None,
    triggered: bool = False,
    trigger_norm: Any = None,
    name: str = "",
) -> CertificationResult:
    """Certificates from saved votes (no model needed): prediction, joint l2 radius, ``p_lower`` per point.

    Args:
        votes: the members' votes on the points.
        y: true labels ``[N]`` (optional).
        sigma: the noise std of training and test noise (pixel units); radii are joint l2 norms.
        alpha: probability that a certificate is wrong, per point.
        bound: ``"clopper-pearson"`` (hard votes) or ``"hoeffding"`` (mean soft scores).
        selection_correction: Bonferroni over the ``C`` classes (default; see the module docstring).
    """
    alpha = check_alpha(alpha)
    check_choice(bound, BOUNDS, "bound")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive finite number, got {sigma!r}")
    n = votes.points
    labels = np.full(n, -1, dtype=np.int64) if y is None else check_labels(y, n, votes.num_classes).numpy()
    alpha_each = alpha / votes.num_classes if selection_correction else alpha
    top, p_a_low, p_b_up = _bounds(votes, bound, alpha_each)
    p_b_eff = np.minimum(p_b_up, 1.0 - p_a_low)
    abstain = p_a_low <= p_b_eff
    radius = np.asarray(gaussian_radius(p_a_low, sigma, p_b_eff), dtype=np.float64)  # 0 where abstaining
    prediction = np.where(abstain, -1, top).astype(np.int64)
    if trigger_norm is not None:
        trigger_norm = np.asarray(torch.as_tensor(trigger_norm).detach().cpu().numpy(), dtype=np.float64)
    return CertificationResult(
        label=labels, prediction=prediction, radius=radius, p_lower=p_a_low, sigma=np.full(n, float(sigma)),
        triggered=np.full(n, bool(triggered)), index=None if ids is None else np.asarray(ids),
        trigger_norm=trigger_norm,
        meta={"method": f"ensemble-{bound}", "alpha": alpha, "members": votes.members, "bound": bound,
              "selection_correction": bool(selection_correction), "num_classes": votes.num_classes, "name": name},
    )


class SmoothedEnsemble:
    """An ensemble of models trained on noised data, certified as one smoothed classifier (Mode B).

    Args:
        members: the ``M`` member models, or a callable ``m -> nn.Module`` that loads member ``m`` (so only
            one member is in memory at a time).
        num_classes: number of classes.
        sigma: std of the training and test noise (pixel units).
        test_noise: member ``m``'s fixed test perturbation ``[*input_shape]``, as a sequence or a callable
            ``m -> Tensor``.
        n_members: required when ``members`` is a callable.
        batch_size: inputs per forward pass.
        device: ``"auto" | "cpu" | "cuda"``.
        progress: tqdm bar over members.
    """

    def __init__(
        self,
        members: Sequence[nn.Module] | Callable[[int], nn.Module],
        num_classes: int,
        sigma: float,
        test_noise: Sequence[torch.Tensor] | Callable[[int], torch.Tensor],
        *,
        n_members: int | None = None,
        batch_size: int = 1024,
        device: str | torch.device = "auto",
        progress: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if callable(members) and not isinstance(members, nn.Module):
            if n_members is None:
                raise InputError("n_members is required when members is a loader function")
            self._load = members
            self.n_members = check_positive_int(n_members, "n_members")
        else:
            models = list(members)
            if not models:
                raise InputError("an ensemble needs at least one member")
            self._load = models.__getitem__
            self.n_members = len(models)
        self._noise = test_noise if callable(test_noise) else list(test_noise).__getitem__
        if not callable(test_noise) and len(test_noise) != self.n_members:
            raise InputError(f"got {len(test_noise)} test-noise tensors for {self.n_members} members")
        self.num_classes = check_positive_int(num_classes, "num_classes", minimum=2)
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise InputError(f"sigma must be a positive finite number, got {sigma!r}")
        self.sigma = float(sigma)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.device = resolve_device(device)
        self.progress = bool(progress)
        self.meta = dict(meta or {})

    @classmethod
    def from_run(cls, run_dir: Any, *, batch_size: int = 1024, device: str | torch.device = "auto",
                 progress: bool = True) -> SmoothedEnsemble:
        """Load an ensemble trained by :func:`certkit.train_ensemble` (members verified and loaded lazily)."""
        from .ensemble_training import EnsembleSpec, member_name, member_test_noise
        from .records import RunDirectory

        run = run_dir if isinstance(run_dir, RunDirectory) else RunDirectory.open(run_dir)
        if run.kind != "ensemble":
            raise RecordError(f"{run.path} is a {run.kind!r} run, not an ensemble run")
        spec = EnsembleSpec.from_dict(run.config["ensemble"])
        names = [member_name(m) for m in range(spec.members)]
        missing = [nm for nm in names if nm not in run.manifest["models"]]
        if missing:
            raise RecordError(f"ensemble run {run.path} lacks {len(missing)} of {spec.members} members "
                              f"(first: {missing[0]}); resume training with `certkit ensemble train`")
        first = run.model_spec(names[0])["kwargs"]
        num_classes, input_shape = int(first["num_classes"]), tuple(first["input_shape"])
        member_sha = {nm: run.manifest["models"][nm]["sha256"] for nm in names}
        return cls(
            lambda m: run.load_model(names[m], device="cpu"), num_classes, spec.sigma,
            lambda m: member_test_noise(spec, m, input_shape), n_members=spec.members, batch_size=batch_size,
            device=device, progress=progress, meta={"run": str(run.path), "member_sha256": member_sha},
        )

    @torch.inference_mode()
    def votes(self, x: torch.Tensor) -> EnsembleVotes:
        """Collect every member's vote on ``x`` (``[N, *input_shape]``), member by member."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise InputError(f"x must be a tensor of shape [N, *input_shape], got {getattr(x, 'shape', type(x))}")
        check_finite_tensor(x, "x")
        n, c = x.shape[0], self.num_classes
        predictions = np.empty((self.n_members, n), dtype=np.int64)
        soft_sum = torch.zeros((n, c), dtype=torch.float64, device=self.device)
        xd = x.detach().to(self.device, dtype=torch.float32)
        for m in tqdm(range(self.n_members), desc="ensemble votes", unit="member", disable=not self.progress,
                      leave=False):
            model = self._load(m)
            was_training = model.training
            model.eval().to(self.device)
            delta = torch.as_tensor(self._noise(m), dtype=torch.float32).to(self.device)
            if tuple(delta.shape) != tuple(x.shape[1:]):
                raise InputError(f"member {m}'s test noise has shape {tuple(delta.shape)}, inputs {tuple(x.shape[1:])}")
            preds = torch.empty(n, dtype=torch.int64, device=self.device)
            for start in range(0, n, self.batch_size):
                logits = model(xd[start:start + self.batch_size] + delta)
                rows = min(self.batch_size, n - start)
                if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (rows, c):
                    raise InputError(f"member {m} output must have shape [batch, num_classes={c}], "
                                     f"got {tuple(getattr(logits, 'shape', ()))}")
                if not bool(torch.isfinite(logits).all()):
                    raise InputError(f"member {m} produced NaN or inf outputs")
                preds[start:start + rows] = logits.argmax(1)
                soft_sum[start:start + rows] += torch.softmax(logits.double(), dim=1)
            predictions[m] = preds.cpu().numpy()
            model.train(was_training)
        meta = {**self.meta, "sigma": self.sigma, "members": self.n_members}
        return EnsembleVotes(predictions=predictions, soft_sum=soft_sum.cpu().numpy(), num_classes=c, meta=meta)

    def certify(
        self,
        x: torch.Tensor,
        y: Any = None,
        *,
        alpha: float = 0.001,
        bound: str = "clopper-pearson",
        selection_correction: bool = True,
        votes: EnsembleVotes | None = None,
        **kwargs: Any,
    ) -> CertificationResult:
        """Certify ``x`` (votes collected unless given); see :func:`certify_votes` for the arguments."""
        alpha = check_alpha(alpha)
        check_choice(bound, BOUNDS, "bound")
        if votes is None:
            votes = self.votes(x)
        elif votes.points != x.shape[0]:
            raise InputError(f"votes cover {votes.points} points but x has {x.shape[0]}")
        return certify_votes(votes, y, sigma=self.sigma, alpha=alpha, bound=bound,
                             selection_correction=selection_correction, **kwargs)


def joint_trigger_norms(poison_delta_sq_sum: float, test_trigger_norms: Any) -> np.ndarray:
    """Joint l2 norm of an attack per test point: ``sqrt(sum_j ||Delta_j||^2 + ||t_i||^2)``.

    ``poison_delta_sq_sum`` is the sum over the poisoned training inputs of their squared trigger norms
    (feature change only; labels are outside the certificate). With ``r`` poisoned points and a trigger of
    constant norm this is ``sqrt(r + 1) * ||t||`` (DESIGN.md section 1).
    """
    if not (math.isfinite(poison_delta_sq_sum) and poison_delta_sq_sum >= 0):
        raise InputError(f"poison_delta_sq_sum must be finite and >= 0, got {poison_delta_sq_sum}")
    t = np.asarray(torch.as_tensor(test_trigger_norms).detach().cpu().numpy(), dtype=np.float64)
    return np.sqrt(poison_delta_sq_sum + t**2)
