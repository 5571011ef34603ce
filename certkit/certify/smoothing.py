"""Test-time randomized smoothing (Mode A): Cohen et al.'s PREDICT and CERTIFY, batched.

Cohen, Rosenfeld and Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.
The smoothed classifier of a base model ``f`` is ``g(x) = argmax_c P(f(x + sigma z) = c)``, ``z ~ N(0, I)``.
CERTIFY draws ``n0`` noisy copies to select the top class, ``n`` fresh copies to estimate its probability,
takes the one-sided Clopper-Pearson lower bound ``p_lower`` at level ``1 - alpha`` and certifies
``R = sigma * PhiInv(p_lower)`` when ``p_lower > 1/2`` (else abstains). PREDICT abstains when the two-sided
binomial test of the top two counts does not reject ``p = 1/2`` at level ``alpha``.

How this implementation differs from the reference code (locuslab/smoothing ``core.py``):

* Work is batched across test points *and* noise draws: the noisy copies of many points share one forward
  batch, and votes are counted with one ``bincount`` per batch (no Python loop over draws, no counting loop).
* Randomness is reproducible and independent of ``batch_size``: the draws of point ``i`` come in blocks of
  ``noise_block`` rows, and block ``b`` of stream ``s`` (0 = selection, 1 = estimation, 2 = predict) is drawn
  from its own ``torch.Generator`` seeded with a hash of ``(seed, s, point id, b)``. The same seed on the same
  device gives the same certificates whatever the batch size or the order of points; point ids default to
  positions and can be given (``ids=``) so that a subset reproduces the full run's rows.
  (CPU and CUDA generators produce different streams: results are reproducible per device type.)
* ``sigma`` may be a per-point tensor; the sigma a point's noise is sampled with is the sigma in its radius.
* Device is ``auto | cpu | cuda``; nothing hard-codes CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from certkit._validation import (
    check_alpha,
    check_labels,
    check_model_input,
    check_positive_int,
    check_seed,
    check_sigma,
)
from certkit.certify.bounds import binomtest_half_pvalue
from certkit.certify.radius import cohen_certify_counts
from certkit.certify.results import CertificationResult
from certkit.devices import resolve_device
from certkit.errors import InputError
from certkit.seeding import STREAM_ESTIMATE, STREAM_PREDICT, STREAM_SELECT, derive_seed

__all__ = ["PredictionResult", "RandomizedSmoothing", "derive_seed"]


@dataclass
class PredictionResult:
    """Output of :meth:`RandomizedSmoothing.predict`: ``prediction`` is -1 where PREDICT abstains."""

    prediction: np.ndarray
    pvalue: np.ndarray
    counts: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def abstain_rate(self) -> float:
        return float(np.mean(self.prediction < 0)) if len(self.prediction) else float("nan")


class RandomizedSmoothing:
    """Gaussian randomized smoothing of one model (Mode A; Cohen et al. 2019).

    Args:
        model: base classifier mapping ``[B, *input_shape]`` inputs in [0, 1] to ``[B, num_classes]`` logits.
            It is switched to eval mode and moved to ``device`` when used.
        num_classes: number of classes of the model's output.
        sigma: noise standard deviation in pixel units: a positive scalar, or a 1-D tensor with one value
            per input passed to :meth:`certify` / :meth:`predict`.
        batch_size: number of noisy copies per forward pass (does not change results).
        device: ``"auto" | "cpu" | "cuda"`` or a torch.device.
        seed: base seed of all noise draws.
        noise_block: draws per generator block (part of the random stream's definition; keep the default
            to reproduce published runs).
        progress: show a tqdm progress bar over noise draws.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float | Sequence[float] | torch.Tensor,
        *,
        batch_size: int = 1000,
        device: str | torch.device = "auto",
        seed: int = 0,
        noise_block: int = 1024,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.num_classes = check_positive_int(num_classes, "num_classes", minimum=2)
        self.sigma = check_sigma(sigma)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.device = resolve_device(device)
        self.seed = check_seed(seed, limit=2**63)
        self.noise_block = check_positive_int(noise_block, "noise_block")
        self.progress = bool(progress)

    # ------------------------------------------------------------------ public API
    def certify(
        self,
        x: torch.Tensor,
        y: torch.Tensor | Sequence[int] | None = None,
        *,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        ids: torch.Tensor | Sequence[int] | None = None,
        triggered: bool = False,
        trigger_norm: torch.Tensor | np.ndarray | None = None,
        name: str = "",
    ) -> CertificationResult:
        """Cohen CERTIFY for every input in ``x`` (shape ``[N, *input_shape]``, values in [0, 1]).

        Args:
            y: true labels ``[N]`` (optional; ``correct`` is False everywhere when omitted).
            n0: selection draws per point (discarded after choosing the class).
            n: estimation draws per point.
            alpha: the certificate holds with probability at least ``1 - alpha`` per point.
            ids: per-point ids that seed the noise (default ``0..N-1``).
            triggered, trigger_norm: stored in the result (for triggered test sets).
            name: stored as ``meta['name']`` (legend label).
        Returns a :class:`CertificationResult` (``prediction`` -1 and radius 0 where it abstains).
        """
        alpha = check_alpha(alpha)
        n0 = check_positive_int(n0, "n0")
        n = check_positive_int(n, "n")
        x = self._check_inputs(x)
        N = x.shape[0]
        labels = np.full(N, -1, dtype=np.int64) if y is None else check_labels(y, N, self.num_classes).numpy()
        sigma = self._point_sigmas(N)
        point_ids = self._point_ids(ids, N)
        counts0 = self._sample_counts(x, sigma, n0, STREAM_SELECT, point_ids, desc="certify: select")
        c_hat = counts0.argmax(axis=1)
        counts = self._sample_counts(x, sigma, n, STREAM_ESTIMATE, point_ids, desc="certify: estimate")
        n_a = counts[np.arange(N), c_hat]
        p_lower, radius, abstain = cohen_certify_counts(n_a, n, alpha, sigma.numpy())
        prediction = np.where(abstain, -1, c_hat).astype(np.int64)
        if trigger_norm is not None:
            trigger_norm = torch.as_tensor(trigger_norm).detach().cpu().numpy().astype(np.float64)
        return CertificationResult(
            label=labels, prediction=prediction, radius=np.where(abstain, 0.0, radius), p_lower=p_lower,
            sigma=sigma.numpy(), triggered=np.full(N, bool(triggered)), index=point_ids.numpy(),
            trigger_norm=trigger_norm,
            meta={"method": "cohen-certify", "alpha": alpha, "n0": n0, "n": n, "seed": self.seed,
                  "noise_block": self.noise_block, "num_classes": self.num_classes, "name": name},
        )

    def predict(
        self,
        x: torch.Tensor,
        *,
        n: int = 1000,
        alpha: float = 0.001,
        ids: torch.Tensor | Sequence[int] | None = None,
    ) -> PredictionResult:
        """Cohen PREDICT: the top class, or -1 when ``binomtest(nA, nA + nB, 0.5).pvalue > alpha``."""
        alpha = check_alpha(alpha)
        n = check_positive_int(n, "n")
        x = self._check_inputs(x)
        N = x.shape[0]
        sigma = self._point_sigmas(N)
        point_ids = self._point_ids(ids, N)
        counts = self._sample_counts(x, sigma, n, STREAM_PREDICT, point_ids, desc="predict")
        top2 = np.argsort(-counts, axis=1, kind="stable")[:, :2]
        n_a = counts[np.arange(N), top2[:, 0]]
        n_b = counts[np.arange(N), top2[:, 1]]
        pvalue = np.asarray(binomtest_half_pvalue(n_a, n_a + n_b), dtype=np.float64)
        prediction = np.where(pvalue > alpha, -1, top2[:, 0]).astype(np.int64)
        return PredictionResult(prediction=prediction, pvalue=pvalue, counts=counts,
                                meta={"method": "cohen-predict", "alpha": alpha, "n": n, "seed": self.seed})

    def counts(self, x: torch.Tensor, n: int, *, stream: int = STREAM_ESTIMATE,
               ids: torch.Tensor | Sequence[int] | None = None) -> np.ndarray:
        """Class vote counts ``[N, num_classes]`` of ``n`` noisy copies per input (for custom bounds)."""
        n = check_positive_int(n, "n")
        x = self._check_inputs(x)
        return self._sample_counts(x, self._point_sigmas(x.shape[0]), n, stream, self._point_ids(ids, x.shape[0]),
                                   desc="counts")

    # ------------------------------------------------------------------ internals
    def _check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return check_model_input(self.model, x, "x").detach()

    def _point_sigmas(self, n_points: int) -> torch.Tensor:
        s = self.sigma
        if s.dim() == 0:
            return s.expand(n_points).clone()
        if s.shape[0] != n_points:
            raise InputError(f"sigma has {s.shape[0]} per-sample values but {n_points} inputs were given")
        return s.clone()

    @staticmethod
    def _point_ids(ids: Any, n_points: int) -> torch.Tensor:
        if ids is None:
            return torch.arange(n_points, dtype=torch.int64)
        t = torch.as_tensor(ids).detach().cpu()
        if t.dtype.is_floating_point or t.dim() != 1 or t.shape[0] != n_points:
            raise InputError(f"ids must be {n_points} integers, got dtype {t.dtype} and shape {tuple(t.shape)}")
        return t.long()

    @torch.inference_mode()
    def _sample_counts(
        self, x: torch.Tensor, sigma: torch.Tensor, num: int, stream: int, point_ids: torch.Tensor, desc: str
    ) -> np.ndarray:
        """Votes of ``num`` noisy copies per point, as an int64 array ``[N, num_classes]``."""
        model, device, C = self.model, self.device, self.num_classes
        was_training = model.training
        model.eval()
        model.to(device)
        N, shape = x.shape[0], tuple(x.shape[1:])
        B = self.batch_size
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float64) else torch.float32
        buf = torch.empty((B, *shape), dtype=dtype, device=device)
        owner = torch.empty(B, dtype=torch.int64, device=device)
        votes = torch.zeros(N * C, dtype=torch.int64, device=device)
        filled = 0
        bar = tqdm(total=N * num, desc=desc, unit="draw", unit_scale=True, disable=not self.progress, leave=False)

        def flush(rows: int) -> None:
            logits = model(buf[:rows])
            if not isinstance(logits, torch.Tensor) or logits.shape != (rows, C):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise InputError(f"model output must have shape [batch, num_classes={C}], got {got}")
            if not bool(torch.isfinite(logits).all()):
                raise InputError("model output contains NaN or inf on noisy inputs")
            votes.add_(torch.bincount(owner[:rows] * C + logits.argmax(dim=1), minlength=N * C))
            bar.update(rows)

        try:
            gen = torch.Generator(device=device)
            for i in range(N):
                xi = x[i].to(device=device, dtype=dtype)
                si = float(sigma[i])
                pid = int(point_ids[i])
                for b, start in enumerate(range(0, num, self.noise_block)):
                    m = min(self.noise_block, num - start)
                    gen.manual_seed(derive_seed(self.seed, stream, pid, b))
                    if filled + m <= B:  # the block fits: draw straight into the batch buffer
                        block = buf[filled:filled + m]
                        torch.randn((m, *shape), generator=gen, out=block)
                        block.mul_(si).add_(xi)
                        owner[filled:filled + m] = i
                        filled += m
                        if filled == B:
                            flush(B)
                            filled = 0
                        continue
                    noise = torch.randn((m, *shape), generator=gen, device=device, dtype=dtype).mul_(si).add_(xi)
                    pos = 0
                    while pos < m:
                        take = min(B - filled, m - pos)
                        buf[filled:filled + take] = noise[pos:pos + take]
                        owner[filled:filled + take] = i
                        filled += take
                        pos += take
                        if filled == B:
                            flush(B)
                            filled = 0
            if filled:
                flush(filled)
        finally:
            bar.close()
            model.train(was_training)
        return votes.view(N, C).cpu().numpy()
