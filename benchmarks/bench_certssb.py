"""Benchmark: does sample-specific sigma (Cert-SSB / DDRS) certify more than a fixed sigma at equal base sigma?

Measures, on the embedded digits data (digits-cnn, BadNets), certkit's two smoothing modes side by side with
the library as it is (sound sample-specific noise: a triggered query's sigma is optimised on ``x + t`` itself,
storage-update certificates evaluated transductively in test order, and Mode B's guarantees that depend on
the data-chosen training scales reported only as ``*_conditional_on_scales``):

* **Mode A** (test-time smoothing of one noise-trained model, :mod:`certkit.runs.single`): one model per
  seed trained with Gaussian augmentation at ``--sigma-a``, certified twice with Cohen's CERTIFY (``n0``,
  ``n``, ``alpha``): ``fixed`` at ``--sigma-a``, and ``sample-specific`` with per-point sigmas from
  ``--sigma-steps`` steps of SGA started at ``--sigma-a``, followed by the storage update. Radii are in each
  point's own sigma units after the storage update (transductive, order-dependent).
* **Mode B** (training-time smoothing ensembles, :mod:`certkit.runs.ensemble_train` /
  :mod:`certkit.runs.ensemble_certify`): per seed and base sigma, a RAB ensemble (``noise="fixed"``) and a
  Cert-SSB ensemble (``noise="sample-specific"``, same ``--members``/``--epochs-b``), both certified with
  the same ``alpha``. ``certified_accuracy``/``acr`` are in test-sigma units (a test-input perturbation with
  the deployed members fixed) in both cases; the sample-specific ensemble's joint/poisoning figures are
  conditional on the data-chosen training scales and are recorded under their ``*_conditional_on_scales``
  names, never compared as certificates.

For each mode and sigma mode it prints a Markdown table of certified accuracy at radii 0, 0.1, 0.25, 0.5,
0.75, 1 and ACR as mean +- std (sample std, ddof=1) over the seeds, the mean sigma, the trigger figures and
the wall time, and writes every per-seed value to ``<out>/results.json``.

Trigger figures: ``CTR`` is the library's certified trigger robustness, whose meaning differs by sigma mode
(fixed: clean twin certified correct beyond ``||t||``; sample-specific Mode A: triggered query certified
correct by the deployed memory classifier, triggered-first store; Mode B fixed: certified beyond the joint
poison+trigger norm; Mode B sample-specific: none, only conditional on the scales). ``TCA`` (triggered
certified accuracy) is the same quantity for every row: the fraction of non-target triggered queries whose
deployed answer at ``x + t`` is the true label with a certificate (radius >= 0, no abstention).

Resumable: every run directory lives under ``--out`` and its name carries the settings that define it, so a
rerun with the same flags reuses the trained models, sigmas, votes and certificates and takes seconds. The
reported wall time of a step is the longest seen for it with identical settings (the computing run; kept in
``<out>/walltimes.json``). ``results.json`` holds the steps of the latest invocation.

Threads: torch and numba both run on ``--threads`` (default 1; the machine is shared). numba's ``omp``
threading layer shares the OpenMP runtime with torch, so certkit's first parallel numba kernel would otherwise
raise torch's intra-op thread count to numba's for the rest of the process (see ``main``).

Run (CPU)::

    .venv/bin/python benchmarks/bench_certssb.py --seeds 0 1 2 --out runs/bench-certssb

``--help`` lists the other settings (``--max-points``, ``--sigma-steps``, ``--members``, ``--modes A B``...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path and its purifiers.py would shadow the repository's
# ``purifiers`` package that certkit.runs imports: drop it before importing certkit.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from certkit.runs.ensemble_certify import EnsembleCertifyConfig, certify_ensemble_run  # noqa: E402
from certkit.runs.ensemble_train import EnsembleSpec, train_ensemble  # noqa: E402
from certkit.runs.single import CertifyConfig, TrainConfig, certify_run, model_name_for, train  # noqa: E402

RADII: tuple[str, ...] = ("0", "0.1", "0.25", "0.5", "0.75", "1")
SIGMA_MODES: tuple[str, ...] = ("fixed", "sample-specific")
Log = Callable[[str], None]


def _printer(prefix: str) -> Log:
    def log(msg: str) -> None:
        print(f"{prefix} {msg}", flush=True)

    return log


def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


# ------------------------------------------------------------------------------------------------ Mode A


def run_mode_a(seed: int, args: argparse.Namespace, log: Log) -> list[dict[str, Any]]:
    """Train (or reuse) the noise-trained model of ``seed`` and certify it in both sigma modes."""
    sigma = float(args.sigma_a)
    out = Path(args.out) / "A" / f"sigma-{sigma:g}_E{args.epochs_a}" / f"seed-{seed}"
    t0 = time.perf_counter()
    run = train(TrainConfig(seed=seed, noise_sigmas=(sigma,), epochs=args.epochs_a), out, device="cpu",
                progress=False, log=log)
    t_train = time.perf_counter() - t0
    log(f"trained/reused model in {t_train:.1f} s")
    name = model_name_for(sigma)
    cfg = CertifyConfig(pairs=((name, sigma),), n0=args.n0, n=args.n, alpha=args.alpha, seed=seed,
                        max_points=args.max_points, sigma_modes=SIGMA_MODES, sigma_steps=args.sigma_steps)
    t1 = time.perf_counter()
    rows = certify_run(run, cfg, device="cpu", progress=False, log=log)
    log(f"certified both sigma modes in {time.perf_counter() - t1:.1f} s")
    timings = run.manifest["timings"]
    train_s = float(timings.get(f"train/{name}", t_train))  # recorded once, when the model was trained
    points = pd.read_csv(run.file("points.csv"))
    target = int(run.config["train"]["target"])
    settings = {"sigma": sigma, "epochs": args.epochs_a, "poison_rate": run.config["train"]["poison_rate"],
                "n0": args.n0, "n": args.n, "alpha": args.alpha, "max_points": args.max_points}
    results = []
    for row in rows:
        mode = row["sigma_mode"]
        sel = points[(points["sigma_mode"] == mode) & (points["model"] == name)]
        clean, trig = sel[sel["set"] == "clean"], sel[sel["set"] == "triggered"]
        trig = trig[trig["label"] != target]
        answered = clean[clean["prediction"] >= 0]
        certify_s = float(timings[f"certify/{name}/sigma-{sigma:g}/{mode}"])
        results.append({
            "mode": "A", "sigma_mode": mode, "base_sigma": sigma, "seed": seed,
            "settings": {**settings, **({"sigma_steps": args.sigma_steps} if mode != "fixed" else {})},
            "certified_accuracy": {r: row["certified_accuracy"][r] for r in RADII},
            "acr": row["acr"],
            "smoothed_clean_accuracy": row["smoothed_clean_accuracy"],
            "abstain_rate": row["abstain_rate"],
            "sigma_mean": row["sigma_mean"],
            "sigma_max": float(clean["sigma"].max()),
            "p_lower_mean": float(answered["p_lower"].mean()) if len(answered) else float("nan"),
            "ctr": _nan(row["certified_trigger_robustness"]),
            "ctr_meaning": row["certified_trigger_robustness_meaning"],
            "tca": float((trig["prediction"] == trig["label"]).mean()) if len(trig) else float("nan"),
            "smoothed_asr": row["smoothed_asr"],
            "storage_counts": None if row["storage"] is None else row["storage"]["counts"],
            "storage_triggered_counts": None if row["storage"] is None else row["storage"]["triggered_counts"],
            "n_clean": row["n_clean"], "n_triggered": row["n_triggered"],
            "wall_train_s": train_s, "wall_certify_s": certify_s,
            "run_dir": str(out),
        })
        if mode != "fixed":  # pre-storage figures of the same sigmas (diagnostic: what the store changes)
            pre = pd.read_csv(run.file(f"certificates/{name}__ssb__sigma-{sigma:g}__clean.csv"))
            ok = (pre["prediction"] == pre["label"]).to_numpy()
            rad = pre["radius"].to_numpy()
            results[-1]["before_storage"] = {
                "certified_accuracy": {r: float(np.mean(ok & (rad >= float(r)))) for r in RADII},
                "acr": float(np.mean(rad * ok))}
    return results


# ------------------------------------------------------------------------------------------------ Mode B


def run_mode_b(seed: int, sigma: float, mode: str, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Train (or reuse) one ensemble (fixed: RAB; sample-specific: Cert-SSB scales) and certify it."""
    extra: dict[str, Any] = {} if mode == "fixed" else {"noise": "sample-specific", "sigma_steps": args.sigma_steps}
    spec = EnsembleSpec(members=args.members, sigma=sigma, epochs=args.epochs_b, poison_rate=args.poison_rate_b,
                        seed=seed, **extra)
    tag = "fixed" if mode == "fixed" else f"ssb-steps{args.sigma_steps}"
    out = (Path(args.out) / "B" / f"sigma-{sigma:g}_M{args.members}_E{args.epochs_b}_p{args.poison_rate_b:g}"
           / tag / f"seed-{seed}")
    t0 = time.perf_counter()
    run = train_ensemble(spec, out, n_jobs=args.n_jobs, device="cpu", progress=False)
    t_train = time.perf_counter() - t0
    log(f"trained/reused {args.members} members in {t_train:.1f} s")
    t1 = time.perf_counter()
    summary = certify_ensemble_run(run, EnsembleCertifyConfig(alpha=args.alpha, max_points=args.max_points, seed=seed),
                                   device="cpu", progress=False, log=log)
    t_cert = time.perf_counter() - t1
    log(f"certified in {t_cert:.1f} s")
    row = summary["ensemble"]
    timings = run.manifest["timings"]
    target = int(spec.target)
    if mode == "fixed":
        points = pd.read_csv(run.file("points.csv"))
        trig = points[(points["set"] == "triggered") & (points["label"] != target)]
        tca = float((trig["prediction"] == trig["label"]).mean()) if len(trig) else float("nan")
        sigma_mean, sigma_max = sigma, sigma
    else:  # the deployed memory classifier on the triggered queries (triggered-first store)
        tca = _nan(row["certified_trigger_robustness_test_time"])
        sigma_mean, sigma_max = row["test_sigmas"]["mean"], row["test_sigmas"]["max"]
    res: dict[str, Any] = {
        "mode": "B", "sigma_mode": mode, "base_sigma": sigma, "seed": seed,
        "settings": {"members": args.members, "epochs": args.epochs_b, "poison_rate": args.poison_rate_b,
                     "alpha": args.alpha, "max_points": args.max_points, "bound": row["bound"],
                     **({"sigma_steps": args.sigma_steps} if mode != "fixed" else {})},
        "certified_accuracy": {r: row["certified_accuracy"][r] for r in RADII},
        "acr": row["acr"],
        "ensemble_clean_accuracy": row["ensemble_clean_accuracy"],
        "abstain_rate": row["abstain_rate"],
        "sigma_mean": sigma_mean, "sigma_max": sigma_max,
        "ctr": _nan(row["certified_trigger_robustness"]),
        "ctr_test_time": _nan(row["certified_trigger_robustness_test_time"]),
        "tca": tca,
        "ensemble_asr": row["ensemble_asr"],
        "n_clean": row["n_clean"], "n_triggered": row["n_triggered"],
        "wall_train_s": t_train, "wall_certify_s": t_cert,
        "member_train_s_sum": float(sum(v for k, v in timings.items() if k.startswith("train/member-"))),
        "run_dir": str(out),
    }
    if mode != "fixed":
        res["conditional_on_scales"] = {
            k: row[k] for k in ("certified_accuracy_joint_l2_conditional_on_scales",
                                "acr_joint_l2_conditional_on_scales",
                                "certified_trigger_robustness_conditional_on_scales",
                                "certified_trigger_robustness_plain_joint_l2_conditional_on_scales")}
        res["training_scales"] = row["training_scales"]
        res["test_sigmas"] = row["test_sigmas"]
        res["storage_counts"] = row["storage"]["counts"]
        res["storage_triggered_counts"] = row["storage"]["triggered_counts"]
        res["scales_s"] = {k: float(timings[k]) for k in ("train/sigma-reference", "training_sigmas",
                                                          "test_sigmas/clean", "test_sigmas/triggered")
                           if k in timings}
    return res


