"""Training-time smoothing (Mode B): certify an ensemble of models trained on noised data.

RAB (Weber et al., "RAB: Provable Robustness Against Backdoor Attacks", IEEE S&P 2023): member ``m`` is
trained on the (possibly poisoned) training set plus one fixed Gaussian draw per training input and adds its
own fixed Gaussian draw ``delta_m`` to every test input. For a test input ``x`` the members' outputs
``f_m(x + delta_m)`` are ``M`` independent samples of the base classifier under the *joint* noise of
(training set, test input), so the ensemble's vote estimates the smoothed classifier, and a certificate
``(c, R)`` covers every joint l2 perturbation of training features and test input below ``R`` (labels as
they are; docs/design.md section 1).

Votes and bounds (the number of draws is the number of members ``M``, taken from the data):

* ``bound="clopper-pearson"``: hard votes; one-sided Clopper-Pearson bounds.
* ``bound="hoeffding"``: mean soft scores (softmax outputs in [0, 1]); Hoeffding half-width
  ``sqrt(ln(1/alpha') / (2M))`` (the released RAB/Cert-SSB code hard-codes ``M = 1000``).

Each bound ranks the classes by its own scores, and the certified class is the top of that ranking. The
ensemble's point prediction for empirical accuracy and ASR is therefore :meth:`EnsembleVotes.prediction`
with the same ``bound``: the hard-vote majority for Clopper-Pearson, the largest mean soft score for
Hoeffding (the two can differ).

The top class and the runner-up are chosen from the *same* votes that are bounded, so by default certkit takes
simultaneous one-sided bounds for all ``C`` classes (Bonferroni over the ``2C`` lower and upper bounds,
``alpha' = alpha / (2C)`` each; ``alpha / 2`` with two classes, where a class's upper bound is the other's
lower bound, :func:`per_bound_alpha`): then the data-chosen classes are covered with probability
``>= 1 - alpha``. With two classes this is the "alpha split between pA and pB" of docs/design.md section 2.4. ``selection_correction=False`` uses ``alpha' = alpha`` for each
bound, as the released RAB/Cert-SSB evaluators do (not covered against the selection; for comparison only).
With ``pA_low`` and ``pB_up = min(upper bound of the runner-up, 1 - pA_low)`` the radius is
``sigma / 2 * (PhiInv(pA_low) - PhiInv(pB_up))``; the ensemble abstains when ``pA_low <= pB_up``.

Votes are collected model-major (load a member once, run the whole test set) and can be saved
(``votes.npz``) so certificates are recomputed offline for another alpha or bound without the models
(the DPA habit of "evaluate once, certify offline").

Per-point test sigmas (Cert-SSB's sample-specific noise; docs/design.md sections 2 and 3)
-----------------------------------------------------------------------------------------

``SmoothedEnsemble.votes(x, sigma=s)`` takes one test sigma ``s_i`` per point: member ``m`` classifies
``x_i + s_i * z_m`` with ``z_m = test_noise(m) / sigma`` its fixed standard-normal test draw, so over the
members point ``i`` sees noise ``N(0, s_i^2 I)``. The votes keep ``s`` (:attr:`EnsembleVotes.sigma`, saved in
``votes.npz``) and :func:`certify_votes` scales the radius of point ``i`` by that same ``s_i`` (sigma
soundness: the released Cert-SSB evaluator samples at the base sigma and scales radii by the optimised
sigma; certkit refuses a radius sigma that differs from the sampling sigma recorded in the votes).

With training scales ``s_j`` and test scale ``sigma_i`` the Gaussian argument certifies every joint
perturbation ``(Delta, delta)`` of the training inputs and test input with
``sum_j ||Delta_j||^2 / s_j^2 + ||delta||^2 / sigma_i^2 < (gap / 2)^2``, ``gap = PhiInv(pA_low) - PhiInv(pB_up)``
(:func:`vote_gap`). Three readings (docs/design.md section 3):

(a) ``radius = sigma_i * gap / 2`` (the ``radius`` of :func:`certify_votes`; Cert-SSB's convention): the
    test-input perturbations covered when the training set is left as it is;
(b) :func:`joint_l2_radius` ``= min(min_j s_j, sigma_i) * gap / 2``: every joint perturbation of plain
    l2 norm below it is covered (always ``<= (a)``);
(c) :func:`attack_covered`: a concrete attack (training deltas ``Delta_j``, test trigger ``t_i``) is covered
    iff the weighted condition holds; :func:`weighted_joint_norms` expresses the attack in the units of (a).
With every scale equal to ``sigma`` all three reduce to RAB's joint certificate. Where the scales were chosen
from the data, every certificate holds conditional on them as fixed
(:data:`certkit.runs.ensemble_train.SAMPLE_SPECIFIC_ASSUMPTION`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import ndtri
from torch import nn
from tqdm.auto import tqdm

from certkit._validation import (
    check_alpha,
    check_choice,
    check_finite_tensor,
    check_float,
    check_labels,
    check_model_input,
    check_positive_array,
    check_positive_int,
)
from certkit.certify.bounds import clopper_pearson, hoeffding_halfwidth
from certkit.certify.radius import gaussian_radius
from certkit.certify.results import CertificationResult
from certkit.devices import resolve_device
from certkit.errors import InputError, RecordError
from certkit.io import atomic_write_bytes, to_jsonable

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
        sigma: ``[N]`` float64 per-point test sigma the votes were sampled with (``None``: the ensemble's
            one sigma, ``meta["sigma"]``). :func:`certify_votes` uses it for the radius.
    """

    predictions: np.ndarray
    soft_sum: np.ndarray
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)
    sigma: np.ndarray | None = None

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
        if self.sigma is not None:
            self.sigma = _point_sigma(self.sigma, n, "votes sigma")

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

    def scores(self, bound: str = "clopper-pearson") -> np.ndarray:
        """The scores ``[N, C]`` that ``bound`` ranks and bounds: hard vote counts (``"clopper-pearson"``)
        or mean soft scores (``"hoeffding"``)."""
        check_choice(bound, BOUNDS, "bound")
        return self.counts() if bound == "clopper-pearson" else self.soft_mean()

    def prediction(self, bound: str = "clopper-pearson") -> np.ndarray:
        """The ensemble's point prediction ``[N]`` (int64, never abstaining) in the ranking of ``bound``.

        ``"clopper-pearson"``: the hard-vote majority; ``"hoeffding"``: the class with the largest mean
        soft score. The smaller class index wins ties. This is the class :func:`certify_votes` certifies
        (where it does not abstain), so empirical accuracy and ASR of the ensemble must use the same
        ``bound`` as its certificates: in Hoeffding mode the hard majority can differ from the certified
        class.
        """
        return np.argmax(self.scores(bound), axis=1).astype(np.int64)

    def save(self, path: str | Path) -> Path:
        """Write a ``.npz`` file atomically (no pickled objects)."""
        import io
        import json


        buf = io.BytesIO()
        dtype = np.int16 if self.num_classes <= np.iinfo(np.int16).max else np.int32
        extra = {} if self.sigma is None else {"sigma": self.sigma}
        np.savez_compressed(buf, format=np.array(VOTES_FORMAT), predictions=self.predictions.astype(dtype),
                            soft_sum=self.soft_sum, num_classes=np.array(self.num_classes),
                            meta=np.array(json.dumps(to_jsonable(self.meta))), **extra)
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
                           num_classes=int(z["num_classes"]), meta=json.loads(str(z["meta"])),
                           sigma=z["sigma"] if "sigma" in z.files else None)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError, InputError) as exc:
            raise RecordError(f"votes file {path} is corrupt or not a certkit votes file: {exc}") from exc


