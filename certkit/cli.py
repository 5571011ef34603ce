"""Command line interface: ``certkit demo | train | certify | purify | compare | report``.

A thin layer over :mod:`certkit.experiments`: it parses arguments, calls the library and prints. Bad input
(a :class:`~certkit.errors.CertkitError`) becomes a one-line ``certkit: error: ...`` message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .devices import DEVICE_CHOICES
from .errors import CertkitError

EPILOG = "Run directories hold manifest.json, summary.json, points.csv, models/ and plots/ (see DESIGN.md section 7)."


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (``certkit: error: ...``) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"certkit: error: {self.prog}: {message} (see --help)\n")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    v = float(text) if text.replace(".", "", 1).replace("e-", "", 1).isdigit() else None
    if v is None:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return v


def _json_dict(text: str) -> dict:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"patch_size\": 3}'")
    return d


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="where models run: auto picks CUDA when available (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_certify_flags(p: argparse.ArgumentParser, *, n_default: int) -> None:
    p.add_argument("--n0", type=int, default=100, help="selection draws per point (default: 100)")
    p.add_argument("--n", type=int, default=n_default, help=f"estimation draws per point (default: {n_default})")
    p.add_argument("--alpha", type=float, default=0.001,
                   help="failure probability of each certificate, in (0, 1) (default: 0.001)")
    p.add_argument("--max-points", type=int, default=None,
                   help="certify a fixed-seed subsample of this many test points (default: all)")


def _purifier_names() -> str:
    try:
        import purifiers

        return ", ".join(purifiers.available())
    except ImportError:  # pragma: no cover
        return "(purifiers package not importable)"


def build_parser() -> argparse.ArgumentParser:
    """The ``certkit`` argument parser (every flag documented in ``--help``)."""
    parser = _Parser(prog="certkit", description="Certified backdoor robustness: "
                                     "randomized smoothing, exact bounds, run directories.", epilog=EPILOG)
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
    demo.add_argument("--members", type=int, default=50, help="ensemble mode: number of members M (default: 50)")
    demo.add_argument("--n-jobs", type=int, default=2, help="ensemble mode: parallel training jobs (default: 2)")
    demo.add_argument("--attack", default="badnets", help="attack name (default: badnets)")
    demo.add_argument("--attack-params", type=_json_dict, default={},
                      help="attack parameters as JSON, e.g. '{\"patch_size\": 3}'")
    demo.add_argument("--poison-rate", type=float, default=None,
                      help="fraction of training data poisoned (default: 0.1 test-time, 0.02 ensemble as in RAB)")
    demo.add_argument("--target", type=int, default=0, help="target class of the backdoor (default: 0)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="training epochs per model (default: 30 test-time, 10 per ensemble member)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, poisoning, training and noise (default: 0)")
    _add_certify_flags(demo, n_default=1000)
    _add_common(demo)

    train = sub.add_parser("train", help="train (possibly backdoored) models into a run directory",
                           description="Train one model per noise level on a poisoned training set.")
    train.add_argument("--out", required=True, help="run directory to create (or resume)")
    train.add_argument("--dataset", default="digits",
                       help="digits | mnist | cifar10 | gtsrb | npz:PATH | folder:PATH (default: digits)")
    train.add_argument("--data-root", default=None, help="folder for torchvision datasets")
    train.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    train.add_argument("--model", default="digits-cnn", help="architecture: digits-cnn | digits-bn-cnn | rab-mnist-cnn | preact-resnet18 (default: digits-cnn)")
    train.add_argument("--attack", default="badnets", help="attack name (default: badnets)")
    train.add_argument("--attack-params", type=_json_dict, default={}, help="attack parameters as JSON")
    train.add_argument("--poison-rate", type=float, default=0.1, help="fraction of training data poisoned (default: 0.1)")
    train.add_argument("--target", type=int, default=0, help="target class (default: 0)")
    train.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30)")
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    train.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    train.add_argument("--noise-sigmas", type=_nonneg_float, nargs="+", default=[0.0],
                       help="train one model per Gaussian augmentation level; 0 = undefended (default: 0)")
    train.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    _add_common(train)

    cert = sub.add_parser("certify", help="certify saved models of a run with test-time smoothing",
                          description="Cohen et al. CERTIFY of each chosen model at each sigma on the clean and "
                          "triggered test sets of the run's dataset.")
    cert.add_argument("run_dir", help="run directory made by `certkit train` or `certkit demo`")
    cert.add_argument("--model", action="append", default=None,
                      help="model name in the run (repeatable; default: every noise-trained model at its own sigma)")
    cert.add_argument("--sigma", type=_positive_float, nargs="+", default=None,
                      help="smoothing sigma(s) for the chosen models (default: each model's training sigma)")
    cert.add_argument("--sigma-mode", nargs="+", choices=["fixed", "sample-specific"], default=["fixed"],
                      help="fixed: Cohen CERTIFY at sigma; sample-specific: Cert-SSB per-point sigmas by gradient "
                      "ascent from sigma + storage-update certification (both: curves on one plot) (default: fixed)")
    cert.add_argument("--sigma-steps", type=int, default=1000,
                      help="sample-specific mode: ascent steps (default: 1000, the released Cert-SSB range 850-1100)")
    cert.add_argument("--sigma-lr", type=_positive_float, default=1e-4,
                      help="sample-specific mode: ascent learning rate (default: 1e-4, the released value)")
    cert.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    cert.add_argument("--batch-size", type=int, default=2000, help="noisy copies per forward pass (default: 2000)")
    cert.add_argument("--dataset", default=None,
                      help="certify on another dataset of the same input shape and classes "
                      "(digits | mnist | cifar10 | gtsrb | npz:PATH | folder:PATH; default: the run's)")
    cert.add_argument("--data-root", default=None, help="folder for torchvision datasets (with --dataset)")
    cert.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    _add_certify_flags(cert, n_default=10_000)
    _add_common(cert)

    pur = sub.add_parser("purify", help="purify a run's backdoored model with an empirical defense",
                         description="Load the run's undefended (backdoored, sigma-0) model, purify it with a "
                         "registered method on clean data drawn from the clean training set (never test data, "
                         "never poisoned samples), evaluate CA/ASR/RA before and after and DER on the test split, "
                         "and save it as model 'purified-METHOD' (certify it with `certkit certify RUN --model "
                         "purified-METHOD --sigma S`) with its report in purify/METHOD.json.",
                         epilog="Methods: " + _purifier_names())
    pur.add_argument("run_dir", help="single-model run directory made by `certkit train` or `certkit demo`")
    pur.add_argument("--method", required=True, help="purification method (see the list below)")
    pur.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="method parameter (repeatable); VALUE is parsed as JSON when possible (3, 0.1, true, "
                     "null), else kept as a string (default: the paper's / official defaults)")
    pur.add_argument("--clean-fraction", type=_positive_float, default=None,
                     help="defender's clean data as a fraction of the training set, in (0, 1] (default: the "
                     "method's own fraction, raised to 0.2 when that leaves < 20 images per class, e.g. on digits)")
    pur.add_argument("--fast", action="store_true",
                     help="use the method's tiny smoke-test budget (fast_params) under the given --param values")
    pur.add_argument("--noise-finetune", type=int, default=0, metavar="EPOCHS",
                     help="also save 'purified-METHOD-noise': the purified model fine-tuned for EPOCHS with "
                     "Gaussian noise at --noise-sigma on the same clean data (default: 0, none)")
    pur.add_argument("--noise-sigma", type=_positive_float, default=0.25,
                     help="noise std of the fine-tune, pixel units (default: 0.25)")
    pur.add_argument("--seed", type=int, default=0, help="seed of the clean draw, the method and the fine-tune (default: 0)")
    _add_common(pur)

    ens = sub.add_parser("ensemble", help="training-time smoothing (RAB ensembles): train, certify",
                         description="Mode B: an ensemble of models trained on noised (possibly poisoned) data.")
    ens_sub = ens.add_subparsers(dest="ensemble_command", metavar="ACTION", parser_class=_Parser)
    etrain = ens_sub.add_parser("train", help="train (or resume) the members of an ensemble run",
                                description="Train M members, each on the poisoned training set plus one fixed "
                                "Gaussian draw per training input; finished members are kept on resume.")
    etrain.add_argument("--out", required=True, help="run directory to create (or resume)")
    etrain.add_argument("--dataset", default="digits",
                        help="digits | mnist | cifar10 | gtsrb | npz:PATH | folder:PATH (default: digits)")
    etrain.add_argument("--data-root", default=None, help="folder for torchvision datasets")
    etrain.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    etrain.add_argument("--model", default="digits-cnn", help="member architecture (default: digits-cnn)")
    etrain.add_argument("--attack", default="badnets", help="attack name (default: badnets)")
    etrain.add_argument("--attack-params", type=_json_dict, default={}, help="attack parameters as JSON")
    etrain.add_argument("--poison-rate", type=float, default=0.02, help="fraction of training data poisoned (default: 0.02)")
    etrain.add_argument("--target", type=int, default=0, help="target class (default: 0)")
    etrain.add_argument("--members", type=int, default=50, help="number of members M (default: 50)")
    etrain.add_argument("--sigma", type=_positive_float, default=0.5, help="training and test noise std (default: 0.5)")
    etrain.add_argument("--noise", choices=["fixed", "sample-specific"], default="fixed",
                        help="fixed: RAB's noise at --sigma; sample-specific: Cert-SSB per-training-sample scales "
                        "by gradient ascent from --sigma, fixed before the members train (default: fixed)")
    etrain.add_argument("--sigma-steps", type=int, default=1000,
                        help="sample-specific: ascent steps for the training and test scales (default: 1000)")
    etrain.add_argument("--sigma-lr", type=_positive_float, default=1e-4,
                        help="sample-specific: ascent learning rate (default: 1e-4)")
    etrain.add_argument("--epochs", type=int, default=10, help="epochs per member (default: 10)")
    etrain.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    etrain.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    etrain.add_argument("--seed", type=int, default=0, help="run seed; member seeds derive from (seed, member) (default: 0)")
    etrain.add_argument("--n-jobs", type=int, default=1, help="parallel member trainings with joblib (default: 1)")
    etrain.add_argument("--scheduler", default=None,
                        help="Dask scheduler address tcp://HOST:PORT: train members on that cluster instead of joblib")
    _add_common(etrain)
    ecert = ens_sub.add_parser("certify", help="certify an ensemble run (votes are saved and reused)",
                               description="Collect the members' votes on the clean and triggered test sets (once) "
                               "and turn them into certificates for the given alpha and bound.")
    ecert.add_argument("run_dir", help="ensemble run directory")
    ecert.add_argument("--alpha", type=float, default=0.001, help="failure probability per certificate (default: 0.001)")
    ecert.add_argument("--bound", choices=["clopper-pearson", "hoeffding"], default="clopper-pearson",
                       help="hard votes with Clopper-Pearson, or mean soft scores with Hoeffding (default: clopper-pearson)")
    ecert.add_argument("--no-selection-correction", action="store_true",
                       help="bound pA and pB at alpha each as the released RAB code does (not covered against "
                       "choosing the class from the same votes; for comparison only)")
    ecert.add_argument("--max-points", type=int, default=None, help="certify a fixed-seed subsample of the test set")
    ecert.add_argument("--batch-size", type=int, default=1024, help="inputs per forward pass (default: 1024)")
    _add_common(ecert)

    cmp_ = sub.add_parser("compare", help="empirical vs certified robustness: attacks x defenses -> table, plots",
                          description="Run every attack x defense cell (the undefended model, each purifier with "
                          "test-time smoothing of the purified model, the RAB and Cert-SSB ensembles) into one "
                          "comparison directory: table.csv, table.md, plots/. Resumable: finished cells are kept. "
                          "Start from --preset or --spec FILE (YAML or JSON, keys of certkit.compare.CompareSpec); "
                          "the flags below override single settings.")
    cmp_.add_argument("--preset", choices=["digits"], default=None,
                      help="a default grid: digits = BadNets and Blended at 10%%, all 13 purifiers, RAB, Cert-SSB")
    cmp_.add_argument("--spec", default=None, help="spec file (.yaml/.yml or .json); unknown keys are an error")
    cmp_.add_argument("--out", default=None, help="comparison directory (default: runs/compare-<preset> or "
                      "runs/compare); a directory made from another spec is refused")
    cmp_.add_argument("--dataset", default=None, help="digits | mnist | cifar10 | gtsrb | npz:PATH | folder:PATH")
    cmp_.add_argument("--model", default=None, help="architecture of the backdoored model (default: digits-bn-cnn)")
    cmp_.add_argument("--attacks", nargs="+", default=None, help="attack names (default: badnets)")
    cmp_.add_argument("--poison-rates", type=_positive_float, nargs="+", default=None,
                      help="poison rates (default: 0.1)")
    cmp_.add_argument("--defenses", nargs="+", default=None,
                      help="undefended, purifier names, rab, cert-ssb (default: all)")
    cmp_.add_argument("--sigma", type=_positive_float, default=None, help="smoothing noise (default: 0.25)")
    cmp_.add_argument("--epochs", type=int, default=None, help="training epochs of the backdoored model (default: 30)")
    cmp_.add_argument("--members", type=int, default=None, help="ensemble members of rab/cert-ssb (default: 10)")
    cmp_.add_argument("--n0", type=int, default=None, help="selection draws per point (default: 100)")
    cmp_.add_argument("--n", type=int, default=None, help="estimation draws per point (default: 1000)")
    cmp_.add_argument("--alpha", type=float, default=None, help="failure probability per certificate (default: 0.001)")
    cmp_.add_argument("--max-points", type=int, default=None, help="certify a fixed-seed test subsample (default: all)")
    cmp_.add_argument("--reactivation", action="store_true",
                      help="also report the ASR after fine-tuning each purified model on 5 poisoned samples, 5 epochs")
    cmp_.add_argument("--seed", type=int, default=None, help="seed (default: 0)")
    cmp_.add_argument("--n-jobs", type=int, default=1, help="cells run in parallel with joblib (default: 1)")
    cmp_.add_argument("--scheduler", default=None,
                      help="run the cells on Dask: tcp://HOST:PORT or local-cluster (a LocalCluster of --n-jobs workers)")
    _add_common(cmp_)

    rep = sub.add_parser("report", help="verify a run directory, redraw its plots and print its table")
    rep.add_argument("run_dir", help="run directory")
    rep.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    return parser


def _certify_pairs(run, models: Sequence[str] | None, sigmas: Sequence[float] | None) -> tuple[tuple[str, float], ...]:
    from .errors import InputError
    from .experiments import TrainConfig, model_name_for

    cfg = TrainConfig.from_dict(run.config["train"])
    trained = {model_name_for(s): s for s in cfg.noise_sigmas}
    names = list(models) if models else [m for m, s in trained.items() if s > 0]
    for m in names:
        if m not in run.manifest["models"]:
            raise InputError(f"model {m!r} is not in run {run.path}; available: {', '.join(run.manifest['models']) or 'none'}")
    if not names:
        raise InputError("no noise-trained model in this run: pass --model NAME and --sigma S")
    if sigmas:
        return tuple((m, float(s)) for m in names for s in sigmas)
    from .purify_runs import purified_noise_sigmas

    trained = {**purified_noise_sigmas(run), **trained}  # noise-fine-tuned purified models: their noise sigma
    missing = [m for m in names if trained.get(m, 0) <= 0]
    if missing:
        raise InputError(f"model(s) {', '.join(missing)} were trained without noise: pass --sigma")
    return tuple((m, trained[m]) for m in names)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``certkit`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _dispatch(args)
    except CertkitError as exc:
        print(f"certkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("certkit: interrupted; finished steps are saved and will be reused on the next run", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from . import experiments as ex
    from ._validation import check_alpha, check_positive_int
    from .records import RunDirectory

    progress = not getattr(args, "no_progress", False)
    if args.command in ("demo", "certify") or getattr(args, "ensemble_command", None) == "certify":
        check_alpha(args.alpha)
        if args.command != "ensemble":
            check_positive_int(args.n0, "--n0")
            check_positive_int(args.n, "--n")
        if args.max_points is not None:
            check_positive_int(args.max_points, "--max-points")
    if args.command == "demo" and args.mode == "ensemble":
        from .ensemble_runs import run_ensemble_demo

        sigmas = args.sigmas or [0.5]
        out = args.out or "runs/demo-ensemble"
        for sigma in sigmas:
            sub_out = out if len(sigmas) == 1 else f"{out}/sigma-{sigma:g}"
            table = run_ensemble_demo(sub_out, sigma=sigma, members=check_positive_int(args.members, "--members"),
                                      attack=args.attack, attack_params=args.attack_params,
                                      poison_rate=0.02 if args.poison_rate is None else args.poison_rate,
                                      target=args.target, epochs=10 if args.epochs is None else args.epochs,
                                      alpha=args.alpha, seed=args.seed, max_points=args.max_points,
                                      n_jobs=check_positive_int(args.n_jobs, "--n-jobs"), device=args.device,
                                      progress=progress)
            print()
            print(table)
            print(f"\nrun directory: {sub_out}  (summary.json, points.csv, votes/, plots/certified_accuracy.png)")
        return 0
    if args.command == "demo":
        args.out = args.out or "runs/demo"
        table = ex.run_demo(args.out, sigmas=args.sigmas or [0.12, 0.25, 0.5], attack=args.attack,
                            attack_params=args.attack_params,
                            poison_rate=0.1 if args.poison_rate is None else args.poison_rate, target=args.target,
                            epochs=30 if args.epochs is None else args.epochs, n0=args.n0,
                            n=args.n, alpha=args.alpha, seed=args.seed, max_points=args.max_points,
                            device=args.device, progress=progress)
        print()
        print(table)
        print(f"\nrun directory: {args.out}  (summary.json, points.csv, plots/certified_accuracy.png)")
        return 0
    if args.command == "train":
        check_positive_int(args.epochs, "--epochs")
        check_positive_int(args.batch_size, "--batch-size")
        cfg = ex.TrainConfig(dataset=args.dataset, model=args.model, attack=args.attack,
                             attack_params=args.attack_params, poison_rate=args.poison_rate, target=args.target,
                             epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             noise_sigmas=tuple(args.noise_sigmas), seed=args.seed, data_root=args.data_root)
        run = RunDirectory.create(args.out, {"train": cfg.to_dict()}, kind=ex.RUN_KIND)
        ex.train_run(run, device=args.device, progress=progress, download=args.download)
        print(f"run directory: {run.path}")
        return 0
    if args.command == "certify":
        run = RunDirectory.open(args.run_dir)
        check_positive_int(args.batch_size, "--batch-size")
        pairs = _certify_pairs(run, args.model, args.sigma)
        ex.certify_run(run, ex.CertifyConfig(pairs=pairs, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed,
                                             batch_size=args.batch_size, max_points=args.max_points,
                                             dataset=args.dataset, data_root=args.data_root,
                                             sigma_modes=tuple(dict.fromkeys(args.sigma_mode)),
                                             sigma_steps=check_positive_int(args.sigma_steps, "--sigma-steps"),
                                             sigma_lr=args.sigma_lr),
                       device=args.device, progress=progress, download=args.download)
        print()
        print(ex.report(run.path, replot=False))
        return 0
    if args.command == "purify":
        from .purify_runs import PurifyConfig, parse_params, purify_run

        cfg = PurifyConfig(method=args.method, params=parse_params(args.param), clean_fraction=args.clean_fraction,
                           fast=args.fast, noise_finetune_epochs=args.noise_finetune, noise_sigma=args.noise_sigma,
                           seed=args.seed)
        run = RunDirectory.open(args.run_dir)
        purify_run(run, cfg, device=args.device, progress=progress)
        print()
        print(ex.report(run.path, replot=False))
        print(f"\nrun directory: {run.path}  (models/{cfg.model_name}.pt, purify/{args.method}.json)")
        return 0
    if args.command == "compare":
        return _dispatch_compare(args, progress)
    if args.command == "ensemble":
        return _dispatch_ensemble(args, progress)
    if args.command == "report":
        if args.json:
            run = RunDirectory.open(args.run_dir)
            print(json.dumps(run.read_json("summary.json"), indent=2))
        else:
            print(ex.report(args.run_dir))
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


def _dispatch_compare(args: argparse.Namespace, progress: bool) -> int:
    from .compare import CompareSpec, preset, run_compare

    if args.preset and args.spec:
        print("certkit: error: give --preset or --spec, not both", file=sys.stderr)
        return 2
    base = (preset(args.preset) if args.preset else CompareSpec.from_file(args.spec) if args.spec
            else CompareSpec()).to_dict()
    flags = {"dataset": args.dataset, "model": args.model, "attacks": args.attacks, "poison_rates": args.poison_rates,
             "defenses": args.defenses, "sigma": args.sigma, "epochs": args.epochs, "ensemble_members": args.members,
             "n0": args.n0, "n": args.n, "alpha": args.alpha, "max_points": args.max_points, "seed": args.seed}
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.reactivation:
        base["reactivation"] = True
    spec = CompareSpec.from_dict(base)
    out = args.out or (f"runs/compare-{args.preset}" if args.preset else "runs/compare")
    res = run_compare(spec, out, n_jobs=args.n_jobs, scheduler=args.scheduler, device=args.device, progress=progress)
    print()
    print((res.path / "table.md").read_text())
    print(f"comparison directory: {res.path}  (table.csv, table.md, cells/, plots/; {res.computed} cell(s) run, "
          f"{res.reused} kept)")
    return 0


def _dispatch_ensemble(args: argparse.Namespace, progress: bool) -> int:
    from . import ensemble_runs as er
    from ._validation import check_positive_int
    from .ensemble_training import EnsembleSpec, train_ensemble
    from .records import RunDirectory

    if args.ensemble_command is None:
        print("certkit: error: ensemble needs an action: train or certify (see --help)", file=sys.stderr)
        return 2
    if args.ensemble_command == "train":
        spec = EnsembleSpec(dataset=args.dataset, data_root=args.data_root, model=args.model, attack=args.attack,
                            attack_params=args.attack_params, poison_rate=args.poison_rate, target=args.target,
                            members=check_positive_int(args.members, "--members"), sigma=args.sigma,
                            epochs=check_positive_int(args.epochs, "--epochs"), lr=args.lr,
                            batch_size=check_positive_int(args.batch_size, "--batch-size"), seed=args.seed,
                            **({"noise": "sample-specific",
                                "sigma_steps": check_positive_int(args.sigma_steps, "--sigma-steps"),
                                "sigma_lr": args.sigma_lr} if args.noise == "sample-specific" else {}))
        run = train_ensemble(spec, args.out, n_jobs=check_positive_int(args.n_jobs, "--n-jobs"),
                             scheduler=args.scheduler, device=args.device, progress=progress)
        er.train_undefended(run, spec, er.prepare_data(spec), device=args.device, progress=progress, log=print)
        print(f"run directory: {run.path}")
        return 0
    cfg = er.check_ensemble_certify_config(er.EnsembleCertifyConfig(
        alpha=args.alpha, bound=args.bound, selection_correction=not args.no_selection_correction,
        max_points=args.max_points, batch_size=args.batch_size))
    run = RunDirectory.open(args.run_dir)
    summary = er.certify_ensemble_run(run, cfg, device=args.device, progress=progress)
    print()
    print(er.ensemble_report_table(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
