"""Command line interface: ``certkit demo | train | certify | report``.

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


def build_parser() -> argparse.ArgumentParser:
    """The ``certkit`` argument parser (every flag documented in ``--help``)."""
    parser = _Parser(prog="certkit", description="Certified backdoor robustness: "
                                     "randomized smoothing, exact bounds, run directories.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="train a backdoored CNN on digits, certify it, write a run directory",
                          description="Train a BadNets-backdoored CNN on scikit-learn's digits, report CA and ASR, "
                          "certify the clean and triggered test sets with test-time smoothing at each sigma "
                          "(base models trained with noise at that sigma) and report certified trigger robustness.")
    demo.add_argument("--out", default="runs/demo", help="run directory (resumed if it exists; default: runs/demo)")
    demo.add_argument("--sigmas", type=_positive_float, nargs="+", default=[0.12, 0.25, 0.5],
                      help="smoothing noise levels in pixel units (default: 0.12 0.25 0.5)")
    demo.add_argument("--attack", default="badnets", help="attack name (default: badnets)")
    demo.add_argument("--attack-params", type=_json_dict, default={},
                      help="attack parameters as JSON, e.g. '{\"patch_size\": 3}'")
    demo.add_argument("--poison-rate", type=float, default=0.1, help="fraction of training data poisoned (default: 0.1)")
    demo.add_argument("--target", type=int, default=0, help="target class of the backdoor (default: 0)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs per model (default: 30)")
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
    train.add_argument("--model", default="digits-cnn", help="architecture: digits-cnn | rab-mnist-cnn (default: digits-cnn)")
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
    cert.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    cert.add_argument("--batch-size", type=int, default=2000, help="noisy copies per forward pass (default: 2000)")
    cert.add_argument("--dataset", default=None,
                      help="certify on another dataset of the same input shape and classes "
                      "(digits | mnist | cifar10 | gtsrb | npz:PATH | folder:PATH; default: the run's)")
    cert.add_argument("--data-root", default=None, help="folder for torchvision datasets (with --dataset)")
    cert.add_argument("--download", action="store_true", help="allow torchvision to download the dataset")
    _add_certify_flags(cert, n_default=10_000)
    _add_common(cert)

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
    if args.command in ("demo", "certify"):
        check_alpha(args.alpha)
        check_positive_int(args.n0, "--n0")
        check_positive_int(args.n, "--n")
        if args.max_points is not None:
            check_positive_int(args.max_points, "--max-points")
    if args.command == "demo":
        table = ex.run_demo(args.out, sigmas=args.sigmas, attack=args.attack, attack_params=args.attack_params,
                            poison_rate=args.poison_rate, target=args.target, epochs=args.epochs, n0=args.n0,
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
                                             dataset=args.dataset, data_root=args.data_root),
                       device=args.device, progress=progress, download=args.download)
        print()
        print(ex.report(run.path, replot=False))
        return 0
    if args.command == "report":
        if args.json:
            run = RunDirectory.open(args.run_dir)
            print(json.dumps(run.read_json("summary.json"), indent=2))
        else:
            print(ex.report(args.run_dir))
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
