"""Benchmark: deterministic patch certificates (de-randomized smoothing and PatchCleanser), in one run.

1. Throughput of column and block de-randomized smoothing (:func:`certkit.certify.patch.derandomized_certify`,
   all ``W`` / ``H * W`` ablations of every point, votes and the certificate for every patch side) against the
   ceiling: the raw batched forward of the same model over the same ablated inputs (all ablations of the
   same points, built once outside the timer, same rows per forward). Target: ceiling time / certkit time >= 0.9.
2. Agreement with IBM ART's ``PyTorchDeRandomizedSmoothing`` (``algorithm="levine2020"``) on the same trained
   weights (certkit's inner ``2C``-channel model handed to ART), same band, same threshold: ablated inputs
   per position, vote counts per point, predictions and per-point certificates for every patch side; and
   the speed ratio ART time / certkit time (target >= 2x). ART is *not* a certkit dependency: install it
   apart, e.g. ``.venv/bin/python -m pip install --target /work/art_pkgs --no-deps
   adversarial-robustness-toolbox six``, and pass ``--art-path /work/art_pkgs`` (or set ``CERTKIT_ART_PATH``).
   Without ART this part is skipped with a message.
3. PatchCleanser (:func:`certkit.certify.patch.patchcleanser_certify`): passes (model forwards over masked
   images) per second against the raw batched forward over the same masked images, built outside the timer.

Data: scikit-learn digits (8x8; all 540 test points) and the same digits upsampled bilinearly to 28x28.
Models: ``digits-cnn`` (8x8) and ``rab-mnist-cnn`` (28x28), trained briefly (throughput does not depend on
accuracy): the de-randomized smoothing models with certkit's seeded random band (block) per batch
(:func:`certkit.certify.patch.ablation_train_transform`), the PatchCleanser models on clean images.

Run: ``.venv/bin/python benchmarks/bench_patch.py --art-path /work/art_pkgs`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import types
import warnings
from typing import Any

import numpy as np
import torch

from certkit.backdoor.data import ArrayDataset, DatasetSplits, load_dataset
from certkit.backdoor.models import build_model
from certkit.backdoor.training import train_model
from certkit.certify.patch import (
    AblatedModel,
    ablation_train_transform,
    derandomized_certify,
    patchcleanser_certify,
    patchcleanser_masks,
)
from certkit.runs.models import build_ablated_model


# ---------------------------------------------------------------------------------------------- setup
def _upsample(splits: DatasetSplits, size: int) -> DatasetSplits:
    def up(ds: ArrayDataset) -> ArrayDataset:
        x = torch.nn.functional.interpolate(ds.x, size=(size, size), mode="bilinear", align_corners=False)
        return ArrayDataset(x.clamp(0, 1), ds.y, ds.num_classes, name=f"{ds.name}-{size}")

    return DatasetSplits(train=up(splits.train), test=up(splits.test), name=f"{splits.name}-{size}x{size}")


def _train_ablated(arch: str, splits: DatasetSplits, kind: str, band: int, epochs: int, seed: int) -> AblatedModel:
    """The de-randomized smoothing model of a certkit run: built by ``build_ablated_model`` (``2C``-channel base
    normalised with mean ``(m, 1 - m)``, std ``(s, s)``, wrapped in ``AblatedModel``; it reads only
    ``input_shape``, ``splits`` and ``num_classes`` of the prepared data) and trained as ``certkit.runs.single``
    trains it (run defaults: Adam, lr 1e-3, batch 64)."""
    torch.manual_seed(seed)
    prepared = types.SimpleNamespace(input_shape=splits.input_shape, splits=splits, num_classes=splits.num_classes)
    model = build_ablated_model(arch, prepared, kind, band)
    train_model(model, splits.train, epochs=epochs, lr=1e-3, batch_size=64, seed=seed, device="cpu",
                progress=False, input_transform=ablation_train_transform(kind, band, seed))
    return model.eval()


def _train_plain(arch: str, splits: DatasetSplits, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes=splits.num_classes, input_shape=splits.input_shape, mean=splits.mean,
                        std=splits.std)
    train_model(model, splits.train, epochs=epochs, lr=1e-3, batch_size=64, seed=seed, device="cpu",
                progress=False)
    return model.eval()


def _forward_all(model: torch.nn.Module, rows: torch.Tensor, batch_size: int) -> None:
    """The ceiling: the model's forward over pre-made rows, ``batch_size`` rows per call, nothing else."""
    with torch.inference_mode():
        for r0 in range(0, rows.shape[0], batch_size):
            model(rows[r0:r0 + batch_size])


