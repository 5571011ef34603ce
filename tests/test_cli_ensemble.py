"""The ensemble commands: train, certify (votes reused), report, demo --mode ensemble, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from certkit.cli import main

SMALL = ["--members", "4", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def ens_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "run"
    assert main(["ensemble", "train", "--out", str(out), "--sigma", "0.25", "--n-jobs", "1", *SMALL]) == 0
    assert main(["ensemble", "certify", str(out), "--alpha", "0.05", "--max-points", "60", "--no-progress"]) == 0
    return out


def test_train_and_certify_write_an_ensemble_run(ens_run):
    manifest = json.loads((ens_run / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble"
    assert sorted(manifest["models"]) == ["member-0000", "member-0001", "member-0002", "member-0003", "undefended"]
    summary = json.loads((ens_run / "summary.json").read_text())
    row = summary["ensemble"]
    assert row["members"] == 4 and row["n_clean"] == 60 and row["alpha"] == 0.05
    assert 0.0 <= row["ensemble_asr"] <= 1.0 and summary["undefended"]["attack_success_rate"] >= 0.0
    points = pd.read_csv(ens_run / "points.csv")
    assert set(points["set"]) == {"clean", "triggered"}
    assert (ens_run / "votes" / "clean.npz").exists() and (ens_run / "plots" / "certified_accuracy.png").exists()


def test_recertifying_reuses_the_votes_and_changes_only_the_bound(ens_run, capsys):
    before = json.loads((ens_run / "summary.json").read_text())["ensemble"]
    votes_bytes = (ens_run / "votes" / "clean.npz").read_bytes()
    assert main(["ensemble", "certify", str(ens_run), "--alpha", "0.05", "--max-points", "60", "--bound",
                 "hoeffding", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("reusing saved votes") == 2
    assert (ens_run / "votes" / "clean.npz").read_bytes() == votes_bytes
    after = json.loads((ens_run / "summary.json").read_text())["ensemble"]
    assert after["bound"] == "hoeffding" and before["bound"] == "clopper-pearson"
    # same votes; the accuracy is that of the aggregate each bound certifies (hard majority / soft ranking)
    from certkit.certify.ensemble import EnsembleVotes

    votes = EnsembleVotes.load(ens_run / "votes" / "clean.npz")
    points = pd.read_csv(ens_run / "points.csv")
    labels = points[points["set"] == "clean"]["label"].to_numpy()
    for summary, bound in ((before, "clopper-pearson"), (after, "hoeffding")):
        assert summary["ensemble_clean_accuracy"] == pytest.approx(np.mean(votes.prediction(bound) == labels))


def test_report_understands_ensemble_runs(ens_run, capsys):
    assert main(["report", str(ens_run)]) == 0
    out = capsys.readouterr().out
    assert "ensemble (M=4" in out and "undefended model" in out


def test_resuming_training_keeps_finished_members(ens_run, capsys):
    mtimes = {p.name: p.stat().st_mtime_ns for p in (ens_run / "models").iterdir()}
    assert main(["ensemble", "train", "--out", str(ens_run), "--sigma", "0.25", *SMALL]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (ens_run / "models").iterdir()} == mtimes


def test_demo_ensemble_mode(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--mode", "ensemble", "--out", str(out), "--members", "3", "--epochs", "1",
                 "--max-points", "30", "--n-jobs", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "undefended model (no noise)" in text and "ensemble (M=3" in text
    assert json.loads((out / "summary.json").read_text())["attack"]["poison_rate"] == 0.02


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ensemble", "train", "--out", "{new}", "--members", "0"], "--members"),
        (["ensemble", "train", "--out", "{new}", "--poison-rate", "1.5"], "poison"),
        (["ensemble", "train", "--out", "{new}", "--target", "11"], "target"),
        (["ensemble", "train", "--out", "{new}", "--attack", "nope"], "unknown attack"),
        (["ensemble", "certify", "{run}", "--alpha", "0"], "alpha"),
        (["ensemble", "certify", "{single}"], "not an ensemble run|needs an ensemble run"),
        (["ensemble", "train", "--out", "{run}", "--sigma", "0.5", "--members", "4"], "different config"),
        (["ensemble", "train", "--out", "{new}", "--scheduler", "tcp://127.0.0.1:1", "--members", "1"], "127.0.0.1:1"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, ens_run, tmp_path, capsys):
    import re

    from certkit.runs.rundir import RunDirectory

    single = tmp_path / "single"
    RunDirectory.create(single, {"train": {}}, kind="single")
    argv = [a.format(run=ens_run, new=tmp_path / "new", single=single) for a in argv]
    extra = ["--no-progress"] if argv[1] == "certify" or "--no-progress" not in argv else []
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(message, err[0], re.IGNORECASE), err[0]
