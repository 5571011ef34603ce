"""Benchmark: training a training-time smoothing ensemble (RAB, Mode B) with joblib, side by side in one run.

1. Speed-up: wall time of :func:`certkit.runs.ensemble_train.train_ensemble` on the same members with
   ``n_jobs=2`` against ``n_jobs=1`` (fresh run directories each), measured
   - *cold*: the first ``n_jobs=2`` call of the process, which starts the loky worker processes (each
     imports torch and certkit, loads the data, and pays torch's one-off optimizer set-up);
   - *warm*: the same call again (loky reuses its workers and their cached data), which is what a long
     ensemble (M = 100..1000 members) sees after its first few seconds.
   ``n_jobs=1`` trains in this process after a warm-up. The members of both runs are checked bit-identical.
2. Scaling table: training time for M in (2, 4, 8) members and for the full and half digits training set
   (the half set is written to a temporary ``.npz``), with ``n_jobs=1`` and ``n_jobs=2`` (warm).

Target (issue): speed-up >= 1.6x with n_jobs=2 on 2 cores. Every member trains with one torch thread
(``threads_per_member=1``), so ``n_jobs=1`` uses one core.

Run: ``.venv/bin/python benchmarks/bench_ensemble_training.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from certkit.backdoor.data import load_digits
from certkit.runs.ensemble_train import EnsembleSpec, member_name, train_ensemble


def _timed(spec: EnsembleSpec, root: Path, label: str, n_jobs: int) -> tuple[float, object]:
    out = root / f"{label}-j{n_jobs}"
    t0 = time.perf_counter()
    run = train_ensemble(spec, out, n_jobs=n_jobs, progress=False)
    return time.perf_counter() - t0, run


def _member_seconds(run, members: int) -> float:
    """Mean wall time of one member's training as recorded by its worker (excludes scheduling)."""
    t = run.manifest["timings"]
    return float(np.mean([t[f"train/{member_name(m)}"] for m in range(members)]))


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    acc = 0
    for i in range(n):
        acc += i * i
    return time.perf_counter() - t0


def machine_parallelism(n: int = 10_000_000) -> float:
    """How many cores this machine gives us right now: 2 * t(one spin loop) / t(two loops at once in two
    forked processes). About 2 on an idle 2-core machine, about 1 when another job keeps a core busy."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_spin, [10, 10])
        one = min(pool.map(_spin, [n]), pool.map(_spin, [n]))[0]
        t0 = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        return 2 * one / (time.perf_counter() - t0)


def _identical(run_a, run_b, members: int) -> bool:
    for m in range(members):
        a, b = run_a.load_state_dict(member_name(m)), run_b.load_state_dict(member_name(m))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def _half_digits(root: Path, seed: int) -> str:
    d = load_digits(seed=seed)
    n = len(d.train) // 2
    path = root / "digits-half.npz"
    np.savez(
        path,
        x_train=d.train.x[:n].numpy(),
        y_train=d.train.y[:n].numpy(),
        x_test=d.test.x.numpy(),
        y_test=d.test.y.numpy(),
    )
    return f"npz:{path}"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--members", type=int, default=8, help="members of the speed-up comparison (default 8)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per member (default 20)")
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--model", default="digits-cnn")
    p.add_argument("--table-members", type=int, nargs="+", default=[2, 4, 8], help="M values of the table")
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved n_jobs=1 / n_jobs=2 pairs (best is reported)"
    )
    p.add_argument("--no-table", action="store_true", help="only the speed-up comparison")
    args = p.parse_args()

    print(
        f"# certkit ensemble training benchmark: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    )
    ceiling = machine_parallelism()
    print(
        f"machine parallelism now (two pure-Python loops in two processes vs one): {ceiling:.2f}x "
        "(the ceiling of any n_jobs=2 speed-up at this moment)"
    )
    base = dict(model=args.model, sigma=args.sigma, epochs=args.epochs, poison_rate=0.02, seed=0)
    spec = EnsembleSpec(members=args.members, **base)
    with tempfile.TemporaryDirectory(prefix="certkit-bench-") as tmp:
        root = Path(tmp)
        # 1. speed-up
        t_cold, run_cold = _timed(spec, root, "cold", 2)
        cold_member = _member_seconds(run_cold, spec.members)
        train_ensemble(
            EnsembleSpec(members=1, **{**base, "epochs": 1}), root / "warmup", n_jobs=1, progress=False
        )
        rows, same = [], True
        for r in range(args.repeats):
            t1, run1 = _timed(spec, root, f"speed{r}", 1)
            t2, run2 = _timed(spec, root, f"speed{r}", 2)
            same = same and _identical(run1, run2, spec.members) and _identical(run1, run_cold, spec.members)
            rows.append(
                (
                    t1,
                    t2,
                    _member_seconds(run1, spec.members),
                    _member_seconds(run2, spec.members),
                    machine_parallelism(),
                )
            )
        k = spec.members
        print(
            f"\n## n_jobs=2 vs n_jobs=1: digits, {args.model}, M={k}, {args.epochs} epochs, fresh run "
            f"directories, {args.repeats} interleaved repeats"
        )
        print(
            "| repeat | n_jobs=1 wall [s] | n_jobs=2 wall [s] | speed-up | one member, n_jobs=1 / 2 [s] | "
            "machine parallelism after |"
        )
        print("|---|---|---|---|---|---|")
        for r, (t1, t2, m1, m2, par) in enumerate(rows):
            print(f"| {r + 1} | {t1:.2f} | {t2:.2f} | {t1 / t2:.2f}x | {m1:.2f} / {m2:.2f} | {par:.2f}x |")
        b1, b2 = min(r[0] for r in rows), min(r[1] for r in rows)
        print(f"| best | {b1:.2f} | {b2:.2f} | **{b1 / b2:.2f}x** | | |")
        print(
            f"| n_jobs=2 cold (first call: starts the loky workers) | | {t_cold:.2f} | {b1 / t_cold:.2f}x | "
            f"- / {cold_member:.2f} | {ceiling:.2f}x before |"
        )
        print(f"members bit-identical across n_jobs=1, n_jobs=2 (cold and warm): {same}")

        if args.no_table:
            return
        # 2. scaling table
        datasets = [
            ("digits (full)", "digits", len(load_digits().train)),
            ("digits (half)", _half_digits(root, 0), len(load_digits().train) // 2),
        ]
        for _, ds, _ in datasets:  # warm both: data cache in the workers and in this process
            warm = EnsembleSpec(members=2, dataset=ds, **{**base, "epochs": 1})
            train_ensemble(warm, root / f"warm-{abs(hash(ds))}-1", n_jobs=1, progress=False)
            train_ensemble(warm, root / f"warm-{abs(hash(ds))}-2", n_jobs=2, progress=False)
        print(
            f"\n## training time vs ensemble size and training-set size ({args.epochs} epochs, warm workers)"
        )
        print(
            "| training set | n_train | M | n_jobs=1 [s] | n_jobs=2 [s] | speed-up | s/member (n_jobs=1) | "
            "machine parallelism before |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, ds, n in datasets:
            for m in args.table_members:
                s = EnsembleSpec(members=m, dataset=ds, **base)
                par = machine_parallelism()
                key = f"tab-{abs(hash(ds))}-{m}"
                a, _ = _timed(s, root, key, 1)
                b, _ = _timed(s, root, key, 2)
                print(
                    f"| {label} | {n} | {m} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {a / m:.2f} | {par:.2f}x |"
                )
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.2f}; machine parallelism now: "
        f"{machine_parallelism():.2f}x"
    )


if __name__ == "__main__":
    main()
