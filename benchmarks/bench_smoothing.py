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
from certkit.backdoor.data import load_digits
from certkit.backdoor.models import build_model


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


def _ceiling(model: torch.nn.Module, shape: tuple[int, ...], batch_size: int, rows: int,
             with_noise: bool = False) -> float:
    """Forward rows per second of the model on pre-made batches (best of 3); with ``with_noise`` each batch
    also gets a fresh Gaussian draw (the unavoidable cost of sampling, for reference)."""
    batch = torch.rand((batch_size, *shape))
    noise = torch.empty_like(batch)
    reps = max(1, rows // batch_size)
    best = float("inf")
    with torch.inference_mode():
        model(batch)
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                if with_noise:
                    torch.randn(batch.shape, out=noise)
                    model(noise.mul_(0.25).add_(batch)).argmax(1)
                else:
                    model(batch).argmax(1)
            best = min(best, time.perf_counter() - t0)
    return reps * batch_size / best


def _build(name: str, data) -> tuple[torch.nn.Module, tuple[int, ...], bool]:
    """(model, input shape, upsample to 28x28?) for a benchmark model name."""
    if name == "linear":  # a cheap base model: per-point overheads dominate
        from certkit.backdoor.models import Normalize

        model = torch.nn.Sequential(Normalize(data.mean, data.std), torch.nn.Flatten(), torch.nn.Linear(64, 10))
        return model.eval(), (1, 8, 8), False
    if name == "rab-mnist-cnn":
        return build_model(name, num_classes=10, input_shape=(1, 28, 28), mean=data.mean, std=data.std).eval(), (1, 28, 28), True
    return build_model(name, num_classes=10, input_shape=(1, 8, 8), mean=data.mean, std=data.std).eval(), (1, 8, 8), False


def bench_one(name: str, args: argparse.Namespace, data) -> dict:
    """Time certkit, the Cohen-style loop and the forward ceiling for one model."""
    torch.manual_seed(0)
    model, shape, upsample = _build(name, data)
    x = data.test.x[: args.points]
    y = data.test.y[: args.points]
    if upsample:
        x = torch.nn.functional.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False).clamp(0, 1)
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
    noisy_rows_per_s = _ceiling(model, shape, args.batch_size, rows=min(len(x) * draws, 200_000), with_noise=True)
    pts = len(x)
    certkit_pps, ref_pps, ceiling_pps = pts / t_certkit, pts / t_ref, rows_per_s / draws
    return {
        "model": name, "points": pts, "certkit_points_per_s": certkit_pps, "reference_points_per_s": ref_pps,
        "ceiling_points_per_s": ceiling_pps, "speedup_vs_reference": certkit_pps / ref_pps,
        "fraction_of_ceiling": certkit_pps / ceiling_pps, "reference_fraction_of_ceiling": ref_pps / ceiling_pps,
        "noise_ceiling_points_per_s": noisy_rows_per_s / draws,
        "fraction_of_noise_ceiling": certkit_pps / (noisy_rows_per_s / draws),
        "prediction_agreement_with_reference": float(np.mean([a == b for a, (b, _) in zip(res.prediction.tolist(), ref_out)])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["digits-cnn", "rab-mnist-cnn", "linear"],
                   choices=["digits-cnn", "rab-mnist-cnn", "linear"],
                   help="base models (rab-mnist-cnn runs on digits upsampled to 28x28; linear = one Linear layer)")
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
    data = load_digits(seed=0)
    print(f"test-time smoothing: {args.points} points, n0={args.n0}, n={args.n}, batch={args.batch_size}, "
          f"sigma={args.sigma}, torch threads={torch.get_num_threads()}, cpu count={os.cpu_count()}, "
          f"{platform.machine()}")
    print(f"{'model':<15}{'certkit pt/s':>13}{'Cohen loop pt/s':>16}{'ceiling pt/s':>13}"
          f"{'speed-up':>10}{'% ceiling':>11}{'ref % ceil.':>12}{'% fwd+noise':>13}")
    figures = []
    for name in args.models:
        f = bench_one(name, args, data)
        figures.append(f)
        print(f"{name:<15}{f['certkit_points_per_s']:>13.1f}{f['reference_points_per_s']:>16.1f}"
              f"{f['ceiling_points_per_s']:>13.1f}{f['speedup_vs_reference']:>9.2f}x"
              f"{100 * f['fraction_of_ceiling']:>10.1f}%{100 * f['reference_fraction_of_ceiling']:>11.1f}%"
              f"{100 * f['fraction_of_noise_ceiling']:>12.1f}%")
    print("targets: speed-up >= 2x the Cohen-style loop, >= 80% of the ceiling (raw batched forward, no noise/counting);"
          " 'ref % ceil.' shows how much room the reference leaves; '% fwd+noise': vs forward plus one Gaussian draw"
          " per row")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "results": figures}, fh, indent=2)


if __name__ == "__main__":
    main()