# ------------------------------------------------------------------------------------------------ report


def _key(r: dict[str, Any]) -> str:
    return json.dumps([r["mode"], r["sigma_mode"], r["base_sigma"], r["seed"], r["settings"]], sort_keys=True)


def _keep_computing_times(results: list[dict[str, Any]], cache_path: Path) -> None:
    """A rerun reuses the run directories and is fast: report the longest wall time seen for each step with
    identical settings (the invocation that computed it). The cache ``walltimes.json`` only grows."""
    cache: dict[str, dict[str, float]] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for r in results:
        seen = cache.setdefault(_key(r), {})
        for k in ("wall_train_s", "wall_certify_s"):
            r[k] = seen[k] = max(float(r[k]), float(seen.get(k, 0.0)))
    cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))


def _ms(values: Sequence[float], digits: int = 3) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "n/a"
    mean = statistics.fmean(v)
    if len(v) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def _column(rows: Sequence[dict[str, Any]], f: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    vals = [float(f(r)) for r in rows]
    finite = [v for v in vals if not math.isnan(v)]
    return {"mean": statistics.fmean(finite) if finite else float("nan"),
            "std": statistics.stdev(finite) if len(finite) > 1 else float("nan"), "per_seed": vals}


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group the per-seed rows by (mode, base sigma, sigma mode): mean, sample std and the per-seed values."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["mode"], r["base_sigma"], r["sigma_mode"]), []).append(r)
    out = []
    for (mode, sigma, sm), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], SIGMA_MODES.index(kv[0][2]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        col = partial(_column, rs)
        agg: dict[str, Any] = {"mode": mode, "base_sigma": sigma, "sigma_mode": sm, "seeds": [r["seed"] for r in rs],
                               "certified_accuracy": {k: col(lambda r, k=k: r["certified_accuracy"][k]) for k in RADII},
                               "acr": col(lambda r: r["acr"]), "sigma_mean": col(lambda r: r["sigma_mean"]),
                               "ctr": col(lambda r: r["ctr"]), "tca": col(lambda r: r["tca"]),
                               "wall_train_s": col(lambda r: r["wall_train_s"]),
                               "wall_certify_s": col(lambda r: r["wall_certify_s"]),
                               "abstain_rate": col(lambda r: r["abstain_rate"]),
                               "storage_changed": col(lambda r: _changed(r.get("storage_counts")))}
        if mode == "B":
            agg["ctr_test_time"] = col(lambda r: r["ctr_test_time"])
        if sm != "fixed" and mode == "B":
            agg["acr_joint_l2_conditional_on_scales"] = col(
                lambda r: r["conditional_on_scales"]["acr_joint_l2_conditional_on_scales"])
        if sm != "fixed" and mode == "A":
            agg["acr_before_storage"] = col(lambda r: r["before_storage"]["acr"])
        if mode == "A":
            agg["p_lower_mean"] = col(lambda r: r["p_lower_mean"])
        out.append(agg)
    return out


def _changed(counts: dict[str, int] | None) -> float:
    """Clean points whose label or radius the storage update changed (NaN for fixed sigma: no store)."""
    if counts is None:
        return float("nan")
    return float(sum(counts[k] for k in ("n_aligned", "n_trimmed", "n_maximised", "n_covered_abstentions")))


def diagnostics_table(agg: list[dict[str, Any]]) -> str:
    """Why the rows differ: abstentions, the vote margin, what the store changed, the conditional ACR."""
    head = ["mode", "sigma mode", "base σ", "abstain", "mean p_A lower (A)", "store changes",
            "ACR before store (A)", "joint-l2 ACR, conditional on scales (B)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in agg:
        cells = [a["mode"], a["sigma_mode"], f"{a['base_sigma']:g}"]
        cells += [_ms(a[k]["per_seed"], 1 if k == "storage_changed" else 3) if k in a else ""
                  for k in ("abstain_rate", "p_lower_mean", "storage_changed", "acr_before_storage",
                            "acr_joint_l2_conditional_on_scales")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(agg: list[dict[str, Any]]) -> str:
    """The README table: mean ± std over the seeds."""
    head = (["mode", "sigma mode", "base σ", "mean σ"] + [f"CA@{r}" for r in RADII]
            + ["ACR", "CTR", "TCA", "wall train+certify [s]"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in agg:
        wall = [t + c for t, c in zip(a["wall_train_s"]["per_seed"], a["wall_certify_s"]["per_seed"])]
        cells = [a["mode"], a["sigma_mode"], f"{a['base_sigma']:g}", _ms(a["sigma_mean"]["per_seed"], 3)]
        cells += [_ms(a["certified_accuracy"][r]["per_seed"]) for r in RADII]
        cells += [_ms(a["acr"]["per_seed"]), _ms(a["ctr"]["per_seed"]), _ms(a["tca"]["per_seed"]),
                  f"{statistics.fmean(wall):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", choices=("A", "B"), default=["A", "B"])
    p.add_argument("--out", default="runs/bench-certssb", help="run directories and results.json (resumed)")
    p.add_argument("--max-points", type=int, default=540, help="test points certified per seed (540: all of digits)")
    p.add_argument("--sigma-steps", type=int, default=1000, help="SGA steps of the sample-specific sigmas")
    p.add_argument("--members", type=int, default=50, help="Mode B ensemble size M")
    p.add_argument("--epochs-b", type=int, default=5, help="Mode B epochs per member")
    p.add_argument("--sigmas-b", type=float, nargs="+", default=[0.25], help="Mode B base sigmas")
    p.add_argument("--poison-rate-b", type=float, default=0.02)
    p.add_argument("--n-jobs", type=int, default=1, help="Mode B member training processes")
    p.add_argument("--sigma-a", type=float, default=0.25, help="Mode A training and base sigma")
    p.add_argument("--epochs-a", type=int, default=30)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=1, help="torch and numba threads of this process")
    args = p.parse_args(argv)
    # numba's "omp" threading layer shares the OpenMP runtime with torch: the first parallel numba kernel
    # (certkit's Clopper-Pearson bounds) sets the OpenMP thread count, and with it torch's intra-op threads,
    # to numba's count. Keep both at --threads, else every later torch op in this process silently runs on
    # numba's thread count (measured here: the sigma ascent 20x slower on the shared 2-core machine).
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = [("A", s, None, None) for s in args.seeds if "A" in args.modes]
    steps += [("B", s, sg, m) for sg in args.sigmas_b for s in args.seeds for m in SIGMA_MODES if "B" in args.modes]
    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for i, (mode, seed, sigma, sm) in enumerate(steps, 1):
        label = f"[{i}/{len(steps)} mode {mode} seed {seed}" + ("" if sigma is None else f" σ={sigma:g} {sm}") + "]"
        print(f"{label} start (elapsed {time.perf_counter() - t_all:.0f} s)", flush=True)
        t0 = time.perf_counter()
        if mode == "A":
            results += run_mode_a(seed, args, _printer(label))
        else:
            assert sigma is not None and sm is not None
            results.append(run_mode_b(seed, sigma, sm, args, _printer(label)))
        print(f"{label} done in {time.perf_counter() - t0:.1f} s", flush=True)
    total = time.perf_counter() - t_all
    path = out / "results.json"
    _keep_computing_times(results, out / "walltimes.json")
    agg = aggregate(results)
    record = {
        "benchmark": "bench_certssb", "argv": vars(args), "this_invocation_wall_s": total,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
                    "numba_threading_layer": numba.threading_layer()},
        "aggregate": agg, "per_seed": results,
    }
    path.write_text(json.dumps(record, indent=1, default=float))
    print()
    print(markdown_table(agg))
    print()
    print(diagnostics_table(agg))
    print(f"\nseeds {args.seeds}; this invocation {total:.0f} s; per-seed values in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
