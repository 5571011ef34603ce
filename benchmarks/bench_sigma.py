"""Benchmark: sample-specific sigma optimisation (``optimize_sigma``) throughput vs the model's raw throughput.

On digits-cnn and the digits test set (540 inputs), times :func:`certkit.certify.sigma.optimize_sigma` in
``input-steps per second`` (one input advanced by one SGA step) and compares it with the ceiling: the raw
throughput of the same model on batches of the same number of rows, on pre-made inputs,

* forward only (``torch.inference_mode``) for the released Cert-SSB update (``detach_model=True``) and for
  Mode B (one member forward per step with ``draws=1``);
* forward + backward to the inputs (parameters frozen) for the DDRS update (``detach_model=False``).

With ``draws = d`` every step forwards ``d`` noisy copies per input, so the ceiling in input-steps per
second is the rows-per-second ceiling divided by ``d``. The model is trained for a few epochs first (the
timings hardly depend on the weights; training only makes the printed sigma growth meaningful).

Run: ``.venv/bin/python benchmarks/bench_sigma.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import torch

from certkit.backdoor.data import load_digits
from certkit.backdoor.models import build_model
from certkit.backdoor.training import train_model
from certkit.certify.sigma import DEFAULT_STEPS, optimize_sigma


def _ceiling(model: torch.nn.Module, shape: tuple[int, ...], rows: int, reps: int, backward: bool) -> float:
    """Rows per second of forward (or forward + backward to the inputs) on a pre-made batch (best of 3)."""
    batch = torch.rand((rows, *shape))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    best = float("inf")
    try:
        for rep in range(3):  # first repetition = warm-up
            t0 = time.perf_counter()
            for _ in range(reps):
                if backward:
                    u = batch.clone().requires_grad_(True)
                    out = torch.softmax(model(u).double(), 1).max(1).values.sum()
                    torch.autograd.grad(out, u)
                else:
                    with torch.inference_mode():
                        torch.softmax(model(batch).double(), 1).topk(2, dim=1)
            if rep:
                best = min(best, time.perf_counter() - t0)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return reps * rows / best


def bench_case(name: str, target: object, x: torch.Tensor, args: argparse.Namespace, *, detach: bool, draws: int,
               ceiling: Callable[[], float], test_noise: list | None = None) -> dict:
    """Best of ``args.repeats`` interleaved timings of optimize_sigma and of the ceiling (the machine is
    shared: interleaving and taking the best of each makes the ratio less sensitive to other load)."""
    kw = dict(base_sigma=args.sigma, steps=args.steps, lr=1e-4, draws=draws, detach_model=detach,
              batch_size=args.batch_size, device="cpu", progress=False, test_noise=test_noise)
    optimize_sigma(target, x[:8], **{**kw, "steps": 3})  # warm-up
    best, ceil = float("inf"), 0.0
    for _ in range(args.repeats):
        ceil = max(ceil, ceiling())
        t0 = time.perf_counter()
        res = optimize_sigma(target, x, **kw)
        best = min(best, time.perf_counter() - t0)
    return {"case": name, "detach_model": detach, "draws": draws, "seconds": best,
            "input_steps_per_s": len(x) * args.steps / best, "ceiling_input_steps_per_s": ceil / draws,
            "ceiling_kind": "fwd" if detach else "fwd+bwd", "sigma_mean": float(res.sigma.mean()),
            "sigma_max": float(res.sigma.max()), "sigma_min": float(res.sigma.min())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="SGA steps per input (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the best is kept (default 3)")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per forward (default 256)")
    p.add_argument("--sigma", type=float, default=0.12, help="base sigma (default 0.12)")
    p.add_argument("--draws", type=int, nargs="+", default=[1, 8], help="noise draws per step to time")
    p.add_argument("--members", type=int, default=8, help="Mode B ensemble size (0 skips Mode B)")
    p.add_argument("--train-epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_digits(seed=0)
    shape = tuple(data.test.x.shape[1:])

    def make(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        m = build_model("digits-cnn", num_classes=10, input_shape=shape, mean=data.mean, std=data.std)
        train_model(m, data.train, epochs=args.train_epochs, noise_sigma=args.sigma, seed=seed, device="cpu",
                    progress=False)
        return m.eval()

    model = make(0)
    x = data.test.x
    print(f"sigma SGA on digits-cnn / digits test ({len(x)} inputs), {args.steps} steps, batch {args.batch_size} "
          f"inputs, base sigma {args.sigma}, torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
          f"{platform.machine()}, torch {torch.__version__}")
    rows = []
    for draws in args.draws:
        r = args.batch_size * draws
        reps = max(3, 4000 // r)
        for detach in (True, False):
            rows.append(bench_case("Mode A", model, x, args, detach=detach, draws=draws,
                                   ceiling=lambda r=r, reps=reps, d=detach: _ceiling(model, shape, r, reps, not d)))
    if args.members:
        members = [model] + [make(s) for s in range(1, args.members)]
        gen = torch.Generator().manual_seed(0)
        zs = [torch.randn(shape, generator=gen) for _ in members]
        reps = max(3, 4000 // args.batch_size)
        for detach in (True, False):
            rows.append(bench_case(f"Mode B, M={args.members}", members, x, args, detach=detach, draws=1,
                                   test_noise=zs,
                                   ceiling=lambda d=detach: _ceiling(model, shape, args.batch_size, reps, not d)))
    print(f"| {'case':<13} | {'update':<18} | {'draws':>5} | {'input-steps/s':>13} | {'ceiling':>9} | "
          f"{'% of ceiling':>12} | {'time 540x' + str(args.steps):>11} | sigma mean / max |")
    print("|" + "---|" * 8)
    for f in rows:
        upd = "Cert-SSB (detached)" if f["detach_model"] else "DDRS (through model)"
        print(f"| {f['case']:<13} | {upd:<18} | {f['draws']:>5} | {f['input_steps_per_s']:>13,.0f} | "
              f"{f['ceiling_input_steps_per_s']:>9,.0f} | "
              f"{100 * f['input_steps_per_s'] / f['ceiling_input_steps_per_s']:>11.1f}% | {f['seconds']:>10.2f}s | "
              f"{f['sigma_mean']:.4f} / {f['sigma_max']:.4f} |")
    print("ceiling: raw model throughput on pre-made batches of the same rows (forward + softmax/top-2 for the "
          "detached update, forward + backward to the inputs for DDRS), in input-steps/s (rows/s / draws)")
    a1 = next(f for f in rows if f["case"] == "Mode A" and f["detach_model"] and f["draws"] == 1)
    print(f"default run ({DEFAULT_STEPS} steps, draws 1, detached) on all {len(x)} test inputs: about "
          f"{len(x) * DEFAULT_STEPS / a1['input_steps_per_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
