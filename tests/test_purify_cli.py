"""`certkit purify` and certification of purified models, end to end on a tiny digits run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import purifiers
from certkit.backdoor.prepare import draw_clean_indices
from certkit.backdoor.prepare import prepare_data as prepare
from certkit.cli import main
from certkit.errors import InputError
from certkit.runs.models import build_model_from_spec
from certkit.runs.purify import default_clean_fraction, load_run_model, parse_params, purified_spec
from certkit.runs.rundir import RunDirectory
from certkit.runs.single import TrainConfig

CPU = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A BadNets digits run (8 epochs: CA ~0.95, ASR ~0.97) purified with fst (+ noise fine-tune) and npd."""
    out = tmp_path_factory.mktemp("runs") / "purify"
    assert main(["train", "--out", str(out), "--epochs", "8", *CPU]) == 0
    assert main(["purify", str(out), "--method", "fst", "--fast", "--noise-finetune", "2", *CPU]) == 0
    assert main(["purify", str(out), "--method", "npd", "--fast", "--param", "bound=2.0", *CPU]) == 0
    return out


def _record(run_dir, method):
    return json.loads((run_dir / "purify" / f"{method}.json").read_text())


def test_purify_writes_models_and_reports(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"undefended", "purified-fst", "purified-fst-noise", "purified-npd"} <= set(manifest["models"])
    assert all(len(manifest["models"][m]["sha256"]) == 64 for m in manifest["models"])
    rec = _record(run_dir, "fst")
    assert rec["params"]["epochs"] == purifiers.fast_params("fst")["epochs"]  # --fast budget recorded
    assert rec["seed"] == 0 and manifest["seeds"]["purify/fst"] == 0
    rep = rec["report"]
    # observed (8-epoch run, fst fast budget of 2 epochs on 251 images): CA 0.950 -> 0.581, ASR 0.967 -> 0.136;
    # the tiny budget costs clean accuracy, the backdoor is mostly gone
    assert rep["asr_before"] > 0.8 and rep["asr_after"] < 0.5 * rep["asr_before"]
    assert rep["runtime_s"] > 0 and 0 <= rep["der"] <= 1
    noise = rec["noise_finetune"]
    assert noise["model"] == "purified-fst-noise" and noise["sigma"] == 0.25 and noise["epochs"] == 2
    assert noise["asr_change"] == pytest.approx(noise["report"]["asr_after"] - rep["asr_after"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["purified"]["purified-fst-noise"]["noise_sigma"] == 0.25
    assert summary["purified"]["purified-npd"]["noise_sigma"] is None
    assert summary["empirical"]["undefended"]["attack_success_rate"] == pytest.approx(rep["asr_before"])


def test_defender_data_is_clean_training_data(run_dir):
    rec = _record(run_dir, "fst")
    idx = np.asarray(rec["clean"]["train_indices"])
    exp = prepare(TrainConfig.from_dict(RunDirectory.open(run_dir).config["train"]))
    n_train = len(exp.splits.train)
    # digits: fst's own 2% would be ~2.5 images per class, so the default is raised to 20%
    assert rec["clean"]["fraction"] == 0.2 == default_clean_fraction("fst", n_train, 10)
    assert len(idx) == round(0.2 * n_train) == rec["clean"]["n"] and len(np.unique(idx)) == len(idx)
    assert not set(idx.tolist()) & set(exp.poisoned.poison_indices.tolist())
    clean = exp.splits.train.subset(idx)
    assert torch.equal(clean.y, exp.poisoned.dataset.y[idx])  # labels are the true ones
    test_rows = {row.numpy().tobytes() for row in exp.splits.test.x}
    assert not any(row.numpy().tobytes() in test_rows for row in clean.x)
    assert clean.sha256() == rec["clean"]["sha256"]


def test_npd_polarizer_round_trips_and_matches_a_fresh_purification(run_dir):
    from purifiers.npd import Polarized

    run = RunDirectory.open(run_dir)
    spec = run.model_spec("purified-npd")
    assert spec["structure"][0]["op"] == "neural-polarizer"
    model = load_run_model(run, "purified-npd")
    assert sum(isinstance(m, Polarized) for m in model.modules()) == 1
    assert next(iter(model.children())).__class__.__name__ == "Normalize"
    # independent check: the same purification, redone in memory on the recorded clean indices
    rec = _record(run_dir, "npd")
    exp = prepare(TrainConfig.from_dict(run.config["train"]))
    clean = exp.splits.train.subset(np.asarray(rec["clean"]["train_indices"]))
    undefended = load_run_model(run, "undefended")
    fresh = purifiers.make("npd", **{**purifiers.fast_params("npd"), "bound": 2.0}, device="cpu").purify(
        undefended, clean, seed=0)
    x = exp.splits.test.x[:64]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    rep = purifiers.evaluate(undefended, model, exp.splits.test, exp.triggered, device="cpu")
    assert rep.asr_after == pytest.approx(rec["report"]["asr_after"])
    assert rep.ca_after == pytest.approx(rec["report"]["ca_after"])


def test_certify_purified_models_with_and_without_noise_finetune(run_dir, capsys):
    args = ["--n0", "20", "--n", "100", "--max-points", "20", *CPU]
    assert main(["certify", str(run_dir), "--model", "purified-fst", "--model", "purified-fst-noise",
                 "--sigma", "0.25", *args]) == 0
    out = capsys.readouterr().out
    assert "purified-fst-noise" in out and "purified model" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["certified"]}
    assert set(rows) == {"purified-fst", "purified-fst-noise"}
    for r in rows.values():
        assert r["n_clean"] == 20 and r["sigma"] == 0.25
        acc = list(r["certified_accuracy"].values())
        assert acc == sorted(acc, reverse=True) and 0 <= acc[0] <= 1
    assert (run_dir / "plots" / "purified_certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    (run_dir / "plots" / "purified_certified_accuracy.png").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "purified-fst-noise" in capsys.readouterr().out
    assert (run_dir / "plots" / "purified_certified_accuracy.png").exists()
    # the noise-fine-tuned model defaults to its fine-tune sigma; the plain purified one needs --sigma
    assert main(["certify", str(run_dir), "--model", "purified-fst-noise", "--n0", "10", "--n", "20",
                 "--max-points", "5", *CPU]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["certified"][0]["sigma"] == 0.25
    capsys.readouterr()
    assert main(["certify", str(run_dir), "--model", "purified-npd", "--max-points", "5", *CPU]) == 2
    assert "pass --sigma" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "available: "),
    (["--method", "fst", "--param", "epochz=3"], "valid: alpha, epochs"),
    (["--method", "fst", "--param", "epochs=0"], "epochs must be a positive integer"),
    (["--method", "fst", "--param", "epochs"], "KEY=VALUE"),
    (["--method", "fst", "--param", "device=cpu"], "--device"),
    (["--method", "fst", "--clean-fraction", "1.5"], "(0, 1]"),
])
def test_bad_input_exits_2_with_one_line(run_dir, capsys, argv, message):
    assert main(["purify", str(run_dir), *argv, *CPU]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkit: error:") and message in err[0]


def test_missing_run_and_unknown_method_listing(tmp_path, capsys):
    assert main(["purify", str(tmp_path / "nowhere"), "--method", "fst", *CPU]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["purify", str(tmp_path / "nowhere"), "--method", "nope", *CPU]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in purifiers.available())


def test_parse_params():
    assert parse_params(["epochs=3", "alpha=0.5", "train_bn=false", "bound=null", "mode=abc", "x=a=b"]) == {
        "epochs": 3, "alpha": 0.5, "train_bn": False, "bound": None, "mode": "abc", "x": "a=b"}
    with pytest.raises(InputError, match="twice"):
        parse_params(["a=1", "a=2"])


def test_draw_clean_indices_excludes_and_is_seeded():
    a = draw_clean_indices(100, np.arange(50), 0.3, seed=1)
    assert len(a) == 30 and a.min() >= 50 and np.array_equal(a, draw_clean_indices(100, np.arange(50), 0.3, seed=1))
    assert not np.array_equal(a, draw_clean_indices(100, np.arange(50), 0.3, seed=2))
    with pytest.raises(InputError, match="unpoisoned"):
        draw_clean_indices(100, np.arange(50), 0.6, seed=0)


def test_unknown_structure_is_refused():
    from certkit.backdoor.models import build_model

    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    assert purified_spec(model, model.certkit_spec) == model.certkit_spec
    model.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(InputError, match="cannot be rebuilt"):
        purified_spec(model, model.certkit_spec)
    with pytest.raises(InputError, match="unknown structural operation"):
        build_model_from_spec({**model.certkit_spec, "structure": [{"op": "magic"}]})
