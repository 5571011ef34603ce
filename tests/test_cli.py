"""The certkit command line: demo, train, certify, report, bad input (exit code 2, one line)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from scipy.stats import binom

from certkit.cli import build_parser, main

FAST = ["--epochs", "4", "--n0", "20", "--n", "100", "--max-points", "40", "--no-progress"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    code = main(["demo", "--out", str(out), "--sigmas", "0.25", "0.5", *FAST])
    assert code == 0
    return out


def test_demo_writes_a_complete_run_directory(demo_run, capsys):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert set(summary["empirical"]) == {"undefended", "noise-0.25", "noise-0.5"}
    # the backdoor works on the undefended model: ASR far above chance (10 classes)
    assert summary["empirical"]["undefended"]["attack_success_rate"] > 0.5
    assert summary["empirical"]["undefended"]["clean_accuracy"] > 0.8
    rows = {(r["model"], r["sigma"]): r for r in summary["certified"]}
    assert set(rows) == {("noise-0.25", 0.25), ("noise-0.5", 0.5)}
    for r in rows.values():
        assert r["n_clean"] == 40
        assert 0 <= r["certified_trigger_robustness"] <= 1
        b = r["asr_bound"]  # simultaneous over the test set: 1 - CTR + q / N at 95%
        assert b["delta"] == 0.05 and b["alpha"] == r["alpha"] and b["method"] == "binomial"
        assert b["bound"] == pytest.approx(min(1.0, 1 - r["certified_trigger_robustness"] + b["q"] / b["n"]))
        assert binom.sf(b["q"] - 1, b["n"], r["alpha"]) <= 0.05 < binom.sf(b["q"] - 2, b["n"], r["alpha"]) \
            or b["q"] == 1
        acc = list(r["certified_accuracy"].values())
        assert acc == sorted(acc, reverse=True)
    points = pd.read_csv(demo_run / "points.csv")
    assert set(points["set"]) == {"clean", "triggered"}
    assert (points.loc[points["set"] == "clean"].groupby("model").size() == 40).all()
    assert (demo_run / "plots" / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((demo_run / "manifest.json").read_text())
    assert set(manifest["models"]) == {"undefended", "noise-0.25", "noise-0.5"}
    assert all(len(m["sha256"]) == 64 for m in manifest["models"].values())


def test_demo_resumes_without_retraining_or_recertifying(demo_run, capsys):
    before = (demo_run / "points.csv").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (demo_run / "models").iterdir()}
    assert main(["demo", "--out", str(demo_run), "--sigmas", "0.25", "0.5", *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("checkpoint verified, not retrained") == 3
    assert {p.name: p.stat().st_mtime_ns for p in (demo_run / "models").iterdir()} == mtimes
    assert (demo_run / "points.csv").read_text() == before


def test_demo_refuses_a_directory_made_with_another_config(demo_run, capsys):
    code = main(["demo", "--out", str(demo_run), "--sigmas", "0.25", "0.5", *FAST[:-1], "--poison-rate", "0.2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config" in err[0]


def test_report_prints_the_table_and_redraws_the_plot(demo_run, capsys):
    plot = demo_run / "plots" / "certified_accuracy.png"
    plot.unlink()
    assert main(["report", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert "undefended" in out and "CTR" in out and "noise-0.5" in out
    assert plot.exists()
    assert main(["report", str(demo_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["certified"]


def test_certify_a_saved_model_at_another_sigma(demo_run, capsys):
    code = main(["certify", str(demo_run), "--model", "undefended", "--sigma", "0.12", "--n0", "20", "--n", "50",
                 "--max-points", "10", "--no-progress"])
    assert code == 0
    summary = json.loads((demo_run / "summary.json").read_text())
    # added to what the demo certified (earlier rows kept, issue: a second certify erased the first)
    assert [(r["model"], r["sigma"], r["n"]) for r in summary["certified"]] == [
        ("noise-0.25", 0.25, 100), ("noise-0.5", 0.5, 100), ("undefended", 0.12, 50)]


def test_train_then_certify_on_an_npz_dataset(tmp_path, capsys):
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0 * 255).astype(np.uint8)[:, :, :, None]  # NHWC uint8
    np.savez(tmp_path / "digits.npz", x_train=x[:1200], y_train=d.target[:1200], x_test=x[1200:1400],
             y_test=d.target[1200:1400])
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--dataset", f"npz:{tmp_path / 'digits.npz'}", "--epochs", "2",
                 "--noise-sigmas", "0.25", "--no-progress"]) == 0
    assert main(["certify", str(out), "--n0", "10", "--n", "30", "--max-points", "8", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["n_test"] == 200
    assert summary["certified"][0]["model"] == "noise-0.25"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["certify", "{run}", "--alpha", "1.5"], "alpha"),
        (["certify", "{run}", "--n", "0"], "--n"),
        (["certify", "{run}", "--model", "nope", "--sigma", "0.1"], "model 'nope' is not in run"),
        (["certify", "{run}", "--model", "undefended"], "trained without noise"),
        (["certify", "{missing}"], "does not exist"),
        (["train", "--out", "{new}", "--attack", "nope"], "unknown attack"),
        (["train", "--out", "{new}", "--dataset", "imagenet"], "unknown dataset"),
        (["train", "--out", "{new}", "--target", "12"], "target"),
        (["train", "--out", "{new}", "--dataset", "mnist", "--data-root", "{new}"], "download"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, demo_run, tmp_path, capsys):
    argv = [a.format(run=demo_run, missing=tmp_path / "missing", new=tmp_path / "new") for a in argv]
    assert main(argv + ["--no-progress"] if argv[0] != "report" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("certkit: error:") and message.lower() in err[0].lower()


def test_report_detects_a_tampered_points_file(tmp_path, demo_run, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_run, copy)
    with open(copy / "points.csv", "a") as fh:
        fh.write("tampered\n")
    assert main(["report", str(copy)]) == 2
    assert "points.csv" in capsys.readouterr().err


def test_every_flag_is_documented():
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices.values():  # each sub-command
        for a in action._actions:
            if a.option_strings and a.dest != "help":
                assert a.help, f"{action.prog} {a.option_strings} has no help"


def test_usage_errors_are_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["certify"])  # missing RUN_DIR
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkit: error:") and "run_dir" in err[0]
    assert main(["demo", "--sigmas", "-0.5"]) == 2
    assert "positive" in capsys.readouterr().err


def test_certify_on_another_dataset_checks_shapes(demo_run, tmp_path, capsys):
    import numpy as np

    bad = tmp_path / "rgb.npz"
    x = np.zeros((20, 8, 8, 3), dtype=np.uint8)
    y = np.arange(20) % 10
    np.savez(bad, x_train=x, y_train=y, x_test=x, y_test=y)
    code = main(["certify", str(demo_run), "--dataset", f"npz:{bad}", "--n0", "5", "--n", "10", "--no-progress"])
    assert code == 2
    assert "expects 10 classes and inputs (1, 8, 8)" in capsys.readouterr().err


def test_certify_sample_specific_beside_fixed(demo_run, capsys):
    code = main(["certify", str(demo_run), "--model", "noise-0.25", "--sigma", "0.25", "--sigma-mode", "fixed",
                 "sample-specific", "--sigma-steps", "20", "--n0", "20", "--n", "100", "--max-points", "30",
                 "--no-progress"])
    assert code == 0
    summary = json.loads((demo_run / "summary.json").read_text())
    rows = {r["sigma_mode"]: r for r in summary["certified"]}
    assert set(rows) == {"fixed", "sample-specific"}
    ssb = rows["sample-specific"]
    # sigma only grows under the released (detached) ascent, and the store covers what was certified
    assert ssb["sigma_mean"] >= 0.25
    storage = ssb["storage"]
    assert storage["counts"]["n_stored"] == 30 - round(30 * ssb["abstain_rate"])
    assert storage["kind"] == "transductive, order-dependent" and "before (without)" in storage["triggered_order"]
    assert "not a certificate" in capsys.readouterr().out  # the clean-first CTR is shown only as a diagnostic
    points = pd.read_csv(demo_run / "points.csv")
    clean_ssb = points[(points["sigma_mode"] == "sample-specific") & (points["set"] == "clean")]
    assert (clean_ssb["sigma"] >= 0.25).all() and clean_ssb["sigma"].nunique() > 1
    stores = {p.name for p in (demo_run / "stores").iterdir()}
    assert {"noise-0.25__sigma-0.25.npz", "noise-0.25__sigma-0.25__triggered-first.npz"} <= stores
    assert (demo_run / "sigmas" / "noise-0.25__sigma-0.25__triggered.npz").exists()  # optimised on x + t


def test_the_cli_lists_repeated_for_a_fast_help_match_the_library():
    import purifiers
    from certkit import cli
    from certkit.devices import DEVICE_CHOICES

    assert cli.PURIFIER_NAMES == tuple(purifiers.available())
    assert cli.DEVICE_CHOICES == DEVICE_CHOICES


def test_help_does_not_import_torch():
    import subprocess
    import sys

    for argv in (["--help"], ["train", "--help"], ["purify", "--help"], ["compare", "--help"]):
        code = (f"import sys; from certkit.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == "False", argv