def _interleaved(fns: dict[str, Any], repeats: int, min_seconds: float) -> dict[str, Any]:
    """One warm-up call of each, then interleaved timed rounds (at least ``repeats``, more for cheap cases, up
    to about ``min_seconds`` of timed work, at most 20). Returns the median time of each and, for every pair
    ``(a, b)``, ``ratio[a, b]``: the median over rounds of ``time_a / time_b`` within the same round. The
    machine is shared: paired ratios of interleaved rounds cancel most of the load that other processes put
    on it, and medians ignore single disturbed (or unusually fast) rounds."""
    warm = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        fn()
        warm += time.perf_counter() - t0
    rounds = max(repeats, min(20, math.ceil(min_seconds / max(warm, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out: dict[str, Any] = {name: float(np.median(v)) for name, v in times.items()}
    out["best"] = {name: min(v) for name, v in times.items()}
    out["ratio"] = {(a, b): float(np.median(np.asarray(times[a]) / np.asarray(times[b])))
                    for a in fns for b in fns if a != b}
    out["rounds"] = rounds
    return out


# ---------------------------------------------------------------------------------------------- 1. DS throughput
def _ablated_rows(model: AblatedModel, x: torch.Tensor, kind: str, band: int) -> torch.Tensor:
    """Every ablation of every point, ablation-major (row ``a * N + i``), as derandomized_certify orders them."""
    h, w = int(x.shape[2]), int(x.shape[3])
    starts = range(w) if kind == "column" else [(a // w, a % w) for a in range(h * w)]
    return torch.cat([model.ablate(x, kind, s, band) for s in starts])


def bench_ds(case: dict, args: argparse.Namespace) -> dict:
    model, x, kind, band = case["model"], case["x"], case["kind"], case["band"]
    h, w = int(x.shape[2]), int(x.shape[3])
    sides = list(range(1, min(h, w) + 1))
    rows = _ablated_rows(model, x, kind, band)
    out: dict[str, Any] = {}

    def run_certkit() -> None:
        out["cert"] = derandomized_certify(model, x, case["y"], kind=kind, band=band, patch_sizes=sides,
                                           theta=args.theta, batch_size=args.batch_size, device="cpu")

    t = _interleaved({"certkit": run_certkit, "forward": lambda: _forward_all(model, rows, args.batch_size)},
                          args.repeats, args.min_seconds)
    cert = out["cert"]
    return {"case": case["name"], "kind": kind, "band": band, "image": f"{h}x{w}", "points": int(x.shape[0]),
            "rounds": t["rounds"], "ablations": int(rows.shape[0] // x.shape[0]), "rows": int(rows.shape[0]),
            "certkit_s": t["certkit"], "forward_s": t["forward"], "best_s": t["best"],
            "fraction_of_ceiling": t["ratio"]["forward", "certkit"],
            "certkit_rows_per_s": rows.shape[0] / t["certkit"], "forward_rows_per_s": rows.shape[0] / t["forward"],
            "smoothed_accuracy": cert.accuracy(),
            "certified_accuracy": {int(m): float(v) for m, v in zip(sides, cert.certified_accuracy(sides))},
            "_cert": cert, "_sides": sides, "_rows": rows}


# ---------------------------------------------------------------------------------------------- 2. ART
def _import_art(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from art.estimators.certification.derandomized_smoothing import PyTorchDeRandomizedSmoothing
        import art
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    logging.getLogger("art").setLevel(logging.WARNING)
    return PyTorchDeRandomizedSmoothing, art.__version__


def bench_art(case: dict, ds: dict, art_cls: Any, args: argparse.Namespace) -> dict:
    """ART's levine2020 pipeline on certkit's weights: per-point vote counts (``predict``: one forward per
    ablation position over all points, ``batch_size`` points per forward) plus ``ablator.certify`` for every
    patch side, against certkit, with the forward ceiling timed in the same interleaved rounds."""
    model, x, y, kind, band = case["model"], case["x"], case["y"], case["kind"], case["band"]
    c, h, w = (int(s) for s in x.shape[1:])
    cert, sides, rows = ds["_cert"], ds["_sides"], ds["_rows"]
    art = art_cls(model=model.model, loss=torch.nn.CrossEntropyLoss(), input_shape=(c, h, w),
                  nb_classes=int(cert.counts.shape[1]), ablation_size=band, algorithm="levine2020",
                  ablation_type=kind, threshold=args.theta, logits=True, device_type="cpu", verbose=False)
    x_np, y_np = x.numpy(), y.numpy()

    # (a) the ablated inputs, position by position: ART's ablator against certkit's AblatedModel.ablate
    starts = list(range(w)) if kind == "column" else [(r, q) for r in range(h) for q in range(w)]
    bad_positions = 0
    for s in starts:
        ours = model.ablate(x, kind, s, band)
        theirs = (art.ablator.forward(np.copy(x_np), column_pos=s) if kind == "column"
                  else art.ablator.forward(np.copy(x_np), column_pos=s[1], row_pos=s[0]))
        bad_positions += int(not torch.equal(ours, theirs))

    out: dict[str, Any] = {}

    def run_art() -> None:
        counts = art.predict(x_np, batch_size=args.batch_size)
        out["counts"] = counts
        out["certs"] = [art.ablator.certify(counts, size_to_certify=m, label=y_np) for m in sides]

    def run_certkit() -> None:
        derandomized_certify(model, x, y, kind=kind, band=band, patch_sizes=sides, theta=args.theta,
                             batch_size=args.batch_size, device="cpu")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = _interleaved({"certkit": run_certkit, "art": run_art,
                               "forward": lambda: _forward_all(model, rows, args.batch_size)},
                              args.art_repeats, args.min_seconds)
    counts = np.asarray(out["counts"]).astype(np.int64)

    # (b) votes, (c) predictions (ART's: argmax of the counts, first maximum), (d) certificates for every side
    n = int(x.shape[0])
    srt = np.sort(cert.counts, axis=1)
    gap = srt[:, -1] - srt[:, -2]
    # runner-up tied with another class: ART's runner-up is counts.kthvalue(K - 1), which may return any of
    # the tied classes; certkit (and Levine and Feizi's tie-break c < c') needs the smallest index among them
    tied_runner_up = srt[:, -2] == srt[:, -3] if srt.shape[1] > 2 else np.zeros(n, dtype=bool)
    art_only = certkit_only = at_tied = 0
    cc_residual = 0
    per_side = {}
    example = None
    kth_runner_up = torch.from_numpy(counts.astype(np.float64)).kthvalue(counts.shape[1] - 1, dim=1).indices.numpy()
    for m, (art_cert, art_cc, _) in zip(sides, out["certs"]):
        ours = cert.certified_side >= m
        theirs = art_cert.cpu().numpy().astype(bool)
        theirs_cc = art_cc.cpu().numpy().astype(bool)
        diff = ours != theirs
        art_only += int((theirs & ~ours).sum())
        if example is None and (theirs & ~ours).any():
            i = int(np.flatnonzero(theirs & ~ours)[0])
            order = np.argsort(-cert.counts[i], kind="stable")
            example = {"point": i, "side": int(m), "counts": cert.counts[i].tolist(), "prediction": int(order[0]),
                       "certkit_runner_up": int(order[1]), "art_runner_up": int(kth_runner_up[i]),
                       "gap": int(gap[i]), "two_delta": 2 * ((m + band - 1) if kind == "column" else (m + band - 1) ** 2)}
        certkit_only += int((ours & ~theirs).sum())
        at_tied += int((diff & tied_runner_up).sum())
        delta = (m + band - 1) if kind == "column" else (m + band - 1) ** 2
        tie_break = gap == 2 * delta  # certified (if at all) only through the tie-break
        # what ART's cert_and_correct must be, given its own cert: its block ablator computes cert_and_correct
        # before OR-ing the tie-break into cert (reference notes section 3, issue 1); its column ablator after
        expect_cc = theirs & cert.correct
        if kind == "block":
            expect_cc &= ~tie_break
        cc_residual += int((expect_cc != theirs_cc).sum())
        per_side[int(m)] = {"certkit_certified_accuracy": float((ours & cert.correct).mean()),
                            "art_cert_and_correct": float(theirs_cc.mean()),
                            "art_only_certified": int((theirs & ~ours).sum()),
                            "certkit_only_certified": int((ours & ~theirs).sum()),
                            "correct_certified_by_tie_break": int((tie_break & ours & cert.correct).sum())}
    return {"case": case["name"], "kind": kind, "points": n, "rounds": t["rounds"], "positions": len(starts),
            "positions_with_different_ablation": bad_positions,
            "points_with_different_counts": int((counts != cert.counts).any(axis=1).sum()),
            "count_cells_different": int((counts != cert.counts).sum()),
            "predictions_different": int((counts.argmax(axis=1) != cert.prediction).sum()),
            "certificates_compared": len(sides) * n, "certificates_different": art_only + certkit_only,
            "certified_by_art_only": art_only, "certified_by_certkit_only": certkit_only,
            "differences_at_tied_runner_up": at_tied, "art_cert_and_correct_unexplained": cc_residual,
            "per_side": per_side, "art_only_example": example, "certkit_s": t["certkit"], "art_s": t["art"], "forward_s": t["forward"],
            "best_s": t["best"], "speedup_vs_art": t["ratio"]["art", "certkit"],
            "art_over_ceiling": t["ratio"]["art", "forward"]}


# ---------------------------------------------------------------------------------------------- 3. PatchCleanser
def _masked_rows(x: torch.Tensor, patch: int, k: int, fill: float) -> torch.Tensor:
    """Every two-mask input (i <= j, the one-mask inputs on the diagonal) of every point, pair-major."""
    masks = patchcleanser_masks((int(x.shape[2]), int(x.shape[3])), patch, k)
    first, second = torch.triu_indices(masks.shape[0], masks.shape[0])
    both = (masks[first] | masks[second])[:, None, None]  # [P, 1, 1, H, W]
    return torch.where(both, torch.tensor(fill), x[None]).reshape(-1, *x.shape[1:])


def bench_pc(case: dict, args: argparse.Namespace) -> dict:
    model, x, y, p, k = case["model"], case["x"], case["y"], case["patch"], case["k"]
    rows = _masked_rows(x, p, k, 0.0)
    out: dict[str, Any] = {}

    def run_certkit() -> None:
        out["cert"] = patchcleanser_certify(model, x, y, patch_size=p, k=k, batch_size=args.batch_size,
                                            device="cpu")

    t = _interleaved({"certkit": run_certkit, "forward": lambda: _forward_all(model, rows, args.batch_size)},
                          args.repeats, args.min_seconds)
    cert = out["cert"]
    passes = int(cert.meta["num_passes"])
    assert passes * x.shape[0] == rows.shape[0]
    return {"case": case["name"], "image": f"{x.shape[2]}x{x.shape[3]}", "patch": p, "k": k,
            "masks": int(cert.meta["num_masks"]), "passes_per_point": passes, "points": int(x.shape[0]),
            "rows": int(rows.shape[0]), "rounds": t["rounds"], "certkit_s": t["certkit"], "forward_s": t["forward"],
            "certkit_passes_per_s": rows.shape[0] / t["certkit"], "forward_passes_per_s": rows.shape[0] / t["forward"],
            "best_s": t["best"], "fraction_of_ceiling": t["ratio"]["forward", "certkit"], "accuracy": cert.accuracy(),
            "certified_accuracy": float(cert.certified_accuracy(p))}


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--art-path", default=os.environ.get("CERTKIT_ART_PATH"),
                   help="directory holding the 'art' package (pip --target); default $CERTKIT_ART_PATH; "
                        "without it ART is imported from the environment if present, else skipped")
    p.add_argument("--no-art", action="store_true", help="skip the ART comparison")
    p.add_argument("--no-28", action="store_true", help="skip the 28x28 cases")
    p.add_argument("--points-28", type=int, default=540, help="test points for 28x28 column ablation")
    p.add_argument("--block-points-28", type=int, default=16, help="test points for 28x28 block ablation (784 passes)")
    p.add_argument("--pc-points-28", type=int, default=8, help="test points for 28x28 PatchCleanser (666 passes)")
    p.add_argument("--small-points", type=int, default=16,
                   help="also run the 8x8 cases on this many points (0: no)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the 8x8 models (default 30, as a run)")
    p.add_argument("--epochs-28", type=int, default=5, help="training epochs of the 28x28 models (default 5)")
    p.add_argument("--theta", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=512, help="rows per forward, everywhere (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, certkit vs ceiling (best of)")
    p.add_argument("--art-repeats", type=int, default=3, help="timed rounds, certkit vs ART (best of)")
    p.add_argument("--min-seconds", type=float, default=4.0,
                   help="cheap cases get more timed rounds, up to about this much timed work (max 20 rounds)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    digits = load_dataset("digits", seed=args.seed)
    xt, yt = digits.test.x, digits.test.y
    print(f"patch certificates: digits, {len(xt)} test points, theta={args.theta}, batch={args.batch_size}, "
          f"{args.epochs}/{args.epochs_28} training epochs (8x8/28x28; Adam lr 1e-3, batch 64), torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"cpu count={os.cpu_count()}, {platform.machine()}", flush=True)

    t0 = time.perf_counter()
    ds_cases = [
        {"name": "digits 8x8 column b=2", "model": _train_ablated("digits-cnn", digits, "column", 2, args.epochs,
                                                                   args.seed), "x": xt, "y": yt, "kind": "column",
         "band": 2},
        {"name": "digits 8x8 block b=3", "model": _train_ablated("digits-cnn", digits, "block", 3, args.epochs,
                                                                  args.seed), "x": xt, "y": yt, "kind": "block",
         "band": 3},
    ]
    if args.small_points:  # the same models on a few points: per-call overheads weigh more
        n = args.small_points
        ds_cases += [{**cs, "name": f"{cs['name']}, {n} pts", "x": xt[:n], "y": yt[:n]} for cs in list(ds_cases)]
    pc_model8 = _train_plain("digits-cnn", digits, args.epochs, args.seed)
    pc_cases = [{"name": "digits 8x8 p=2 k=3", "model": pc_model8, "x": xt, "y": yt, "patch": 2, "k": 3},
                {"name": "digits 8x8 p=2 k=4", "model": pc_model8, "x": xt, "y": yt, "patch": 2, "k": 4}]
    if not args.no_28:
        d28 = _upsample(digits, 28)
        x28, y28 = d28.test.x, d28.test.y
        n_col, n_blk, n_pc = args.points_28, args.block_points_28, args.pc_points_28
        ds_cases += [
            {"name": "digits 28x28 column b=4", "model": _train_ablated("rab-mnist-cnn", d28, "column", 4,
                                                                         args.epochs_28, args.seed),
             "x": x28[:n_col], "y": y28[:n_col], "kind": "column", "band": 4},
            {"name": "digits 28x28 block b=10", "model": _train_ablated("rab-mnist-cnn", d28, "block", 10,
                                                                         args.epochs_28, args.seed),
             "x": x28[:n_blk], "y": y28[:n_blk], "kind": "block", "band": 10},
        ]
        pc_cases.append({"name": "digits 28x28 p=5 k=6", "model": _train_plain("rab-mnist-cnn", d28, args.epochs_28,
                                                                                 args.seed),
                         "x": x28[:n_pc], "y": y28[:n_pc], "patch": 5, "k": 6})
    n_models = len({id(cs["model"]) for cs in ds_cases + pc_cases})
    print(f"trained {n_models} models in {time.perf_counter() - t0:.1f} s", flush=True)

    # 1. de-randomized smoothing against the forward ceiling
    print("\n1. de-randomized smoothing (derandomized_certify, every side) vs raw batched forward of the same "
          "ablated rows")
    print(f"{'case':<34}{'points':>7}{'rows':>8}{'certkit [s]':>12}{'forward [s]':>12}{'rows/s':>10}"
          f"{'ceiling/certkit':>16}{'acc':>7}{'cert@1':>8}{'cert@2':>8}")
    ds_results = []
    for case in ds_cases:
        r = bench_ds(case, args)
        ds_results.append(r)
        ca = r["certified_accuracy"]
        print(f"{r['case']:<34}{r['points']:>7}{r['rows']:>8}{r['certkit_s']:>12.3f}{r['forward_s']:>12.3f}"
              f"{r['certkit_rows_per_s']:>10.0f}{r['fraction_of_ceiling']:>16.3f}{r['smoothed_accuracy']:>7.3f}"
              f"{ca[1]:>8.3f}{ca[2]:>8.3f}", flush=True)
    print("target: ceiling time / certkit time >= 0.9 (times: medians of interleaved rounds; ratios: median of "
          "the per-round ratios)")

    # 2. ART
    art_results: list[dict] = []
    art_version = None
    if args.no_art:
        print("\n2. ART comparison skipped (--no-art)")
    else:
        art_cls, info = _import_art(args.art_path)
        if art_cls is None:
            print(f"\n2. ART comparison SKIPPED: IBM ART could not be imported ({info}). Install it apart from "
                  f"certkit, e.g. `.venv/bin/python -m pip install --target /work/art_pkgs --no-deps "
                  f"adversarial-robustness-toolbox six`, then pass --art-path /work/art_pkgs")
        else:
            art_version = info
            print(f"\n2. IBM ART {art_version} PyTorchDeRandomizedSmoothing(levine2020) on certkit's weights: "
                  f"predict (counts) + ablator.certify for every side")
            print(f"{'case':<34}{'points':>7}{'abl.diff':>9}{'cnt.diff':>9}{'pred.diff':>10}{'cert.diff':>10}"
                  f"{'certkit [s]':>12}{'ART [s]':>10}{'forward [s]':>12}{'ART/certkit':>12}{'ART/ceil.':>11}")
            for case, ds in zip(ds_cases, ds_results):
                r = bench_art(case, ds, art_cls, args)
                art_results.append(r)
                print(f"{r['case']:<34}{r['points']:>7}{r['positions_with_different_ablation']:>9}"
                      f"{r['points_with_different_counts']:>9}{r['predictions_different']:>10}"
                      f"{r['certificates_different']:>10}{r['certkit_s']:>12.3f}{r['art_s']:>10.3f}"
                      f"{r['forward_s']:>12.3f}{r['speedup_vs_art']:>11.2f}x{r['art_over_ceiling']:>11.2f}x",
                      flush=True)
                if r["certificates_different"]:
                    print(f"  certificates: {r['certified_by_art_only']} (point, side) pairs certified by ART only, "
                          f"{r['certified_by_certkit_only']} by certkit only; "
                          f"{r['differences_at_tied_runner_up']} of them at points whose runner-up is tied "
                          f"(ART's kthvalue runner-up is not the smallest tied index)")
                    e = r["art_only_example"]
                    if e:
                        print(f"  e.g. point {e['point']}, side {e['side']}: counts {e['counts']}, prediction "
                              f"{e['prediction']}, gap {e['gap']} = 2 Delta; runner-up certkit {e['certkit_runner_up']}"
                              f" (smallest tied index), ART {e['art_runner_up']}")
                gaps = {m: v for m, v in r["per_side"].items()
                        if v["certkit_certified_accuracy"] != v["art_cert_and_correct"]}
                if gaps:
                    print("  certified accuracy, certkit vs ART's cert_and_correct: " + ", ".join(
                        f"m={m}: {v['certkit_certified_accuracy']:.4f} vs {v['art_cert_and_correct']:.4f}"
                        for m, v in gaps.items())
                        + f"; unexplained by ART's kthvalue runner-up and its block tie-break order: "
                        f"{r['art_cert_and_correct_unexplained']}")
                del ds["_rows"]
            print("expected: 0 differences everywhere; target: ART time / certkit time >= 2x. abl.diff: positions "
                  "whose ablated inputs differ; cnt.diff: points with any different vote count; cert.diff: (point, "
                  "side) certificates that differ; ART/ceil.: ART time / raw forward time, the most any "
                  "implementation running the same forwards could gain over ART")

    # 3. PatchCleanser
    print("\n3. PatchCleanser (patchcleanser_certify) vs raw batched forward of the same masked images")
    print(f"{'case':<24}{'points':>7}{'passes/pt':>10}{'certkit pass/s':>15}{'forward pass/s':>15}"
          f"{'ceiling/certkit':>16}{'acc':>7}{'cert':>7}")
    pc_results = []
    for case in pc_cases:
        r = bench_pc(case, args)
        pc_results.append(r)
        print(f"{r['case']:<24}{r['points']:>7}{r['passes_per_point']:>10}{r['certkit_passes_per_s']:>15.0f}"
              f"{r['forward_passes_per_s']:>15.0f}{r['fraction_of_ceiling']:>16.3f}{r['accuracy']:>7.3f}"
              f"{r['certified_accuracy']:>7.3f}", flush=True)
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    if args.json:
        clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in ds_results]  # drop tensors
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "art_version": art_version, "derandomized": clean, "art": art_results,
                       "patchcleanser": pc_results, "total_s": total}, fh, indent=2)


if __name__ == "__main__":
    main()
