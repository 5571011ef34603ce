"""Default settings of every run kind, in one place: the run configs' dataclasses take their defaults from here
and the CLI shows them in ``--help`` without importing the heavy modules (so ``certkit --help`` stays fast).

>>> TRAIN["epochs"], CERTIFY["n"]
(30, 10000)
"""

from __future__ import annotations

from typing import Any

#: :class:`certkit.runs.single.TrainConfig` (``certkit train``)
TRAIN: dict[str, Any] = {"dataset": "digits", "model": "digits-cnn", "attack": "badnets", "poison_rate": 0.1,
                         "target": 0, "epochs": 30, "lr": 1e-3, "batch_size": 64, "noise_sigmas": (0.0,), "seed": 0}
#: :class:`certkit.runs.single.CertifyConfig` (``certkit certify``)
CERTIFY: dict[str, Any] = {"n0": 100, "n": 10_000, "alpha": 0.001, "seed": 0, "batch_size": 2000,
                           "sigma_modes": ("fixed",), "sigma_steps": 1000, "sigma_lr": 1e-4}
#: :func:`certkit.runs.demo.run_demo` (``certkit demo``)
DEMO: dict[str, Any] = {"out": "runs/demo", "sigmas": (0.12, 0.25, 0.5), "n": 1000, "epochs": 30,
                        "poison_rate": 0.1}
#: :class:`certkit.runs.ensemble_train.EnsembleSpec` (``certkit ensemble train``)
ENSEMBLE: dict[str, Any] = {"model": "digits-cnn", "poison_rate": 0.02, "members": 50, "sigma": 0.5,
                            "noise": "fixed", "epochs": 10, "lr": 1e-3, "batch_size": 64, "sigma_steps": 1000,
                            "sigma_lr": 1e-4}
#: :class:`certkit.runs.ensemble_certify.EnsembleCertifyConfig` (``certkit ensemble certify``)
ENSEMBLE_CERTIFY: dict[str, Any] = {"alpha": 0.001, "bound": "clopper-pearson", "batch_size": 1024}
#: :func:`certkit.runs.ensemble_certify.run_ensemble_demo` (``certkit demo --mode ensemble``)
ENSEMBLE_DEMO: dict[str, Any] = {"out": "runs/demo-ensemble", "sigmas": (0.5,), "members": 50, "epochs": 10,
                                 "poison_rate": 0.02, "n_jobs": 2}
#: FCT's SD module (:func:`purifiers.fct.sd_split`) on the embedded digits, used by ``certkit train --defense fct-st``
#: there and by the compare preset's ``fct-br`` / ``fct-st`` cells. The official 2 SD epochs at lr 0.01 leave the
#: digits model near constant (D_p precision 0.03-0.35: tests/test_purifiers_fct.py); 10 epochs at lr 0.03 in
#: batches of 32 and 8 tau draws give D_p precision 0.90-1.00 on digits-bn-cnn and 0.71-1.00 on digits-cnn
#: (benchmarks/digits_failures.md, benchmarks/dst_results.md). The clean split is taken per class: with the global
#: split D-BR left digits-cnn seed 2 at ASR 1.00 (per class: 0.17), elsewhere both are within 0.01 of CA and
#: the global split's ASR is as low or lower (benchmarks/README.md, "per-class clean split"). No L_intra epochs
#: (reference notes section 4.2: it hurt).
FCT_SD_DIGITS: dict[str, Any] = {"sd_epochs": 10, "intra_epochs": 0, "sd_lr": 0.03, "draws": 8,
                                 "per_class_clean": True, "batch_size": 32}
#: FCT's D-ST training (:func:`purifiers.fct.fct_secure_train`) on the embedded digits: the contrastive stage 30
#: epochs at lr 0.1 in batches of 256, crops of 50-100% of the 8x8 image without flips; the linear head 50 epochs
#: in batches of 64 at lr 0.5. Measured on digits-bn-cnn BadNets 10%, seeds 0-2 (benchmarks/bench_dst.py; table
#: in benchmarks/README.md): these settings CA 0.93-0.95, ASR 0.01-0.28; the official head budget (10 epochs of
#: batch 512 at lr 5, ~1 step an epoch here) CA 0.58-0.69, ASR 0.14-0.99; the whole official secure training
#: (200 epochs at lr 0.5, batch 512, crops 20-100% with flips, that head) CA 0.48-0.60, ASR 0.57-0.81. The
#: official lr 0.5 and batch 512 alone do about as well as these (CA 0.93-0.94, ASR 0.02-0.39).
FCT_ST_DIGITS: dict[str, Any] = {"epochs": 30, "lr": 0.1, "batch_size": 256, "crop_scale": [0.5, 1.0],
                                 "flip": False, "head_epochs": 50, "head_lr": 0.5, "head_batch_size": 64}
#: training-time defenses of ``certkit train --defense`` (:mod:`certkit.runs.fct`)
TRAINING_DEFENSES: tuple[str, ...] = ("fct-st",)
#: :class:`certkit.runs.purify.PurifyConfig` (``certkit purify``)
PURIFY: dict[str, Any] = {"noise_finetune_epochs": 0, "noise_sigma": 0.25, "seed": 0}
#: purifier default budgets that are infeasible on a CPU at CIFAR-10 scale (``certkit purify --help`` lists them;
#: a test keeps them equal to the purifiers' defaults). Measured: one training epoch of preact-resnet18 over 5%
#: of CIFAR-10 (2,500 images) takes ~80 s on 2 CPU cores, so e.g. TSC's 3 x 200 curve epochs take ~13 h, SAU's
#: 100 epochs of 5 PGD steps ~15 h, ANP's 2000 iterations ~5 h, NPD and FT-SAM ~4 h, Fine-Pruning ~2 h, TSBD
#: up to ~20 h (its unlearning stops once clean accuracy is <= 10%). The other methods take minutes to ~1 h;
#: on digits every default takes minutes.
PURIFY_CPU_HEAVY: dict[str, dict[str, Any]] = {
    "tsc": {"rounds": 3, "curve_epochs": 200}, "sau": {"epochs": 100, "pgd_steps": 5}, "anp": {"n_iters": 2000},
    "npd": {"warm_epochs": 5, "epochs": 50}, "ft-sam": {"epochs": 100}, "fine-pruning": {"epochs": 100},
    "tsbd": {"max_unlearn_epochs": 1000, "ft_epochs": 20}}
