"""Why CLP and I-BAU fail on the digits BadNets models, and FCT's D-BR on Blended: the measured evidence behind
the README's paragraph.

Three measurements on the digits-bn-cnn models backdoored at 10% (the models of
``bench_purifiers.py``, seeds 0-2, one torch thread):

1. **Where the backdoor lives vs what CLP prunes.** Every BatchNorm channel (16 + 32 + 32) gets a *trigger
   drive*: the mean increase of its post-ReLU activation (spatial mean) when the trigger is stamped on the
   defender's clean images, in units of that channel's clean standard deviation (an analysis with the true
   trigger, which no defense is given; measured on the defender's clean training images, evaluated on the test
   set). Pruning channels in decreasing drive order (gamma = beta = 0, CLP's own pruning) shows how many
   channels carry the backdoor: the smallest count that brings the ASR below 0.2. CLP (Zheng et al., ECCV 2022)
   flags channels by their Lipschitz upper bound (UCLC > mean + u std per layer): the script lists the
   channels it prunes at the official u = 3, their drive rank, the ASR after, and a sweep over u (how many
   channels a smaller u prunes, and whether it reaches the backdoor channels before it destroys clean
   accuracy).
2. **I-BAU's perturbation radius.** I-BAU (Zeng et al., ICLR 2022) unlearns a universal perturbation found
   inside an l2 ball; the sweep runs it at several radii (the digits preset's other settings) beside the
   trigger's own l2 norm, with the largest norm of the perturbation its search found before the projection.
3. **FCT's split on Blended.** FCT (Chen, Wu, Wang, NeurIPS 2022) assumes poisoned samples' features move more
   under a random rotation and shift than clean ones. The SD split at the digits settings
   (``certkit.runs.defaults.FCT_SD_DIGITS``) on BadNets and Blended: the AUROC of the FCT score for telling
   poisoned from clean samples (0.5 = chance; below 0.5 = inverted), D_p's precision and the poisoned share of
   D_c (the base rate is 10%), at the official +-180 deg rotation and at +-30 deg.

    .venv/bin/python benchmarks/digits_failures.py [--seeds 0 1 2] [--out benchmarks/digits_failures.md]

Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_purifiers import _backdoored, _params  # noqa: E402

import purifiers  # noqa: E402
from certkit.backdoor.metrics import empirical_metrics  # noqa: E402
from purifiers.clp import channel_lipschitz, conv_bn_pairs  # noqa: E402

HERE = Path(__file__).resolve().parent
ASR_DONE = 0.2
U_SWEEP = (3.0, 2.5, 2.0, 1.5, 1.0, 0.5)
RADII = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)


def channel_activations(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per BatchNorm layer, the post-ReLU spatial mean of every channel, ``[n, channels]``."""
    out: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, name=name: out.__setitem__(name, o.relu().mean((2, 3))))
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def trigger_drive(model: nn.Module, clean_x: torch.Tensor, triggered_x: torch.Tensor) -> list[tuple[str, int, float]]:
    """``(bn layer, channel, drive)`` of every channel, highest drive first (drive: mean activation increase
    under the trigger over the channel's clean standard deviation)."""
    a, b = channel_activations(model, clean_x), channel_activations(model, triggered_x)
    rows = []
    for name in a:
        drive = (b[name] - a[name]).mean(0) / (a[name].std(0) + 1e-6)
        rows += [(name, k, float(d)) for k, d in enumerate(drive)]
    return sorted(rows, key=lambda r: -r[2])


