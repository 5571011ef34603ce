"""Command line interface: ``certkit demo | train | certify | purify | ensemble | compare | export | report``.

A thin layer over :mod:`certkit.runs`: each command parses its flags, calls one library function and prints.
A flag that is not given is not passed, so the defaults live in the library (:mod:`certkit.runs.defaults`,
shown in ``--help``); numbers are parsed here and checked there. Bad input (a
:class:`~certkit.errors.CertkitError`) becomes one line ``certkit: error: ...`` and exit code 2 (``--verbose``
adds the cause). The library of a command is imported only when the command runs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from certkit.errors import CertkitError
from certkit.runs import defaults as D

EPILOG = ("Run directories hold manifest.json, summary.json, points.csv, models/ and plots/ (see docs/design.md "
          "section 7).")


#: registered purification methods (purifiers.available(); repeated here so that --help never imports torch,
#: a test keeps the two equal)
PURIFIER_NAMES = ("anp", "clp", "fct-br", "fine-pruning", "fst", "ft", "ft-sam", "i-bau", "mesa", "nad", "npd", "rnp",
                  "sau", "tsbd", "tsc")
#: the --device choices (certkit.devices.DEVICE_CHOICES, repeated here so that --help never imports torch)
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: what --dataset accepts (certkit.backdoor.data.load_dataset / load_npz)
DATASET_HELP = ("digits | mnist | cifar10 | gtsrb | npz:PATH | folder:PATH. npz: numpy.savez archive with x_train, "
                "y_train, x_test, y_test; images uint8 0..255 or float 0..1, shaped NHW, NCHW or NHWC (1 or 3 "
                "channels) or flat N x C*H*W in C,H,W order (see --input-shape); labels integers 0..K-1, shape N. "
                "folder: PATH/<class>/*.png|jpg|... or PATH/train/<class>/... and PATH/test/<class>/...")
INPUT_SHAPE_HELP = ("C,H,W of flat npz images (e.g. 1,28,28), recorded in the dataset spec as npz@C,H,W:PATH "
                    "(default: a square guess, 1,H,H or 3,H,H, with a warning)")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (``certkit: error: ...``) and exit code 2, and whose
    epilog may be computed only when the help is shown (``lazy_epilog``: the purifier list imports torch)."""

    lazy_epilog = None

    def format_help(self) -> str:
        if self.lazy_epilog is not None:
            self.epilog = self.lazy_epilog()
        return super().format_help()

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"certkit: error: {self.prog}: {message} (see --help)\n")


def _number(text: str) -> float:
    """Any finite number Python reads (``1e5``, ``1E-3``, ``+0.5``); its range is checked by the library."""
    try:
        v = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc


_positive_float = _number
_nonneg_float = _number