def _point_sigma(sigma: Any, n: int, name: str = "sigma") -> np.ndarray:
    """Per-point sigma as float64 ``[n]`` (a scalar is repeated): finite, > 0, of length ``n``."""
    return check_positive_array(sigma, name, n, scalar_ok=True)


def _bounds(votes: EnsembleVotes, bound: str, alpha_each: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top class, pA lower bound, runner-up upper bound) per point."""
    m, n = votes.members, votes.points
    scores = votes.scores(bound)
    order = np.argsort(-scores, axis=1, kind="stable")  # top == votes.prediction(bound) (first index on ties)
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


def per_bound_alpha(alpha: float, num_classes: int, selection_correction: bool = True) -> float:
    """The level of each one-sided bound so that a certificate whose classes are chosen from the same votes
    holds with probability ``>= 1 - alpha``.

    The certificate needs the lower bound of the selected class and the upper bounds of all other classes
    (the true runner-up may be any of them), whichever class the votes select: a union over ``C`` lower and
    ``C`` upper one-sided events, ``alpha / (2C)`` each. With two classes the upper bound of one class is the
    lower bound of the other (``p_1 = 1 - p_0``, Clopper-Pearson and Hoeffding are symmetric), so the events
    pair up and ``alpha / 2`` suffices. ``selection_correction=False``: ``alpha`` (the released evaluators).

    >>> per_bound_alpha(0.001, 2), per_bound_alpha(0.001, 10)
    (0.0005, 5e-05)
    """
    if not selection_correction:
        return alpha
    return alpha / 2 if num_classes == 2 else alpha / (2 * num_classes)


def _bounded(votes: EnsembleVotes, alpha: float, bound: str,
             selection_correction: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top class, pA_low, effective pB_up, abstain) per point: the bounds every certificate uses."""
    top, p_a_low, p_b_up = _bounds(votes, bound, per_bound_alpha(alpha, votes.num_classes, selection_correction))
    p_b_eff = np.minimum(p_b_up, 1.0 - p_a_low)
    return top, p_a_low, p_b_eff, p_a_low <= p_b_eff


