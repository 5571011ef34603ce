"""Benchmark: ensemble vote collection (Mode B) and how certification cost grows with M and N.

1. Throughput: :meth:`SmoothedEnsemble.votes` on an ensemble run directory (members loaded from disk with
   hash checks, one at a time, model-major) in forwards per second, against the raw batched forward
   throughput of one member on pre-made inputs (the ceiling). Target (issue 3): >= 80%.
2. Scaling: vote collection + certification time for several numbers of members M and test-set sizes N.

The members are freshly initialised ``digits-cnn`` networks saved into a real ensemble run directory: the
cost of a forward pass does not depend on the weights, so no training is needed to time vote collection
(training is timed by ``bench_ensemble_training.py``).

Run: ``.venv/bin/python benchmarks/bench_ensemble_votes.py``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from certkit.backdoor.models import build_model
from certkit.certify.ensemble import certify_votes
from certkit.runs.ensemble_train import EnsembleSpec, load_ensemble, member_name
from certkit.runs.rundir import RunDirectory


def make_run(out: Path, members: int, sigma: float = 0.5) -> RunDirectory:
    """An ensemble run directory with ``members`` initialised (untrained) members."""
    spec = EnsembleSpec(dataset="digits", members=members, sigma=sigma)
    run = RunDirectory.create(out, {"ensemble": spec.to_dict()}, kind="ensemble")
    for m in range(members):
        torch.manual_seed(m)
        model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
        run.save_model(member_name(m), model, model.certkit_spec)
    return run


def raw_forward_rate(batch_size: int, n: int, repeats: int = 3) -> float:
    """Forwards per second of one member on pre-made batches (best of ``repeats``)."""
    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8)).eval()
    x = torch.rand(n, 1, 8, 8)
    best = float("inf")
    with torch.inference_mode():
        model(x[:batch_size])
        for _ in range(repeats):
            t0 = time.perf_counter()
            for s in range(0, n, batch_size):
                model(x[s:s + batch_size]).argmax(1)
            best = min(best, time.perf_counter() - t0)
    return n / best


def time_votes(run: RunDirectory, n: int, batch_size: int) -> tuple[float, float]:
    """(seconds for votes, seconds for certification from the votes) on ``n`` random inputs."""
    ens = load_ensemble(run, batch_size=batch_size, device="cpu", progress=False)
    x = torch.rand(n, 1, 8, 8)
    t0 = time.perf_counter()
    votes = ens.votes(x)
    t_votes = time.perf_counter() - t0
    t0 = time.perf_counter()
    certify_votes(votes, sigma=ens.sigma, alpha=1e-3)
    return t_votes, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--members", type=int, default=50, help="M for the throughput measurement (default 50)")
    p.add_argument("--points", type=int, default=5000, help="inputs for the throughput measurement (default 5000)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--scaling-members", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument("--scaling-points", type=int, nargs="+", default=[500, 2000, 8000])
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp) / "run", max(args.members, *args.scaling_members))
        time_votes(run, 64, args.batch_size)  # warm-up (numba compile of the bounds)
        ceiling = raw_forward_rate(args.batch_size, args.points)
        sub = make_run(Path(tmp) / "thr", args.members)
        t_votes, _ = time_votes(sub, args.points, args.batch_size)
        rate = args.members * args.points / t_votes
        print(f"vote collection: M={args.members}, N={args.points}, batch={args.batch_size}, "
              f"torch threads={torch.get_num_threads()}")
        print(f"  SmoothedEnsemble.votes (loads + hash-checks each member): {rate:,.0f} forwards/s")
        print(f"  raw batched forward of one member (ceiling):               {ceiling:,.0f} forwards/s")
        print(f"  fraction of ceiling: {100 * rate / ceiling:.1f}% (target >= 80%)")
        print("\nscaling (votes + certification, seconds):")
        print(f"{'M':>6}{'N':>8}{'votes [s]':>12}{'certify [s]':>13}{'per member-point [us]':>24}")
        for m in args.scaling_members:
            runm = make_run(Path(tmp) / f"m{m}", m)
            for n in args.scaling_points:
                tv, tc = time_votes(runm, n, args.batch_size)
                print(f"{m:>6}{n:>8}{tv:>12.3f}{tc:>13.4f}{1e6 * tv / (m * n):>24.2f}")


if __name__ == "__main__":
    main()