def _shape(text: str) -> tuple[int, ...]:
    """``C,H,W`` as integers (checked by the library)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not integers C,H,W: {text!r}") from exc


def _json_dict(text: str) -> dict:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}); give the object itself, e.g. "
                                         "'{\"key\": 3}', not a file name") from exc
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}} (a string, not a file name), got a JSON "
                                         f"{type(d).__name__}")
    return d


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="where models run: auto picks CUDA when available (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars and no log lines: print only the final result (and errors)")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, also print its cause (traceback)")


def _add_certify_flags(p: argparse.ArgumentParser, *, n_default: int) -> None:
    p.add_argument("--n0", type=_integer, default=None, help=f"selection draws per point (default: {D.CERTIFY['n0']})")
    p.add_argument("--n", type=_integer, default=None, help=f"estimation draws per point (default: {n_default})")
    p.add_argument("--alpha", type=_number, default=None,
                   help=f"failure probability of each certificate, in (0, 1) (default: {D.CERTIFY['alpha']})")
    p.add_argument("--max-points", type=_integer, default=None,
                   help="certify a fixed-seed subsample of this many test points (default: all)")


def _add_plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", dest="plot_format", choices=["png", "pdf", "svg"], default=None,
                   help="file format of the plots written (plots/*.png|pdf|svg) (default: png)")
    p.add_argument("--dpi", type=_integer, default=None, help="resolution of the plots (default: 200)")


def build_parser() -> argparse.ArgumentParser:
    """The ``certkit`` argument parser (every flag documented in ``--help``)."""
    parser = _Parser(prog="certkit", description="Certified backdoor robustness: "
                                     "randomized smoothing, exact bounds, run directories.", epilog=EPILOG)
    parser.add_argument("--verbose", action="store_true", help="on an error, also print its cause (traceback)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="train a backdoored CNN on digits, certify it, write a run directory",
                          description="Train a BadNets-backdoored CNN on scikit-learn's digits, report CA and ASR, "
                          "certify the clean and triggered test sets with test-time smoothing at each sigma "
                          "(base models trained with noise at that sigma) and report certified trigger robustness.")
    demo.add_argument("--mode", choices=["test-time", "ensemble"], default="test-time",
                      help="test-time: Cohen smoothing of single models (Mode A); ensemble: a RAB ensemble "
                      "trained on noised data (Mode B) (default: test-time)")
    demo.add_argument("--out", default=None,
                      help="run directory (resumed if it exists; default: runs/demo or runs/demo-ensemble)")
    demo.add_argument("--sigmas", type=_positive_float, nargs="+", default=None,
                      help="noise levels in pixel units (default: 0.12 0.25 0.5 for test-time; 0.5 for ensemble, "
                      "one run directory per sigma)")
    demo.add_argument("--members", type=_integer, default=None, help=f"ensemble mode: number of members M (default: {D.ENSEMBLE_DEMO['members']})")
    demo.add_argument("--n-jobs", type=_integer, default=None, help=f"ensemble mode: parallel training jobs (default: {D.ENSEMBLE_DEMO['n_jobs']})")
    demo.add_argument("--attack", default=None, help=f"attack name (default: {D.TRAIN['attack']})")
    demo.add_argument("--attack-params", type=_json_dict, default={},
                      help="attack parameters as JSON, e.g. '{\"patch_size\": 3}'")
    demo.add_argument("--poison-rate", type=_number, default=None,
                      help="fraction of training data poisoned (default: 0.1 test-time, 0.02 ensemble as in RAB)")
    demo.add_argument("--target", type=_integer, default=None, help=f"target class of the backdoor (default: {D.TRAIN['target']})")
    demo.add_argument("--epochs", type=_integer, default=None,
                      help="training epochs per model (default: 30 test-time, 10 per ensemble member)")
    demo.add_argument("--seed", type=_integer, default=None, help=f"seed of the split, poisoning, training and noise (default: {D.TRAIN['seed']})")
    _add_certify_flags(demo, n_default=1000)
    _add_common(demo)
    _add_plot_flags(demo)

    train = sub.add_parser("train", help="train (possibly backdoored) models into a run directory",
                           description="Train one model per noise level on a poisoned training set (and, on request, a "
                           "de-randomized smoothing model, --ablation, and a training-time defense model, --defense).")
    train.add_argument("--out", required=True, help="run directory to create (or resume)")
    train.add_argument("--dataset", default=None, help=f"{DATASET_HELP} (default: {D.TRAIN['dataset']})")
    train.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W", help=INPUT_SHAPE_HELP)
    train.add_argument("--data-root", default=None, help="folder for torchvision datasets")
    train.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    train.add_argument("--model", default=None, help=f"architecture: digits-cnn | digits-bn-cnn | rab-mnist-cnn | preact-resnet18 (default: {D.TRAIN['model']})")
    train.add_argument("--attack", default=None, help=f"attack name (default: {D.TRAIN['attack']})")
    train.add_argument("--attack-params", type=_json_dict, default={}, help="attack parameters as JSON")
    train.add_argument("--poison-rate", type=_number, default=None, help=f"fraction of training data poisoned (default: {D.TRAIN['poison_rate']})")
    train.add_argument("--target", type=_integer, default=None, help=f"target class (default: {D.TRAIN['target']})")
    train.add_argument("--epochs", type=_integer, default=None, help=f"training epochs (default: {D.TRAIN['epochs']})")
    train.add_argument("--lr", type=_positive_float, default=None, help=f"Adam learning rate (default: {D.TRAIN['lr']})")
    train.add_argument("--batch-size", type=_integer, default=None, help=f"training batch size (default: {D.TRAIN['batch_size']})")
    train.add_argument("--noise-sigmas", type=_nonneg_float, nargs="+", default=None,
                       help=f"train one model per Gaussian augmentation level; 0 = undefended (default: {' '.join(f'{s:g}' for s in D.TRAIN['noise_sigmas'])})")
    train.add_argument("--ablation", choices=["column", "block"], default=None,
                       help="also train a de-randomized smoothing model (patch certificates): one random band of "
                       "--band columns (or a --band x --band block) kept per batch, inputs encoded as (x, 1 - x)")
    train.add_argument("--band", type=_integer, default=None, help="width of the kept band / block (pixels)")
    train.add_argument("--defense", choices=list(D.TRAINING_DEFENSES), default=None,
                       help="also train a model by a training-time defense from the poisoned data: fct-st = FCT's "
                       "D-ST (SD split by transformation sensitivity, then contrastive pre-training and a linear "
                       "head on the split; saved as model 'fct-st', with the split in train/fct-st_split.npz). "
                       "Its own epochs are set in --defense-params (st.epochs, head_epochs; sd.sd_epochs), not by "
                       "--epochs, which trains the other models")
    train.add_argument("--defense-params", type=_json_dict, default=None,
                       help='the defense\'s settings as a JSON string, {"sd": {...}, "st": {...}}: sd = the SD split '
                       "(sd_epochs, intra_epochs, sd_lr, batch_size, draws, alpha_c, alpha_p, degrees, translate, "
                       "per_class_clean), st = the secure training (epochs, lr, batch_size, weight_decay, momentum, "
                       "temperature, proj_dim, crop_scale, flip, clean_positives_only, head_epochs, head_lr, "
                       "head_batch_size, lambda_p); over the defaults: digits-scale on digits, official elsewhere "
                       "(every resolved value is stored in the run)")
    train.add_argument("--seed", type=_integer, default=None, help=f"seed (default: {D.TRAIN['seed']})")
    _add_common(train)

    cert = sub.add_parser("certify", help="certify saved models of a run with test-time smoothing",
                          description="Cohen et al. CERTIFY of each chosen model at each sigma on the clean and "
                          "triggered test sets of the run's dataset.")
    cert.add_argument("run_dir", help="run directory made by `certkit train` or `certkit demo`")
    cert.add_argument("--model", action="append", default=None,
                      help="model name in the run (repeatable; default: every noise-trained model at its own sigma)")
    cert.add_argument("--sigma", type=_positive_float, nargs="+", default=None,
                      help="smoothing sigma(s) for the chosen models (default: each model's training sigma)")
    cert.add_argument("--sigma-mode", nargs="+", choices=["fixed", "sample-specific"], default=None,
                      help="fixed: Cohen CERTIFY at sigma; sample-specific: Cert-SSB per-point sigmas by gradient "
                      "ascent from sigma + storage-update certification (both: curves on one plot) (default: {' '.join(D.CERTIFY['sigma_modes'])})")
    cert.add_argument("--sigma-steps", type=_integer, default=None,
                      help=f"sample-specific mode: ascent steps (default: {D.CERTIFY['sigma_steps']})")
    cert.add_argument("--sigma-lr", type=_positive_float, default=None,
                      help=f"sample-specific mode: ascent learning rate (default: {D.CERTIFY['sigma_lr']})")
    cert.add_argument("--certificate", choices=["smoothing", "patch", "patchcleanser"], default="smoothing",
                      help="smoothing: Gaussian test-time smoothing (l2 radius); patch: de-randomized smoothing of "
                      "the run's --ablation models (patch side); patchcleanser: PatchCleanser over any plain model "
                      "(--model, default undefended; --patch-size P) (default: smoothing)")
    cert.add_argument("--patch-size", type=_integer, nargs="+", default=None,
                      help="patch sides to certify (patch: default 1 .. the image side; patchcleanser: one side)")
    cert.add_argument("--masks", type=_integer, default=None,
                      help="patchcleanser: masks per axis k (default: min(6, image side - patch size + 1))")
    cert.add_argument("--cutout-finetune", type=_integer, default=None, metavar="EPOCHS",
                      help="patchcleanser: first fine-tune each model EPOCHS epochs with Cutout masks on the "
                      "defender's clean data (PatchCleanser's recipe), saved as MODEL-cutoutEPOCHS and certified")
    cert.add_argument("--theta", type=_number, default=None,
                      help="patch: a pass votes for every class whose softmax >= theta (default: 0.2)")
    cert.add_argument("--rule", choices=["threshold", "argmax"], default=None,
                      help="patch: vote rule (default: threshold)")
    cert.add_argument("--seed", type=_integer, default=None, help=f"noise seed (default: {D.CERTIFY['seed']})")
    cert.add_argument("--batch-size", type=_integer, default=None, help=f"noisy copies per forward pass (default: {D.CERTIFY['batch_size']})")
    cert.add_argument("--dataset", default=None,
                      help=f"certify on another dataset of the same input shape and classes ({DATASET_HELP}; "
                      "default: the run's)")
    cert.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W", help=INPUT_SHAPE_HELP)
    cert.add_argument("--ids", default=None, metavar="FILE",
                      help="certify only these test-set indices (the index column of points.csv): a .npy array or a "
                      "text/CSV file of integers separated by commas, spaces or newlines; distinct, in range; "
                      "not with --max-points; smoothing certificates only")
    cert.add_argument("--data-root", default=None, help="folder for torchvision datasets (with --dataset)")
    cert.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    _add_certify_flags(cert, n_default=10_000)
    _add_common(cert)
    _add_plot_flags(cert)

    pur = sub.add_parser("purify", help="purify a run's backdoored model with an empirical defense",
                         description="Load the run's undefended (backdoored, sigma-0) model, purify it with a "
                         "registered method on clean data drawn from the clean training set (never test data, "
                         "never poisoned samples), evaluate CA/ASR/RA before and after and DER on the test split, "
                         "and save it as model 'purified-METHOD' (certify it with `certkit certify RUN --model "
                         "purified-METHOD --sigma S`) with its report in purify/METHOD.json.",
                         )
    pur.lazy_epilog = lambda: "Methods: " + ", ".join(PURIFIER_NAMES) + ". " + _cpu_heavy_note()
    pur.add_argument("run_dir", help="single-model run directory made by `certkit train` or `certkit demo`")
    pur.add_argument("--method", required=True, help="purification method (see the list below)")
    pur.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="method parameter (repeatable); VALUE is parsed as JSON when possible (3, 0.1, true, "
                     "null), else kept as a string (default: the paper's / official defaults); with a small clean "
                     "set lower batch_size (e.g. --param batch_size=32): fewer than 4 steps per epoch are warned")
    pur.add_argument("--clean-fraction", type=_positive_float, default=None,
                     help="defender's clean data as a fraction of the training set, in (0, 1] (default: the "
                     "method's own fraction, raised to 0.2 when that leaves < 20 images per class, e.g. on digits)")
    pur.add_argument("--fast", action="store_true",
                     help="use the method's tiny smoke-test budget (fast_params) under the given --param values")
    pur.add_argument("--noise-finetune", type=_integer, default=None, metavar="EPOCHS",
                     help=f"also save 'purified-METHOD-noise': the purified model fine-tuned for EPOCHS with "
                     f"Gaussian noise at --noise-sigma on the same clean data (default: {D.PURIFY['noise_finetune_epochs']})")
    pur.add_argument("--noise-sigma", type=_positive_float, default=None,
                     help=f"noise std of the fine-tune, pixel units (default: {D.PURIFY['noise_sigma']})")
    pur.add_argument("--seed", type=_integer, default=None, help=f"seed of the clean draw, the method and the fine-tune (default: {D.PURIFY['seed']})")
    _add_common(pur)

    ens = sub.add_parser("ensemble", help="ensembles: RAB smoothing (Mode B) or aggregation (DPA/FA/bagging, Mode D)",
                         description="Mode B: an ensemble of models trained on noised (possibly poisoned) data "
                         "(layout full-noise); Mode D: members trained on pieces of the data (partition, "
                         "finite-aggregation, bootstrap), certified against a number of poisoned samples.")
    ens_sub = ens.add_subparsers(dest="ensemble_command", metavar="ACTION", parser_class=_Parser)
    etrain = ens_sub.add_parser("train", help="train (or resume) the members of an ensemble run",
                                description="Train the members of an ensemble; finished members are kept on "
                                "resume. --layout full-noise (RAB, the default): M members, each on the poisoned "
                                "training set plus one fixed Gaussian draw per training input. partition (DPA; "
                                "--versions V: DPA*), finite-aggregation (FA) or bootstrap (bagging): members train "
                                "without noise on their piece of the data (--k, --d, --members).")
    etrain.add_argument("--out", required=True, help="run directory to create (or resume)")
    etrain.add_argument("--dataset", default=None, help=f"{DATASET_HELP} (default: {D.TRAIN['dataset']})")
    etrain.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W", help=INPUT_SHAPE_HELP)
    etrain.add_argument("--data-root", default=None, help="folder for torchvision datasets")
    etrain.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    etrain.add_argument("--model", default=None, help=f"member architecture (default: {D.ENSEMBLE['model']})")
    etrain.add_argument("--attack", default=None, help=f"attack name (default: {D.TRAIN['attack']})")
    etrain.add_argument("--attack-params", type=_json_dict, default={}, help="attack parameters as JSON")
    etrain.add_argument("--poison-rate", type=_number, default=None, help=f"fraction of training data poisoned (default: {D.ENSEMBLE['poison_rate']})")
    etrain.add_argument("--target", type=_integer, default=None, help=f"target class (default: {D.TRAIN['target']})")
    etrain.add_argument("--members", type=_integer, default=None, help=f"number of members M (default: {D.ENSEMBLE['members']})")
    etrain.add_argument("--sigma", type=_positive_float, default=None, help=f"training and test noise std (default: {D.ENSEMBLE['sigma']})")
    etrain.add_argument("--noise", choices=["fixed", "sample-specific"], default=None,
                        help=f"fixed: RAB's noise at --sigma; sample-specific: Cert-SSB per-training-sample scales "
                        f"by gradient ascent from --sigma, fixed before the members train (default: {D.ENSEMBLE['noise']})")
    etrain.add_argument("--sigma-steps", type=_integer, default=None,
                        help=f"sample-specific: ascent steps for the training and test scales (default: {D.ENSEMBLE['sigma_steps']})")
    etrain.add_argument("--sigma-lr", type=_positive_float, default=None,
                        help=f"sample-specific: ascent learning rate (default: {D.ENSEMBLE['sigma_lr']})")
    etrain.add_argument("--epochs", type=_integer, default=None, help=f"epochs per member (default: {D.ENSEMBLE['epochs']})")
    etrain.add_argument("--lr", type=_positive_float, default=None, help=f"Adam learning rate (default: {D.ENSEMBLE['lr']})")
    etrain.add_argument("--batch-size", type=_integer, default=None, help=f"training batch size (default: {D.ENSEMBLE['batch_size']})")
    etrain.add_argument("--seed", type=_integer, default=None, help=f"run seed; member seeds derive from (seed, member) (default: {D.TRAIN['seed']})")
    etrain.add_argument("--layout", choices=["full-noise", "partition", "finite-aggregation", "bootstrap"], default=None,
                        help="which data each member sees: full-noise (RAB: all of it plus noise; the default), "
                        "partition (DPA: k hash partitions, one member each), finite-aggregation (FA: k*d subsets, "
                        "each sample in d of them), bootstrap (bagging: --members draws of k samples); the "
                        "aggregation layouts train without noise")
    etrain.add_argument("--k", type=_integer, default=None,
                        help="partition / finite-aggregation: number of partitions k; bootstrap: samples per draw")
    etrain.add_argument("--d", type=_integer, default=None, help="finite-aggregation: subsets per sample d")
    etrain.add_argument("--versions", type=_integer, default=None,
                        help="partition: seeded versions per partition (DPA*, 'boosted DPA': k x versions members, "
                        "their logits averaged per partition when certified; default 1)")
    etrain.add_argument("--ablation", choices=["column", "block"], default=None,
                        help="aggregation layouts: train each member as a de-randomized smoothing model (for the "
                        "joint certificate)")
    etrain.add_argument("--band", type=_integer, default=None, help="with --ablation: band (block) width kept")
    etrain.add_argument("--n-jobs", type=_integer, default=1, help="parallel member trainings with joblib (default: 1)")
    etrain.add_argument("--scheduler", default=None,
                        help="Dask scheduler address tcp://HOST:PORT: train members on that cluster instead of joblib")
    _add_common(etrain)
    ecert = ens_sub.add_parser("certify", help="certify an ensemble run (votes are saved and reused)",
                               description="Collect the members' votes on the clean and triggered test sets (once) "
                               "and turn them into certificates for the given alpha and bound.")
    ecert.add_argument("run_dir", help="ensemble run directory")
    ecert.add_argument("--certificate", choices=["l2", "dpa", "roe", "fa", "fa-roe", "bagging", "joint"], default=None,
                       help="l2 (RAB, full-noise runs); poisoning-count certificates from the saved member outputs: "
                       "dpa, roe (DPA+ROE; partition runs), fa, fa-roe (finite-aggregation runs), bagging "
                       "(bootstrap runs), joint (partition runs trained with --ablation: poisoning and a patch). "
                       "Default: the run's own (l2, dpa, fa or bagging); another layout's certificate is refused")
    ecert.add_argument("--patch-size", type=_integer, default=None,
                       help="joint: patch side each member must be certified at (default: the trigger's side)")
    ecert.add_argument("--bonferroni", action="store_true",
                       help="bagging: correct alpha over all certified points (simultaneous instead of per point)")
    ecert.add_argument("--alpha", type=_number, default=None, help=f"failure probability per certificate (default: {D.ENSEMBLE_CERTIFY['alpha']})")
    ecert.add_argument("--bound", choices=["clopper-pearson", "hoeffding"], default=None,
                       help=f"hard votes with Clopper-Pearson, or mean soft scores with Hoeffding (default: {D.ENSEMBLE_CERTIFY['bound']})")
    ecert.add_argument("--no-selection-correction", action="store_true",
                       help="bound pA and pB at alpha each as the released RAB code does (not covered against "
                       "choosing the class from the same votes; for comparison only)")
    ecert.add_argument("--max-points", type=_integer, default=None, help="certify a fixed-seed subsample of the test set")
    ecert.add_argument("--batch-size", type=_integer, default=None, help=f"inputs per forward pass (default: {D.ENSEMBLE_CERTIFY['batch_size']})")
    _add_common(ecert)
    _add_plot_flags(ecert)

    cmp_ = sub.add_parser("compare", help="empirical vs certified robustness: attacks x defenses -> table, plots",
                          description="Run every attack x defense cell (the undefended model, each purifier with "
                          "test-time smoothing of the purified model, the RAB and Cert-SSB ensembles) into one "
                          "comparison directory: table.csv, table.md, plots/. Resumable: finished cells are kept. "
                          "Start from --preset or --spec FILE (YAML or JSON, keys of certkit.runs.compare.grid.CompareSpec); "
                          "the flags below override single settings.")
    cmp_.add_argument("--preset", choices=["digits"], default=None,
                      help="a default grid: digits = BadNets and Blended at 10%%, all 13 purifiers, RAB, Cert-SSB")
    cmp_.add_argument("--spec", default=None, help="spec file (.yaml/.yml or .json); unknown keys are an error")
    cmp_.add_argument("--out", default=None, help="comparison directory (default: runs/compare-<preset> or "
                      "runs/compare); a directory made from another spec is refused")
    cmp_.add_argument("--dataset", default=None, help=DATASET_HELP)
    cmp_.add_argument("--input-shape", type=_shape, default=None, metavar="C,H,W", help=INPUT_SHAPE_HELP)
    cmp_.add_argument("--model", default=None, help="architecture of the backdoored model (default: digits-bn-cnn)")
    cmp_.add_argument("--attacks", nargs="+", default=None, help="attack names (default: badnets)")
    cmp_.add_argument("--poison-rates", type=_positive_float, nargs="+", default=None,
                      help="poison rates (default: 0.1)")
    cmp_.add_argument("--defenses", nargs="+", default=None,
                      help="undefended, purifier names, rab, cert-ssb (default: all)")
    cmp_.add_argument("--sigma", type=_positive_float, default=None, help="smoothing noise (default: 0.25)")
    cmp_.add_argument("--epochs", type=_integer, default=None, help="training epochs of the backdoored model (default: 30)")
    cmp_.add_argument("--members", type=_integer, default=None, help="ensemble members of rab/cert-ssb (default: 10)")
    cmp_.add_argument("--n0", type=_integer, default=None, help="selection draws per point (default: 100)")
    cmp_.add_argument("--n", type=_integer, default=None, help="estimation draws per point (default: 1000)")
    cmp_.add_argument("--alpha", type=_number, default=None, help="failure probability per certificate (default: 0.001)")
    cmp_.add_argument("--max-points", type=_integer, default=None, help="certify a fixed-seed test subsample (default: all)")
    cmp_.add_argument("--reactivation", action="store_true",
                      help="also report the ASR after fine-tuning each purified model on 5 poisoned samples, 5 epochs")
    cmp_.add_argument("--seed", type=_integer, default=None, help="seed (default: 0)")
    cmp_.add_argument("--n-jobs", type=_integer, default=1, help="cells run in parallel with joblib (default: 1)")
    cmp_.add_argument("--scheduler", default=None,
                      help="run the cells on Dask: tcp://HOST:PORT or local-cluster (a LocalCluster of --n-jobs workers)")
    _add_common(cmp_)
    _add_plot_flags(cmp_)

    exp = sub.add_parser("export", help="write one model of a run as a plain TorchScript file or state dict",
                         description="Load a model of a run (sha256-checked, weights_only) and write it for use "
                         "without certkit: torchscript (torch.jit.load(FILE), inputs float32 NCHW in [0, 1], the "
                         "normalisation inside, logits out; checked to give the run model's logits) or state-dict "
                         "(torch.load(FILE, weights_only=True): a dict of tensors). Both write FILE.json describing "
                         "the architecture, input and output.")
    exp.add_argument("run_dir", help="run directory")
    exp.add_argument("--model", required=True, help="model name in the run (an unknown name lists the run's models)")
    exp.add_argument("--out", required=True, metavar="FILE", help="file to write (its description goes to FILE.json)")
    exp.add_argument("--format", choices=["torchscript", "state-dict"], default=None,
                     help="torchscript (default) or state-dict")

    rep = sub.add_parser("report", help="verify a run directory, redraw its plots and print its table")
    rep.add_argument("run_dir", help="run directory")
    rep.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    _add_plot_flags(rep)
    return parser


#: library setting name -> the flag that set it (so that an error names the flag the user typed)
_FLAGS: dict[str, str] = {}


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    """``{library_name: value}`` for the flags the user gave (``names`` maps library names to flag dests)."""
    out = {}
    for key, dest in names.items():
        value = getattr(args, dest, None)
        if value is not None:
            _FLAGS[key] = "--" + dest.replace("_", "-")
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``certkit`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _fold_input_shape(args)
        bars = not (getattr(args, "no_progress", False) or getattr(args, "quiet", False))
        with _plot_options(args):
            return COMMANDS[args.command](args, bars)
    except CertkitError as exc:
        print(f"certkit: error: {_one_line(exc)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("certkit: interrupted; finished steps are saved and will be reused on the next run", file=sys.stderr)
        return 130


def _plot_options(args: argparse.Namespace) -> Any:
    """``--format`` / ``--dpi``: the format and resolution of every plot the command writes."""
    from certkit.certify.plots import plot_options

    return plot_options(**_given(args, format="plot_format", dpi="dpi"))


def _cpu_heavy_note() -> str:
    """``purify --help``: the default budgets that are infeasible on a CPU (:data:`defaults.PURIFY_CPU_HEAVY`)."""
    heavy = ", ".join(f"{m} ({', '.join(f'{k}={v}' for k, v in b.items())})" for m, b in D.PURIFY_CPU_HEAVY.items())
    return (f"Default budgets infeasible on a CPU at CIFAR-10 scale (hours each; preact-resnet18 takes ~1-2 min per "
            f"epoch over 2,500 images): {heavy}; use a GPU or lower them with --param. The other methods take up to "
            "about an hour there, every method minutes on digits. --fast results are smoke tests, labelled so in "
            "reports.")


def _log(args: argparse.Namespace) -> Any:
    """The library's ``log`` callable: lines printed above any progress bar, none with ``--quiet``."""
    from certkit.progress import console_log

    return console_log(getattr(args, "quiet", False))


