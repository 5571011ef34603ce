"""Benchmark: test-time smoothing (Cohen CERTIFY) throughput, side by side in one run.

Compares, on the same model, the same test points and the same (n0, n, batch size):

1. certkit's :class:`RandomizedSmoothing.certify` (batched across points and draws, bincount votes,
   numba Clopper-Pearson);
2. a per-point reference loop written here in the style of Cohen et al.'s ``Smooth.certify``
   (locuslab/smoothing ``code/core.py``): one point at a time, batches of noisy copies of that point,
   votes counted in a Python loop, ``proportion_confint`` per point;
3. the ceiling: the raw batched forward throughput of the model on pre-made inputs (no noise draws, no
   counting), expressed as points per second at ``n0 + n`` forwards per point.

Targets (issue 2): certkit >= 2x the reference loop and >= 80% of the ceiling.

Run: ``.venv/bin/python benchmarks/bench_smoothing.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from certkit import RandomizedSmoothing
from certkit.data import load_digits
from certkit.models import build_model


def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    counts = np.zeros(length, dtype=int)
    for idx in arr:  # Cohen et al.'s counting loop
        counts[idx] += 1
    return counts


class CohenStyleSmooth:
    """Per-point reference in the style of locuslab/smoothing ``Smooth`` (re-written for this benchmark)."""

    def __init__(self, model: torch.nn.Module, num_classes: int, sigma: float):
        self.model, self.num_classes, self.sigma = model, num_classes, sigma

    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            remaining = num
            while remaining > 0:
                this_batch = min(batch_size, remaining)
                remaining -= this_batch
                batch = x.repeat((this_batch, 1, 1, 1))
                noise = torch.randn_like(batch) * self.sigma
                predictions = self.model(batch + noise).argmax(1)
                counts += _count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        self.model.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        c_hat = int(counts_selection.argmax())
        counts_estimation = self._sample_noise(x, n, batch_size)
        n_a = int(counts_estimation[c_hat])
        p_a_bar = proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0]
        if p_a_bar < 0.5:
            return -1, 0.0
        return c_hat, self.sigma * norm.ppf(p_a_bar)


def _ceiling(model: torch.nn.Module, shape: tuple[int, ...], batch_size: int, rows: int) -> float:
    """Forward rows per second of the model on pre-made batches (best of 3)."""
    batch = torch.rand((batch_size, *shape))
    reps = max(1, rows // batch_size)
    best = float("inf")
    with torch.inference_mode():
        model(batch)
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                model(batch).argmax(1)
            best = min(best, time.perf_counter() - t0)
    return reps * batch_size / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-cnn", choices=["digits-cnn", "rab-mnist-cnn"],
                   help="architecture (rab-mnist-cnn runs on digits upsampled to 28x28)")
    p.add_argument("--points", type=int, default=200, help="test points certified (default 200)")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_digits(seed=0)
    x = data.test.x[: args.points]
    y = data.test.y[: args.points]
    shape = (1, 8, 8)
    if args.model == "rab-mnist-cnn":
        x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
        shape = (1, 28, 28)
    model = build_model(args.model, num_classes=10, input_shape=shape, mean=data.mean, std=data.std).eval()
    draws = args.n0 + args.n

    smoother = RandomizedSmoothing(model, 10, args.sigma, batch_size=args.batch_size, device="cpu", seed=0,
                                   progress=False)
    smoother.certify(x[:2], y[:2], n0=args.n0, n=args.n, alpha=args.alpha)  # warm-up (numba compile)
    t0 = time.perf_counter()
    res = smoother.certify(x, y, n0=args.n0, n=args.n, alpha=args.alpha)
    t_certkit = time.perf_counter() - t0

    ref = CohenStyleSmooth(model, 10, args.sigma)
    ref.certify(x[0], args.n0, args.n, args.alpha, args.batch_size)
    t0 = time.perf_counter()
    ref_out = [ref.certify(x[i], args.n0, args.n, args.alpha, args.batch_size) for i in range(len(x))]
    t_ref = time.perf_counter() - t0

    rows_per_s = _ceiling(model, shape, args.batch_size, rows=min(len(x) * draws, 200_000))
    pts = len(x)
    certkit_pps, ref_pps, ceiling_pps = pts / t_certkit, pts / t_ref, rows_per_s / draws
    agree = np.mean([(a == b) for a, (b, _) in zip(res.prediction.tolist(), ref_out)])
    figures = {
        "model": args.model, "points": pts, "n0": args.n0, "n": args.n, "batch_size": args.batch_size,
        "sigma": args.sigma, "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "certkit_points_per_s": certkit_pps, "reference_points_per_s": ref_pps,
        "ceiling_points_per_s": ceiling_pps, "speedup_vs_reference": certkit_pps / ref_pps,
        "fraction_of_ceiling": certkit_pps / ceiling_pps, "prediction_agreement_with_reference": agree,
    }
    print(f"test-time smoothing, {args.model}, {pts} points, n0={args.n0}, n={args.n}, batch={args.batch_size}, "
          f"sigma={args.sigma}, torch threads={torch.get_num_threads()}")
    print(f"{'method':<38}{'points/s':>12}{'ratio':>10}")
    print(f"{'certkit RandomizedSmoothing.certify':<38}{certkit_pps:>12.2f}{1.0:>10.2f}")
    print(f"{'Cohen-style per-point loop':<38}{ref_pps:>12.2f}{ref_pps / certkit_pps:>10.2f}")
    print(f"{'ceiling: raw batched forward':<38}{ceiling_pps:>12.2f}{ceiling_pps / certkit_pps:>10.2f}")
    print(f"speed-up vs reference loop: {certkit_pps / ref_pps:.2f}x (target >= 2x); "
          f"fraction of ceiling: {100 * certkit_pps / ceiling_pps:.1f}% (target >= 80%)")
    print(f"same prediction as the reference on {100 * agree:.1f}% of points (different noise draws)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
