"""Patch certificates on digits: certified accuracy and patch CTR against the BadNets trigger.

For the embedded 8x8 digits with a 2x2 BadNets patch, and for the same digits resized to 28x28 (bilinear) with a
3x3 patch, this trains (through the library calls behind ``certkit train --ablation ...``) column de-randomized
smoothing models for band b = 1, 2, 3 and a block model, certifies them on the whole clean and triggered test sets
(``certkit certify RUN --certificate patch``), and certifies the undefended backdoored model with PatchCleanser at
the trigger's side (``--certificate patchcleanser``). It prints one table per image size (and writes JSON with
``--json``): clean accuracy, certified accuracy at the trigger's side, the patch CTR and the wall time.

    .venv/bin/python benchmarks/patch_results.py [--epochs 30] [--json out.json] [--sizes 8 28]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from certkit.backdoor.data import load_dataset
from certkit.runs.patch import PatchCertifyConfig, certify_patch_run
from certkit.runs.single import TrainConfig, train


def digits_28(path: Path) -> str:
    """The digits split resized to 28x28 (bilinear, clipped to [0, 1]) as an npz file; returns its dataset spec."""
    d = load_dataset("digits", seed=0)

    def up(x: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False
                                               ).clamp(0, 1).numpy().astype(np.float32)

    np.savez(path, x_train=up(d.train.x), y_train=d.train.y.numpy(), x_test=up(d.test.x), y_test=d.test.y.numpy())
    return f"npz:{path}"


SETTINGS = {
    8: {"patch": 2, "ablations": [("column", 1), ("column", 2), ("column", 3), ("block", 3)]},
    28: {"patch": 3, "ablations": [("column", 1), ("column", 2), ("column", 3), ("block", 10)]},
}


def run_size(size: int, root: Path, epochs: int) -> list[dict]:
    cfg = SETTINGS[size]
    dataset = "digits" if size == 8 else digits_28(root / "digits28.npz")
    params = {"patch_size": cfg["patch"]}
    rows = []
    pc_done = False
    for kind, band in cfg["ablations"]:
        t0 = time.perf_counter()
        out = root / f"d{size}-{kind}-b{band}"
        run = train(TrainConfig(dataset=dataset, model="digits-cnn", attack="badnets", attack_params=params,
                                poison_rate=0.1, target=0, epochs=epochs, ablation=kind, band=band, seed=0),
                    out, device="cpu", progress=False, log=lambda *_: None)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        (row,) = certify_patch_run(run, PatchCertifyConfig(certificate="patch"), device="cpu", progress=False,
                                   log=lambda *_: None)
        rows.append({"size": size, "certificate": f"{kind} smoothing, b={band}", "clean_accuracy": row["clean_accuracy"],
                     "certified_at_trigger": row["certified_accuracy"][str(cfg["patch"])],
                     "asr": row["asr"], "patch_ctr": row["patch_ctr"], "train_s": train_s,
                     "certify_s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        if not pc_done:  # PatchCleanser over the undefended backdoored model of the same run
            t0 = time.perf_counter()
            (row,) = certify_patch_run(run, PatchCertifyConfig(certificate="patchcleanser", models=("undefended",),
                                                               patch_sizes=(cfg["patch"],)),
                                       device="cpu", progress=False, log=lambda *_: None)
            rows.append({"size": size, "certificate": f"PatchCleanser (undefended model, {row['settings'].get('k')} "
                                                      "masks per axis)",
                         "clean_accuracy": row["clean_accuracy"],
                         "certified_at_trigger": row["certified_accuracy"][str(cfg["patch"])],
                         "asr": row["asr"], "patch_ctr": row["patch_ctr"], "train_s": None,
                         "certify_s": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            pc_done = True
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 28], choices=[8, 28])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="certkit-patch-results-") as tmp:
        for size in args.sizes:
            rows += run_size(size, Path(tmp), args.epochs)
    print()
    print("| image | certificate | clean acc | certified acc at trigger side | ASR (smoothed) | patch CTR | train s | certify s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tr = f"{r['train_s']:.0f}" if r["train_s"] is not None else ""
        print(f"| {r['size']}x{r['size']} | {r['certificate']} | {r['clean_accuracy']:.3f} | {r['certified_at_trigger']:.3f} "
              f"| {r['asr']:.3f} | {r['patch_ctr']:.3f} | {tr} | {r['certify_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