def _one_line(exc: BaseException) -> str:
    """The error on one line; a message about a library setting names the flag that set it."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    name = text.split(" ", 1)[0]
    return f"{_FLAGS[name]}: {text}" if name in _FLAGS else text


def _fold_input_shape(args: argparse.Namespace) -> None:
    """``--input-shape`` is part of the dataset spec (``npz@C,H,W:PATH``): fold it into ``args.dataset``."""
    if getattr(args, "input_shape", None) is None:
        return
    if args.dataset is None:
        raise _usage("--input-shape needs --dataset npz:PATH")
    from certkit.backdoor.data import dataset_spec

    _FLAGS["input_shape"] = "--input-shape"
    args.dataset = dataset_spec(args.dataset, args.input_shape)


def _demo(args: argparse.Namespace, progress: bool) -> int:
    common = _given(args, attack="attack", attack_params="attack_params", poison_rate="poison_rate",
                    target="target", epochs="epochs", alpha="alpha", seed="seed", max_points="max_points")
    if args.mode == "ensemble":
        from certkit.runs.ensemble_certify import run_ensemble_demo

        print(run_ensemble_demo(**_given(args, out="out", sigmas="sigmas", members="members", n_jobs="n_jobs"),
                                **common, device=args.device, progress=progress, log=_log(args)))
        return 0
    from certkit.runs.demo import run_demo

    print(run_demo(**_given(args, out="out", sigmas="sigmas", n0="n0", n="n"), **common, device=args.device,
                   progress=progress, log=_log(args)))
    print(f"\nrun directory: {args.out or D.DEMO['out']}  (summary.json, points.csv, plots/certified_accuracy.png)")
    return 0


_DATA_FLAGS = dict(dataset="dataset", data_root="data_root", attack="attack", attack_params="attack_params",
                   poison_rate="poison_rate", target="target", seed="seed")


def _train(args: argparse.Namespace, progress: bool) -> int:
    from certkit.runs.single import TrainConfig, train

    cfg = TrainConfig(**_given(args, **_DATA_FLAGS, model="model", epochs="epochs", lr="lr",
                               batch_size="batch_size", noise_sigmas="noise_sigmas", ablation="ablation",
                               band="band", defense="defense", defense_params="defense_params"))
    run = train(cfg, args.out, device=args.device, progress=progress, download=args.download, log=_log(args))
    print(f"run directory: {run.path}")
    return 0


def _certify(args: argparse.Namespace, progress: bool) -> int:
    from certkit.runs.report import report

    if args.certificate != "smoothing":
        from certkit.runs.patch import PatchCertifyConfig, certify_patches

        if args.ids is not None:
            raise _usage("--ids applies to --certificate smoothing (patch certificates take --max-points)")

        cfg = PatchCertifyConfig(certificate=args.certificate, models=args.model, **_given(
            args, patch_sizes="patch_size", masks="masks", theta="theta", rule="rule", max_points="max_points",
            seed="seed", cutout_finetune="cutout_finetune"))
        run = certify_patches(args.run_dir, cfg, device=args.device, progress=progress, log=_log(args))
        print()
        print(report(run.path, replot=False))
        return 0
    from certkit.runs.single import certify

    settings = _given(args, n0="n0", n="n", alpha="alpha", seed="seed", batch_size="batch_size",
                      max_points="max_points", ids="ids", dataset="dataset", data_root="data_root",
                      sigma_modes="sigma_mode", sigma_steps="sigma_steps", sigma_lr="sigma_lr")
    run = certify(args.run_dir, models=args.model, sigmas=args.sigma, device=args.device, progress=progress,
                  download=args.download, log=_log(args), **settings)
    print()
    print(report(run.path, replot=False))
    return 0


def _purify(args: argparse.Namespace, progress: bool) -> int:
    from certkit.runs.purify import PurifyConfig, parse_params, purify
    from certkit.runs.report import report

    cfg = PurifyConfig(method=args.method, params=parse_params(args.param), fast=args.fast,
                       **_given(args, clean_fraction="clean_fraction", noise_finetune_epochs="noise_finetune",
                                noise_sigma="noise_sigma", seed="seed"))
    run = purify(args.run_dir, cfg, device=args.device, progress=progress, log=_log(args))
    print()
    print(report(run.path, replot=False))
    print(f"\nrun directory: {run.path}  (models/{cfg.model_name}.pt, purify/{args.method}.json)")
    return 0


def _ensemble(args: argparse.Namespace, progress: bool) -> int:
    if args.ensemble_command is None:
        raise _usage("ensemble needs an action: train or certify (see --help)")
    if args.ensemble_command == "train":
        from certkit.runs.ensemble_certify import train_ensemble_run
        from certkit.runs.ensemble_train import EnsembleSpec

        sample_specific = args.noise == "sample-specific"
        spec = EnsembleSpec(**_given(args, **_DATA_FLAGS, model="model", members="members", sigma="sigma",
                                     noise="noise", epochs="epochs", lr="lr", batch_size="batch_size",
                                     layout="layout", k="k", d="d", ablation="ablation", band="band",
                                     versions="versions"),
                            **({"sigma_steps": D.ENSEMBLE["sigma_steps"] if args.sigma_steps is None else args.sigma_steps,
                                **_given(args, sigma_lr="sigma_lr")} if sample_specific else {}))
        run = train_ensemble_run(spec, args.out, scheduler=args.scheduler, device=args.device, progress=progress,
                                 log=_log(args), **_given(args, n_jobs="n_jobs"))
        print(f"run directory: {run.path}")
        return 0
    from certkit.runs.aggregation import (
        AggregationCertifyConfig,
        certificate_of,
        certify_ensemble_any,
        check_certify_settings,
    )
    from certkit.runs.ensemble_certify import EnsembleCertifyConfig

    given = [name for name, dest in (("alpha", "alpha"), ("bound", "bound"), ("max_points", "max_points"),
                                     ("batch_size", "batch_size"), ("patch_size", "patch_size")) if
             getattr(args, dest) is not None]
    given += [name for name, on in (("selection_correction", args.no_selection_correction),
                                    ("bonferroni", args.bonferroni)) if on]
    flags = {"selection_correction": "--no-selection-correction"}
    check_certify_settings(certificate_of(args.run_dir, args.certificate), given,
                           flag=lambda n: flags.get(n, "--" + n.replace("_", "-")))
    cfg = EnsembleCertifyConfig(selection_correction=not args.no_selection_correction,
                                **_given(args, alpha="alpha", bound="bound", max_points="max_points",
                                         batch_size="batch_size"))
    agg = AggregationCertifyConfig(bonferroni=args.bonferroni,
                                   **_given(args, alpha="alpha", patch_size="patch_size", batch_size="batch_size"))
    table = certify_ensemble_any(args.run_dir, args.certificate, l2=cfg, aggregation=agg, device=args.device,
                                 progress=progress, log=_log(args))
    print()
    print(table)
    return 0


def _compare(args: argparse.Namespace, progress: bool) -> int:
    from certkit.runs.compare import CompareSpec, console_table, run_compare

    spec = CompareSpec.resolve(preset_name=args.preset, spec_file=args.spec, overrides={
        **_given(args, dataset="dataset", model="model", attacks="attacks", poison_rates="poison_rates",
                 defenses="defenses", sigma="sigma", epochs="epochs", ensemble_members="members", n0="n0", n="n",
                 alpha="alpha", max_points="max_points", seed="seed"),
        **({"reactivation": True} if args.reactivation else {})})
    out = args.out or (f"runs/compare-{args.preset}" if args.preset else "runs/compare")
    res = run_compare(spec, out, scheduler=args.scheduler, device=args.device, progress=progress,
                      log=_log(args), **_given(args, n_jobs="n_jobs"))
    print()
    print(console_table(res.table))
    print(f"\nfull table ({len(res.table.columns)} columns): {res.path / 'table.md'} and table.csv")
    print(f"comparison directory: {res.path}  (table.csv, table.md, cells/, plots/; {res.computed} cell(s) run, "
          f"{res.reused} kept)")
    return 0


def _export(args: argparse.Namespace, progress: bool) -> int:
    from certkit.runs.export import export_model

    print(export_model(args.run_dir, args.model, args.out, **_given(args, format="format")))
    return 0


def _report(args: argparse.Namespace, progress: bool) -> int:
    from certkit.runs.report import report, summary_json

    print(summary_json(args.run_dir) if args.json else report(args.run_dir))
    return 0


def _usage(message: str) -> CertkitError:
    from certkit.errors import InputError

    return InputError(message)


COMMANDS = {"demo": _demo, "train": _train, "certify": _certify, "purify": _purify, "ensemble": _ensemble,
            "compare": _compare, "export": _export, "report": _report}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
