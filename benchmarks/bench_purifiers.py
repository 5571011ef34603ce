"""Benchmark: every registered purification method on backdoored digits (BadNets and Blended).

For each attack and seed, a ``digits-bn-cnn`` (BatchNorm, so BN-based methods run too) is trained on the poisoned
digits training set (10% poisoned, target 0; the run's TrainConfig defaults otherwise). The defender gets
20% of the training set (251 images, ~25 per class), drawn with the seed among the *unpoisoned* training
samples, exactly as ``certkit purify`` draws it. Every method in ``purifiers.available()`` (so methods added
later are included) runs at its documented default budget (``--budget digits``: the digits-scale settings
of ``certkit compare --preset digits``; ``--fast``: its ``fast_params`` smoke budget), on the CPU; methods
that select on a validation split get one carved from the defender's data; methods that take the target class
(``needs_target``, MESA) get target 0 and methods that work on the poisoned training set (``needs_training_set``,
FCT's D-BR) get it as ``train_data=``, as the comparison grid passes them.
Reported on the digits test split: CA / ASR / RA before -> after, DER and the purification wall time.

``--seeds 0 1 2`` repeats every (attack, method) measurement per seed: the seed drives the data split and
poisoning, the backdoored model's training, the defender's clean draw, the validation split and the
purifier's own seed. The output then holds a table of mean ± sample standard deviation over the seeds
(and the min-max of ASR after) per attack and method, followed by the per-seed rows. Default: one seed
(``--seed``, 0).

The tables are printed and written as Markdown to ``benchmarks/purifiers_results.md`` (``--budget digits``:
``purifiers_results_digits.md``; ``--fast``: ``purifiers_results_fast.md``; ``--out`` to change).

Run: ``.venv/bin/python benchmarks/bench_purifiers.py`` (full; minutes on 2 CPU cores),
``.venv/bin/python benchmarks/bench_purifiers.py --budget digits --seeds 0 1 2 --threads 1`` (the README's table) or
``.venv/bin/python benchmarks/bench_purifiers.py --fast`` (smoke run, about a minute).
"""

from __future__ import annotations

import argparse
import json
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
from certkit.backdoor.prepare import prepare_data  # noqa: E402
from certkit.backdoor.training import train_model  # noqa: E402
from certkit.runs.single import TrainConfig  # noqa: E402
from purifiers._common import split_validation  # noqa: E402

HERE = Path(__file__).resolve().parent
CLEAN_FRACTION = 0.2
TARGET = 0
ATTACKS = ("badnets", "blended")


def _backdoored(attack: str, epochs: int, seed: int):
    cfg = TrainConfig(dataset="digits", model="digits-bn-cnn", attack=attack, poison_rate=0.1, target=TARGET,
                      epochs=epochs, seed=seed)
    exp = prepare_data(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=exp.splits.num_classes, input_shape=exp.splits.input_shape,
                        mean=exp.splits.mean, std=exp.splits.std)
    train_model(model, exp.poisoned.dataset, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                device="cpu", progress=False)
    clean = exp.defender_clean(CLEAN_FRACTION, seed)  # among the unpoisoned samples, as `certkit purify` draws it
    return model.eval(), exp, clean


def _params(name: str, budget: str) -> dict:
    """The parameters of one method under a budget: ``default`` (the documented official defaults), ``digits``
    (the digits-scale settings of ``certkit compare --preset digits``) or ``fast`` (smoke run). A method that
    takes the target class (``needs_target``) gets :data:`TARGET` unless the parameters already set one, as
    the comparison grid does (``purifier_budget`` already passes it for ``digits``)."""
    if budget == "digits":
        from certkit.runs.compare.grid import purifier_budget
        from certkit.runs.compare.spec import preset

        return purifier_budget(preset("digits"), name)
    params = purifiers.fast_params(name) if budget == "fast" else {}
    if type(purifiers.make(name)).needs_target and params.get("target") is None:
        params["target"] = TARGET
    return params


def run(methods: list[str], *, budget: str, epochs: int, seed: int) -> list[dict]:
    """Every (attack, method) measurement for one seed (data split and poisoning, training, clean draw,
    validation split and purification all seeded with ``seed``)."""
    rows: list[dict] = []
    for attack in ATTACKS:
        t0 = time.perf_counter()
        model, exp, clean = _backdoored(attack, epochs, seed)
        print(f"[{attack} seed {seed}] backdoored digits-bn-cnn trained in {time.perf_counter() - t0:.1f} s; "
              f"defender: {len(clean)} clean images", flush=True)
        for name in methods:
            params = _params(name, budget)
            purifier = purifiers.make(name, **params, device="cpu")
            tags = type(purifier).tags
            fit, val = clean, None
            if tags.uses_validation:
                fit, val = split_validation(clean, type(purifier).validation_fraction, seed)
            train = {"train_data": exp.poisoned.dataset} if tags.needs_training_set else {}
            row = {"attack": attack, "method": name, "seed": seed, "params": params}
            try:
                t1 = time.perf_counter()
                purified = purifier.purify(model, fit, validation=val, seed=seed, **train)
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
        return f"{r['attack']:<8} {r['method']:<12} seed {r['seed']} ERROR {r['error']}"
    return (f"{r['attack']:<8} {r['method']:<12} seed {r['seed']} CA {r['ca_before']:.3f}->{r['ca_after']:.3f}  "
            f"ASR {r['asr_before']:.3f}->{r['asr_after']:.3f}  RA {r['ra_before']:.3f}->{r['ra_after']:.3f}  "
            f"DER {r['der']:.3f}  {r['runtime_s']:.1f} s")