def _resolve_sigma(votes: EnsembleVotes, sigma: Any) -> tuple[np.ndarray, bool]:
    """The per-point radius sigma, checked against the sampling sigma recorded in the votes; and whether
    the sigma is per point (an array) rather than the ensemble's single sigma."""
    n = votes.points
    if votes.sigma is not None:  # sampled per point: the radius must use that very sigma
        if sigma is None:
            return votes.sigma.copy(), True
        sig = _point_sigma(sigma, n)
        if not np.array_equal(sig, votes.sigma):
            raise InputError("sigma differs from the per-point sigma these votes were sampled with; the radius "
                             "must use the sampling sigma (docs/design.md section 2.7): omit sigma= to use votes.sigma")
        return sig, True
    sampled = votes.meta.get("sigma")
    if sigma is None:
        if sampled is None:
            raise InputError("sigma is required: these votes record no sampling sigma")
        sigma = sampled
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not (math.isfinite(sigma) and sigma > 0):
            raise InputError(f"sigma must be a positive finite number, got {sigma!r}")
        sig, per_point = np.full(n, float(sigma)), False
    else:
        sig, per_point = _point_sigma(sigma, n), True
    if isinstance(sampled, (int, float)) and not isinstance(sampled, bool) and not np.all(sig == float(sampled)):
        raise InputError(f"these votes were sampled at sigma={sampled:g}; a radius must use the sampling sigma "
                         "(docs/design.md section 2.7). For per-point sigmas collect the votes with "
                         "SmoothedEnsemble.votes(x, sigma=...)")
    return sig, per_point


def vote_gap(votes: EnsembleVotes, *, alpha: float = 0.001, bound: str = "clopper-pearson",
             selection_correction: bool = True) -> np.ndarray:
    """``gap = PhiInv(pA_low) - PhiInv(pB_up)`` per point (float64 ``[N]``; 0 where the ensemble abstains,
    ``inf`` where ``pA_low == 1``), with the bounds of :func:`certify_votes` for the same arguments. The
    radius of point ``i`` is ``sigma_i * gap_i / 2``; see :func:`joint_l2_radius` and :func:`attack_covered`
    for the training-side readings."""
    alpha = check_alpha(alpha)
    check_choice(bound, BOUNDS, "bound")
    _, p_a_low, p_b_eff, abstain = _bounded(votes, alpha, bound, selection_correction)
    gap = np.zeros(votes.points, dtype=np.float64)
    ok = ~abstain
    with np.errstate(over="ignore", invalid="ignore"):
        gap[ok] = ndtri(p_a_low[ok]) - ndtri(p_b_eff[ok])
    return gap


