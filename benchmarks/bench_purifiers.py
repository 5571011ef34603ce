"""Benchmark: every registered purification method on backdoored digits (BadNets and Blended).

For each attack, a ``digits-bn-cnn`` (BatchNorm, so BN-based methods run too) is trained on the poisoned
digits training set (10% poisoned, target 0; the run's TrainConfig defaults otherwise). The defender gets
20% of the training set (251 images, ~25 per class), drawn with a fixed seed among the *unpoisoned* training
samples, exactly as ``certkit purify`` draws it. Every method in ``purifiers.available()`` (so methods added
later are included) runs at its documented default budget (``--budget digits``: the digits-scale settings
of ``certkit compare --preset digits``; ``--fast``: its ``fast_params`` smoke budget),
seed 0, on the CPU; methods that select on a validation split get one carved from the defender's data.
Reported on the digits test split: CA / ASR / RA before -> after, DER and the purification wall time.

The table is printed and written as Markdown to ``benchmarks/purifiers_results.md`` (``--budget digits``:
``purifiers_results_digits.md``; ``--fast``: ``purifiers_results_fast.md``; ``--out`` to change).

Run: ``.venv/bin/python benchmarks/bench_purifiers.py`` (full; minutes to an hour on 2 CPU cores) or
``.venv/bin/python benchmarks/bench_purifiers.py --fast`` (smoke run, about a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

# this script is named like the `purifiers` package: keep its own folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import purifiers  # noqa: E402
from certkit.backdoor.models import build_model  # noqa: E402
from certkit.backdoor.training import train_model  # noqa: E402
from certkit.runs.purify import draw_clean_indices  # noqa: E402
from certkit.runs.single import TrainConfig, prepare  # noqa: E402
from purifiers._common import split_validation  # noqa: E402

HERE = Path(__file__).resolve().parent
CLEAN_FRACTION = 0.2
ATTACKS = ("badnets", "blended")


def _backdoored(attack: str, epochs: int, seed: int):
    cfg = TrainConfig(dataset="digits", model="digits-bn-cnn", attack=attack, poison_rate=0.1, target=0,
                      epochs=epochs, seed=seed)
    exp = prepare(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=exp.splits.num_classes, input_shape=exp.splits.input_shape,
                        mean=exp.splits.mean, std=exp.splits.std)
    train_model(model, exp.poisoned.dataset, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                device="cpu", progress=False)
    excluded = np.union1d(exp.poisoned.poison_indices, exp.poisoned.noise_indices)
    clean = exp.splits.train.subset(draw_clean_indices(len(exp.splits.train), excluded, CLEAN_FRACTION, seed))
    return model.eval(), exp, clean


def _params(name: str, budget: str) -> dict:
    """The parameters of one method under a budget: ``default`` (the documented official defaults), ``digits``
    (the digits-scale settings of ``certkit compare --preset digits``) or ``fast`` (smoke run)."""
    if budget == "fast":
        return purifiers.fast_params(name)
    if budget == "digits":
        from certkit.runs.compare.grid import purifier_budget
        from certkit.runs.compare.spec import preset

        return purifier_budget(preset("digits"), name)
    return {}


def run(methods: list[str], *, budget: str, epochs: int, seed: int) -> list[dict]:
    rows: list[dict] = []
    for attack in ATTACKS:
        t0 = time.perf_counter()
        model, exp, clean = _backdoored(attack, epochs, seed)
        print(f"[{attack}] backdoored digits-bn-cnn trained in {time.perf_counter() - t0:.1f} s; "
              f"defender: {len(clean)} clean images", flush=True)
        for name in methods:
            params = _params(name, budget)
            purifier = purifiers.make(name, **params, device="cpu")
            fit, val = clean, None
            if type(purifier).tags.uses_validation:
                fit, val = split_validation(clean, type(purifier).validation_fraction, seed)
            row = {"attack": attack, "method": name, "params": params}
            try:
                t1 = time.perf_counter()
                purified = purifier.purify(model, fit, validation=val, seed=seed)
                runtime = time.perf_counter() - t1
                rep = purifiers.evaluate(model, purified, exp.splits.test, exp.triggered, device="cpu",
                                         runtime_s=runtime)
                row.update(rep.to_dict())
            except Exception as exc:  # one failing method must not hide the others' results
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['attack']:<8} {r['method']:<10} ERROR {r['error']}"
    return (f"{r['attack']:<8} {r['method']:<10} CA {r['ca_before']:.3f}->{r['ca_after']:.3f}  "
            f"ASR {r['asr_before']:.3f}->{r['asr_after']:.3f}  RA {r['ra_before']:.3f}->{r['ra_after']:.3f}  "
            f"DER {r['der']:.3f}  {r['runtime_s']:.1f} s")


_BUDGET_WORDS = {"fast": "fast smoke budgets (fast_params)", "default": "official default budgets",
                 "digits": "digits-scale settings of the compare preset (certkit.runs.compare.grid.PRESET_PURIFIER_PARAMS)"}


def markdown(rows: list[dict], *, budget: str, epochs: int, seed: int, wall: float) -> str:
    lines = [
        f"Purifiers on digits ({_BUDGET_WORDS[budget]}), "
        f"digits-bn-cnn trained {epochs} epochs on 10% poisoned data (target 0), defender data "
        f"{CLEAN_FRACTION:.0%} of the training set (unpoisoned), seed {seed}; {platform.machine()} CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; total {wall:.0f} s.",
        "",
        "| attack | method | CA before | CA after | ASR before | ASR after | RA before | RA after | DER | time [s] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['attack']} | {r['method']} | error: {r['error'][:80]} | | | | | | | |")
        else:
            lines.append(f"| {r['attack']} | {r['method']} | {r['ca_before']:.3f} | {r['ca_after']:.3f} | "
                         f"{r['asr_before']:.3f} | {r['asr_after']:.3f} | {r['ra_before']:.3f} | {r['ra_after']:.3f} "
                         f"| {r['der']:.3f} | {r['runtime_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="each method's fast_params smoke budget, 10 training epochs "
                    "(same as --budget fast)")
    ap.add_argument("--budget", choices=("default", "digits", "fast"), default="default",
                    help="default: official defaults; digits: the compare preset's digits-scale settings")
    ap.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all registered)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs of the backdoored model "
                    "(default: 30, or 10 with --fast)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None, help="Markdown output (default: benchmarks/purifiers_results[_fast].md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods or list(purifiers.available())
    unknown = sorted(set(methods) - set(purifiers.available()))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; available: {', '.join(purifiers.available())}")
    budget = "fast" if args.fast else args.budget
    epochs = args.epochs or (10 if budget == "fast" else 30)
    t0 = time.perf_counter()
    rows = run(methods, budget=budget, epochs=epochs, seed=args.seed)
    text = markdown(rows, budget=budget, epochs=epochs, seed=args.seed, wall=time.perf_counter() - t0)
    suffix = {"default": "", "digits": "_digits", "fast": "_fast"}[budget]
    out = Path(args.out) if args.out else HERE / f"purifiers_results{suffix}.md"
    out.write_text(text)
    print()
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