_BUDGET_WORDS = {"fast": "fast smoke budgets (fast_params)", "default": "official default budgets",
                 "digits": "digits-scale settings of the compare preset (certkit.runs.compare.grid.PRESET_PURIFIER_PARAMS)"}


def _header(budget: str, epochs: int, seeds: list[int], wall: float) -> str:
    seed_words = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return (f"Purifiers on digits ({_BUDGET_WORDS[budget]}), "
            f"digits-bn-cnn trained {epochs} epochs on 10% poisoned data (target {TARGET}), defender data "
            f"{CLEAN_FRACTION:.0%} of the training set (unpoisoned), {seed_words}; {platform.machine()} CPU, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; total {wall:.0f} s.")


def _per_seed_table(rows: list[dict], with_seed: bool) -> list[str]:
    seed_h, seed_s = ("seed | ", "---|") if with_seed else ("", "")
    lines = [f"| attack | method | {seed_h}CA before | CA after | ASR before | ASR after | RA before | RA after | DER "
             f"| time [s] |",
             f"|---|---|{seed_s}---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['attack']} | {r['method']} | " + (f"{r['seed']} | " if with_seed else "")
        if "error" in r:
            lines.append(f"{head}error: {r['error'][:80]} | | | | | | | |")
        else:
            lines.append(f"{head}{r['ca_before']:.3f} | {r['ca_after']:.3f} | "
                         f"{r['asr_before']:.3f} | {r['asr_after']:.3f} | {r['ra_before']:.3f} | {r['ra_after']:.3f} "
                         f"| {r['der']:.3f} | {r['runtime_s']:.1f} |")
    return lines


def _ms(values: list[float], fmt: str = ".3f") -> str:
    """``mean ± sample std`` (just the mean for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:{fmt}}"
    return f"{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}"


def aggregate(rows: list[dict], seeds: list[int]) -> list[str]:
    """Mean ± sample std over the seeds per (attack, method); an ``undefended`` row per attack holds the
    backdoored model's metrics. ``seeds ok`` counts the seeds where the method ran (errors are left out of the
    means)."""
    lines = ["| attack | method | CA | ASR | ASR min-max | RA | DER | time [s] | seeds ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for attack in dict.fromkeys(r["attack"] for r in rows):
        per_attack = [r for r in rows if r["attack"] == attack]
        before = {}
        for r in per_attack:
            if "error" not in r:
                before.setdefault(r["seed"], r)
        if before:
            b = list(before.values())
            asr = [r["asr_before"] for r in b]
            lines.append(f"| {attack} | *undefended* | {_ms([r['ca_before'] for r in b])} | {_ms(asr)} | "
                         f"{min(asr):.3f}-{max(asr):.3f} | {_ms([r['ra_before'] for r in b])} | | | "
                         f"{len(b)}/{len(seeds)} |")
        for name in dict.fromkeys(r["method"] for r in per_attack):
            ok = [r for r in per_attack if r["method"] == name and "error" not in r]
            if not ok:
                err = next(r["error"] for r in per_attack if r["method"] == name)
                lines.append(f"| {attack} | {name} | error: {err[:80]} | | | | | | 0/{len(seeds)} |")
                continue
            asr = [r["asr_after"] for r in ok]
            lines.append(f"| {attack} | {name} | {_ms([r['ca_after'] for r in ok])} | {_ms(asr)} | "
                         f"{min(asr):.3f}-{max(asr):.3f} | {_ms([r['ra_after'] for r in ok])} | "
                         f"{_ms([r['der'] for r in ok])} | {_ms([r['runtime_s'] for r in ok], '.1f')} | "
                         f"{len(ok)}/{len(seeds)} |")
    return lines


def markdown(rows: list[dict], *, budget: str, epochs: int, seeds: list[int], wall: float) -> str:
    lines = [_header(budget, epochs, seeds, wall), ""]
    if len(seeds) == 1:
        lines += _per_seed_table(rows, with_seed=False)
    else:
        lines += [f"Mean ± sample standard deviation over the {len(seeds)} seeds (ASR after: also min-max); "
                  "CA / ASR / RA after purification (*undefended*: the backdoored model).", ""]
        lines += aggregate(rows, seeds)
        errors = [r for r in rows if "error" in r]
        if errors:
            lines += ["", "Errors:", ""]
            lines += [f"- {r['attack']} {r['method']} seed {r['seed']}: {r['error'][:200]}" for r in errors]
        lines += ["", "Per seed:", ""]
        lines += _per_seed_table(sorted(rows, key=lambda r: (ATTACKS.index(r["attack"]), r["method"], r["seed"])),
                                 with_seed=True)
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
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="the one seed (default 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="repeat every measurement per seed and report mean ± std, e.g. --seeds 0 1 2")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=None, help="Markdown output (default: benchmarks/purifiers_results[_fast].md)")
    ap.add_argument("--json", default=None, help="also write the per-seed rows as JSON to this path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods or list(purifiers.available())
    unknown = sorted(set(methods) - set(purifiers.available()))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; available: {', '.join(purifiers.available())}")
    budget = "fast" if args.fast else args.budget
    epochs = args.epochs or (10 if budget == "fast" else 30)
    seed_list = list(dict.fromkeys(args.seeds)) if args.seeds else [args.seed]
    t0 = time.perf_counter()
    rows = [r for seed in seed_list for r in run(methods, budget=budget, epochs=epochs, seed=seed)]
    text = markdown(rows, budget=budget, epochs=epochs, seeds=seed_list, wall=time.perf_counter() - t0)
    suffix = {"default": "", "digits": "_digits", "fast": "_fast"}[budget]
    out = Path(args.out) if args.out else HERE / f"purifiers_results{suffix}.md"
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    print()
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