def certify_votes(
    votes: EnsembleVotes,
    y: Any = None,
    *,
    sigma: Any = None,
    alpha: float = 0.001,
    bound: str = "clopper-pearson",
    selection_correction: bool = True,
    ids: Any = None,
    triggered: bool = False,
    trigger_norm: Any = None,
    name: str = "",
) -> CertificationResult:
    """Certificates from saved votes (no model needed): prediction, radius, ``p_lower`` per point.

    Args:
        votes: the members' votes on the points.
        y: true labels ``[N]`` (optional).
        sigma: the test-noise std the votes were sampled with (pixel units): a number (RAB: training and
            test noise share it and radii are joint l2 norms) or a per-point array ``[N]`` (finite, > 0;
            radius ``sigma_i * gap / 2`` in the test point's sigma units, reading (a) of the module
            docstring). ``None`` takes :attr:`EnsembleVotes.sigma`, else ``votes.meta["sigma"]``. A sigma
            that differs from the one recorded in the votes raises :class:`InputError` (sigma soundness).
        alpha: probability that a certificate is wrong, per point.
        bound: ``"clopper-pearson"`` (hard votes) or ``"hoeffding"`` (mean soft scores).
        selection_correction: Bonferroni over the ``C`` classes (default; see the module docstring).
    """
    alpha = check_alpha(alpha)
    check_choice(bound, BOUNDS, "bound")
    sig, per_point = _resolve_sigma(votes, sigma)
    n = votes.points
    labels = np.full(n, -1, dtype=np.int64) if y is None else check_labels(y, n, votes.num_classes).numpy()
    top, p_a_low, p_b_eff, abstain = _bounded(votes, alpha, bound, selection_correction)
    if n:
        radius = np.asarray(gaussian_radius(p_a_low, sig, p_b_eff), dtype=np.float64)  # 0 where abstaining
    else:
        radius = np.zeros(0)
    prediction = np.where(abstain, -1, top).astype(np.int64)
    if trigger_norm is not None:
        trigger_norm = np.asarray(torch.as_tensor(trigger_norm).detach().cpu().numpy(), dtype=np.float64)
    meta = {"method": f"ensemble-{bound}", "alpha": alpha, "members": votes.members, "bound": bound,
            "selection_correction": bool(selection_correction), "num_classes": votes.num_classes, "name": name}
    if per_point:
        meta["radius_units"] = "per-point test sigma: radius = sigma_i * gap / 2"
    elif votes.members:  # the largest radius these settings give any point: every member votes one class
        soft = np.zeros((1, votes.num_classes))
        soft[0, 0] = votes.members
        unanimous = EnsembleVotes(predictions=np.zeros((votes.members, 1), dtype=np.int64), soft_sum=soft,
                                  num_classes=votes.num_classes, meta={"sigma": float(np.asarray(sig).reshape(-1)[0])})
        _, cap_low, cap_b, _ = _bounded(unanimous, alpha, bound, selection_correction)
        cap_sigma = float(np.asarray(sig).reshape(-1)[0])
        meta["radius_cap"] = float(np.asarray(gaussian_radius(cap_low, cap_sigma, cap_b)).reshape(-1)[0])
    return CertificationResult(
        label=labels, prediction=prediction, radius=radius, p_lower=p_a_low, sigma=sig,
        triggered=np.full(n, bool(triggered)), index=None if ids is None else np.asarray(ids),
        trigger_norm=trigger_norm, meta=meta,
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

    @torch.inference_mode()
    def votes(self, x: torch.Tensor, sigma: Any = None) -> EnsembleVotes:
        """Collect every member's vote on ``x`` (``[N, *input_shape]``), member by member.

        ``sigma``: ``None`` (member ``m`` adds its test noise ``test_noise(m)``, std ``self.sigma``) or the
        per-point test sigma ``[N]`` (finite, > 0; a number is repeated): member ``m`` adds
        ``sigma_i * z_m`` to point ``i``, ``z_m = test_noise(m) / self.sigma`` its fixed standard-normal
        draw, so point ``i``'s noise over the members is ``N(0, sigma_i^2 I)``. The votes keep the array
        (:attr:`EnsembleVotes.sigma`) so that :func:`certify_votes` scales the radius by the same sigma.
        A point whose sigma equals ``self.sigma`` gets exactly the votes of ``sigma=None``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise InputError(f"x must be a tensor of shape [N, *input_shape], got {getattr(x, 'shape', type(x))}")
        check_finite_tensor(x, "x")
        n, c = x.shape[0], self.num_classes
        point_sigma = None if sigma is None else _point_sigma(sigma, n)
        factor = None
        if point_sigma is not None:  # sigma_i / sigma: exactly 1.0 where sigma_i == sigma
            factor = torch.as_tensor(point_sigma / self.sigma, dtype=torch.float32, device=self.device)
            factor = factor.view(n, *([1] * (x.dim() - 1)))
        predictions = np.empty((self.n_members, n), dtype=np.int64)
        soft_sum = torch.zeros((n, c), dtype=torch.float64, device=self.device)
        xd = x.detach().to(self.device, dtype=torch.float32)
        for m in tqdm(range(self.n_members), desc="ensemble votes", unit="member", disable=not self.progress,
                      leave=False):
            model = self._load(m)
            if m == 0:  # the input against the model, before any forward pass
                check_model_input(model, x, "x")
            was_training = model.training
            model.eval().to(self.device)
            delta = torch.as_tensor(self._noise(m), dtype=torch.float32).to(self.device)
            if tuple(delta.shape) != tuple(x.shape[1:]):
                raise InputError(f"member {m}'s test noise has shape {tuple(delta.shape)}, inputs {tuple(x.shape[1:])}")
            preds = torch.empty(n, dtype=torch.int64, device=self.device)
            for start in range(0, n, self.batch_size):
                noise = delta if factor is None else delta * factor[start:start + self.batch_size]
                logits = model(xd[start:start + self.batch_size] + noise)
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
        if point_sigma is not None:
            meta["per_point_sigma"] = True
        return EnsembleVotes(predictions=predictions, soft_sum=soft_sum.cpu().numpy(), num_classes=c, meta=meta,
                             sigma=point_sigma)

    def certify(
        self,
        x: torch.Tensor,
        y: Any = None,
        *,
        alpha: float = 0.001,
        bound: str = "clopper-pearson",
        selection_correction: bool = True,
        votes: EnsembleVotes | None = None,
        sigma: Any = None,
        **kwargs: Any,
    ) -> CertificationResult:
        """Certify ``x`` (votes collected unless given); see :func:`certify_votes` for the arguments.

        ``sigma``: optional per-point test sigma ``[N]``; the votes are then sampled with it
        (:meth:`votes`) and the radius of point ``i`` is ``sigma_i * gap / 2``. Given votes must have been
        collected with the same sigma.
        """
        alpha = check_alpha(alpha)
        check_choice(bound, BOUNDS, "bound")
        if votes is None:
            votes = self.votes(x, sigma=sigma)
        elif votes.points != x.shape[0]:
            raise InputError(f"votes cover {votes.points} points but x has {x.shape[0]}")
        if sigma is None:
            radius_sigma = votes.sigma if votes.sigma is not None else self.sigma
        else:
            radius_sigma = _point_sigma(sigma, votes.points)
        return certify_votes(votes, y, sigma=radius_sigma, alpha=alpha, bound=bound,
                             selection_correction=selection_correction, **kwargs)


def joint_trigger_norms(poison_delta_sq_sum: float, test_trigger_norms: Any) -> np.ndarray:
    """Joint l2 norm of an attack per test point: ``sqrt(sum_j ||Delta_j||^2 + ||t_i||^2)``.

    ``poison_delta_sq_sum`` is the sum over the poisoned training inputs of their squared trigger norms
    (feature change only; labels are outside the certificate). With ``r`` poisoned points and a trigger of
    constant norm this is ``sqrt(r + 1) * ||t||`` (docs/design.md section 1).
    """
    if not (math.isfinite(poison_delta_sq_sum) and poison_delta_sq_sum >= 0):
        raise InputError(f"poison_delta_sq_sum must be finite and >= 0, got {poison_delta_sq_sum}")
    t = np.asarray(torch.as_tensor(test_trigger_norms).detach().cpu().numpy(), dtype=np.float64)
    return np.sqrt(poison_delta_sq_sum + t**2)


def _gap_array(gap: Any) -> np.ndarray:
    try:
        g = np.asarray(gap.detach().cpu().numpy() if isinstance(gap, torch.Tensor) else gap, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"gap must be numbers, got {type(gap).__name__}") from exc
    if g.ndim > 1:
        raise InputError(f"gap must be a scalar or a 1-D array, got shape {g.shape}")
    if np.isnan(g).any() or (g < 0).any():
        raise InputError("gap must be >= 0 (0 where abstaining; see vote_gap) and not NaN")
    return np.atleast_1d(g)


def _norms_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numbers, got {type(values).__name__}") from exc
    if v.ndim > 1:
        raise InputError(f"{name} must be a scalar or a 1-D array, got shape {v.shape}")
    if not np.isfinite(v).all() or (v < 0).any():
        raise InputError(f"{name} must be finite and >= 0")
    return np.atleast_1d(v)


def _scale_array(values: Any, n: int | None, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise InputError(f"{name} is empty")
    if arr.ndim == 0:
        return _point_sigma(arr, 1 if n is None else n, name)
    return _point_sigma(arr, arr.shape[0] if n is None else n, name)


def joint_l2_radius(gap: Any, sigma_i: Any, train_scales: Any) -> np.ndarray:
    """Plain joint l2 radius of reading (b): ``min(min_j s_j, sigma_i) * gap / 2`` per point.

    Args:
        gap: ``PhiInv(pA_low) - PhiInv(pB_up)`` per point (:func:`vote_gap`; 0 where abstaining), ``[N]``.
        sigma_i: test sigma per point ``[N]`` (or one number).
        train_scales: the training scales ``s_j`` (``[N_train]`` or one number), finite and > 0.

    Every joint perturbation ``(Delta, delta)`` with ``sqrt(sum_j ||Delta_j||^2 + ||delta||^2)`` below it
    satisfies the weighted condition, so it is covered; it never exceeds ``sigma_i * gap / 2`` (reading (a)).
    """
    g = _gap_array(gap)
    sig = _scale_array(sigma_i, g.shape[0], "sigma_i")
    s_min = float(_scale_array(train_scales, None, "train_scales").min())
    return np.minimum(sig, s_min) * g / 2


def poison_weighted_sq_sum(poison_delta_sq: Any, train_scales: Any) -> float:
    """``sum_j ||Delta_j||^2 / s_j^2`` of an attack on the training set: ``poison_delta_sq`` is the squared l2
    norm of the feature change of every training input ``[N_train]`` (0 where unchanged), ``train_scales``
    the scales ``s_j`` (``[N_train]`` or one number)."""
    d = _norms_array(poison_delta_sq, "poison_delta_sq")
    s = _scale_array(train_scales, d.shape[0] if np.ndim(train_scales) else None, "train_scales")
    return float(np.sum(d / s**2))


def weighted_joint_norms(delta_sq_over_s_sq_sum: float, sigma_i: Any, test_trigger_norms: Any) -> np.ndarray:
    """An attack's size in the units of radius (a): ``sigma_i * sqrt(W + ||t_i||^2 / sigma_i^2)`` with
    ``W = sum_j ||Delta_j||^2 / s_j^2``, i.e. ``sqrt(sigma_i^2 W + ||t_i||^2)``; the attack is covered at point
    ``i`` iff this is below ``sigma_i * gap / 2`` (:func:`attack_covered`). With every scale equal to ``sigma``
    it is :func:`joint_trigger_norms`."""
    w = _weighted_sum(delta_sq_over_s_sq_sum)
    t = _norms_array(test_trigger_norms, "test_trigger_norms")
    sig = _scale_array(sigma_i, t.shape[0], "sigma_i")
    return np.sqrt(sig**2 * w + t**2)


def _weighted_sum(value: Any) -> float:
    return check_float(value, "delta_sq_over_s_sq_sum")


def attack_covered(gap: Any, sigma_i: Any, delta_sq_over_s_sq_sum: float, test_trigger_norms: Any) -> np.ndarray:
    """Reading (c): whether a concrete attack is inside the certificate at each point (bool ``[N]``).

    The attack changes training input ``j`` by ``Delta_j`` and test point ``i`` by a trigger of norm
    ``||t_i||`` (labels as they are). It is covered iff
    ``sum_j ||Delta_j||^2 / s_j^2 + ||t_i||^2 / sigma_i^2 < (gap_i / 2)^2`` (strict; never where ``gap_i == 0``,
    i.e. abstaining).

    Args:
        gap: per point (:func:`vote_gap`).
        sigma_i: test sigma per point (or one number).
        delta_sq_over_s_sq_sum: ``W = sum_j ||Delta_j||^2 / s_j^2`` (:func:`poison_weighted_sq_sum`).
        test_trigger_norms: ``||t_i||`` per point (or one number).

    With all scales equal to ``sigma`` this is RAB's joint test
    ``sqrt(sum_j ||Delta_j||^2 + ||t_i||^2) < sigma * gap_i / 2`` (:func:`joint_trigger_norms`).
    """
    g = _gap_array(gap)
    w = _weighted_sum(delta_sq_over_s_sq_sum)
    t = _norms_array(test_trigger_norms, "test_trigger_norms")
    if t.shape[0] == 1 and g.shape[0] != 1:
        t = np.full(g.shape[0], t[0])
    if t.shape[0] != g.shape[0]:
        raise InputError(f"test_trigger_norms has {t.shape[0]} values but gap has {g.shape[0]}")
    sig = _scale_array(sigma_i, g.shape[0], "sigma_i")
    return (g > 0) & (w + (t / sig) ** 2 < (g / 2) ** 2)