def pruned(model: nn.Module, channels: list[tuple[str, int]]) -> nn.Module:
    """A copy of ``model`` with these BN channels' gamma and beta set to 0 (CLP's pruning)."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for name, k in channels:
            mods[name].weight[k] = 0.0
            mods[name].bias[k] = 0.0
    return out


def clp_channels(model: nn.Module, u: float) -> list[tuple[str, int]]:
    """The channels CLP prunes at ``u`` (the purifier's rule, computed here to compare channel sets)."""
    mods = dict(model.named_modules())
    out = []
    for conv, bn in conv_bn_pairs(model):
        lips = channel_lipschitz(mods[conv], mods[bn])
        out += [(bn, int(k)) for k in torch.nonzero(lips > lips.mean() + u * lips.std()).flatten()]
    return out


def metrics(model: nn.Module, exp) -> tuple[float, float]:
    m = empirical_metrics(model, exp.splits.test.x, exp.splits.test.y, exp.triggered, device="cpu")
    return m.clean_accuracy, m.attack_success_rate


def channel_study(model: nn.Module, exp, clean) -> dict:
    keep = clean.y != exp.triggered.target
    x = clean.x[keep]
    ranking = trigger_drive(model, x, exp.attack.apply(x))
    rank_of = {(n, k): i + 1 for i, (n, k, _) in enumerate(ranking)}
    curve = []
    for m in range(0, 17):
        ca, asr = metrics(pruned(model, [(n, k) for n, k, _ in ranking[:m]]), exp)
        curve.append({"pruned": m, "ca": ca, "asr": asr})
    needed = next((c["pruned"] for c in curve if c["asr"] < ASR_DONE), None)
    sweep = []
    for u in U_SWEEP:
        chans = clp_channels(model, u)
        ca, asr = metrics(pruned(model, chans), exp)
        top = {(n, k) for n, k, _ in ranking[: needed or 8]}
        sweep.append({"u": u, "n_pruned": len(chans), "ranks": sorted(rank_of[c] for c in chans),
                      "hits": len(top & set(chans)), "ca": ca, "asr": asr})
    return {"ranking": ranking[:12], "curve": curve, "needed": needed, "sweep": sweep,
            "n_channels": len(ranking)}


def ibau_sweep(model: nn.Module, exp, clean, seed: int) -> list[dict]:
    rows = []
    for radius in RADII:
        params = dict(_params("i-bau", "digits"), delta_norm=radius)
        t0 = time.perf_counter()
        method = purifiers.make("i-bau", **params, device="cpu")
        out = method.purify(model, clean, seed=seed)
        ca, asr = metrics(out, exp)
        rows.append({"radius": radius, "ca": ca, "asr": asr, "seconds": time.perf_counter() - t0,
                     "found": max(method.delta_norms_)})
    return rows


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive sample scores above a negative one (ties count half; Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fct_split_study(attack: str, epochs: int, seed: int) -> list[dict]:
    from certkit.backdoor.models import build_model
    from certkit.runs.defaults import FCT_SD_DIGITS
    from purifiers.fct import CLEAN, POISONED, sd_split

    _, exp, _ = _backdoored(attack, epochs, seed)
    train = exp.poisoned.dataset
    poisoned = np.zeros(len(train), dtype=bool)
    poisoned[np.asarray(exp.poisoned.poison_indices)] = True
    rows = []
    for degrees in (180.0, 30.0):
        torch.manual_seed(seed)
        template = build_model("digits-bn-cnn", num_classes=exp.num_classes, input_shape=exp.splits.input_shape,
                               mean=exp.splits.mean, std=exp.splits.std)
        split = sd_split(template, train, **{**FCT_SD_DIGITS, "degrees": degrees}, seed=seed, device="cpu")
        rows.append({"attack": attack, "degrees": degrees, "auroc": auroc(split.scores, poisoned),
                     "dp_precision": float(poisoned[split.flags == POISONED].mean()),
                     "dc_poisoned": float(poisoned[split.flags == CLEAN].mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30, help="training epochs of the backdoored models (default 30)")
    ap.add_argument("--out", default=str(HERE / "digits_failures.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [f"# Digits failures: CLP's channels, I-BAU's radius, FCT's split on Blended (seeds {', '.join(map(str, args.seeds))})", "",
             "Generated by `benchmarks/digits_failures.py` (digits-bn-cnn, BadNets 10%, target 0, "
             f"{args.epochs} epochs, one torch thread). Channel names are BatchNorm layers; drive = mean "
             "activation increase under the trigger / clean std, on the defender's clean images.", ""]
    t_all = time.perf_counter()
    for seed in args.seeds:
        model, exp, clean = _backdoored("badnets", args.epochs, seed)
        ca0, asr0 = metrics(model, exp)
        norm = float(exp.triggered.trigger_norms.double().mean())
        study = channel_study(model, exp, clean)
        ibau = ibau_sweep(model, exp, clean, seed)
        lines += [f"## Seed {seed}: backdoored CA {ca0:.3f}, ASR {asr0:.3f}; trigger l2 norm {norm:.2f}", "",
                  f"Highest-drive channels (of {study['n_channels']}): "
                  + ", ".join(f"{n}[{k}] {d:.1f}" for n, k, d in study["ranking"][:10]), "",
                  f"Pruning by drive: ASR < {ASR_DONE} after **{study['needed']}** channels.", "",
                  "| channels pruned by drive | " + " | ".join(str(c["pruned"]) for c in study["curve"]) + " |",
                  "|---|" + "---|" * len(study["curve"]),
                  "| CA | " + " | ".join(f"{c['ca']:.2f}" for c in study["curve"]) + " |",
                  "| ASR | " + " | ".join(f"{c['asr']:.2f}" for c in study["curve"]) + " |", "",
                  "| CLP u | channels pruned | their drive ranks | among the top drive channels | CA | ASR |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s['u']:g} | {s['n_pruned']} | {', '.join(map(str, s['ranks'][:12]))}"
                  f"{' ...' if len(s['ranks']) > 12 else ''} | {s['hits']} of {study['needed'] or 8} | {s['ca']:.3f} | "
                  f"{s['asr']:.3f} |" for s in study["sweep"]]
        lines += ["", "| I-BAU radius | " + " | ".join(f"{r['radius']:g}" for r in ibau) + " |",
                  "|---|" + "---|" * len(ibau),
                  "| CA | " + " | ".join(f"{r['ca']:.3f}" for r in ibau) + " |",
                  "| ASR | " + " | ".join(f"{r['asr']:.3f}" for r in ibau) + " |",
                  "| largest perturbation found (before projection) | "
                  + " | ".join(f"{r['found']:.2f}" for r in ibau) + " |", ""]
        fct = fct_split_study("badnets", args.epochs, seed) + fct_split_study("blended", args.epochs, seed)
        lines += [f"| FCT split (seed {seed}) | rotation | AUROC poisoned vs clean | D_p precision | "
                  "poisoned share of D_c |", "|---|---|---|---|---|"]
        lines += [f"| {r['attack']} | +-{r['degrees']:g} deg | {r['auroc']:.2f} | {r['dp_precision']:.2f} | "
                  f"{r['dc_poisoned']:.3f} |" for r in fct]
        lines.append("")
        print("\n".join(lines[-(len(study["sweep"]) + 27):]), flush=True)
    lines.append(f"Total {time.perf_counter() - t_all:.0f} s.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
