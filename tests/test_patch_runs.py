"""Patch certificates of run directories (Mode C): training with ablation, `certkit certify --certificate
patch|patchcleanser`, records, the patch CTR and its "not applicable" for global triggers, bad input."""

from __future__ import annotations

import json

import pytest

from certkit.certify.patch import AblatedModel
from certkit.cli import main
from certkit.runs.rundir import RunDirectory

QUIET = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "run"
    assert main(["train", "--out", str(out), "--epochs", "3", "--ablation", "column", "--band", "2", *QUIET]) == 0
    return out


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_training_with_ablation_saves_a_rebuildable_smoothing_model(patch_run):
    run = RunDirectory.open(patch_run)
    assert {"undefended", "column-ablation-b2"} <= set(run.models())
    assert run.model_spec("column-ablation-b2")["ablation"] == {"kind": "column", "band": 2, "channels": 1}
    from certkit.runs.models import build_model_from_spec

    model = run.load_model("column-ablation-b2", builder=build_model_from_spec)
    assert isinstance(model, AblatedModel) and model.channels == 1
    emp = _summary(patch_run)["empirical"]["column-ablation-b2"]
    assert emp["ablation"] == "column" and 0 <= emp["clean_accuracy"] <= 1


def test_certify_patch_and_patchcleanser_add_rows_with_unit_and_patch_ctr(patch_run, capsys):
    assert main(["certify", str(patch_run), "--certificate", "patch", "--max-points", "30", *QUIET]) == 0
    assert main(["certify", str(patch_run), "--certificate", "patchcleanser", "--patch-size", "2", "--masks", "3",
                 "--max-points", "12", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "patch CTR" in out and "column-smoothing" in out and "patchcleanser" in out
    rows = {r["certificate"]: r for r in _summary(patch_run)["patch"]}
    assert set(rows) == {"column-smoothing", "patchcleanser"}
    col = rows["column-smoothing"]
    assert col["unit"] == "patch side (pixels)" and col["n_clean"] == 30 and col["trigger_patch_side"] == 2
    acc = [col["certified_accuracy"][str(m)] for m in range(1, 9)]
    assert acc == sorted(acc, reverse=True) and acc[-1] == 0.0  # no 8-wide patch can be certified with 8 votes
    assert 0.0 <= col["patch_ctr"] <= 1.0
    assert rows["patchcleanser"]["settings"]["patch_size"] == 2
    run = RunDirectory.open(patch_run)
    points = run.read_frame("patch_points.csv")
    assert set(points["certificate"]) == {"column-smoothing", "patchcleanser"}
    assert (run.path / "plots" / "patch_certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert run.verify() == []


def test_a_global_trigger_has_no_patch_ctr(tmp_path):
    out = tmp_path / "blended"
    assert main(["train", "--out", str(out), "--epochs", "1", "--attack", "blended", "--ablation", "block",
                 "--band", "3", *QUIET]) == 0
    assert main(["certify", str(out), "--certificate", "patch", "--max-points", "10", "--patch-size", "1", "2",
                 *QUIET]) == 0
    (row,) = _summary(out)["patch"]
    assert row["patch_ctr"] is None and "not applicable" in row["patch_ctr_meaning"]
    assert row["certificate"] == "block-smoothing"


@pytest.mark.parametrize("argv,message", [
    (["--ablation", "column", "--band", "0"], "band must be a positive integer"),
    (["--ablation", "column", "--band", "9"], "band 9 is larger than the 8x8 images"),
    (["--ablation", "column"], "--ablation needs --band"),
    (["--band", "2"], "--band applies to --ablation"),
])
def test_bad_ablation_settings_are_one_line_and_create_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *argv, *QUIET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkit: error:") and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--certificate", "patch", "--model", "undefended"], "was not trained with ablation"),
    (["--certificate", "patchcleanser", "--model", "column-ablation-b2", "--patch-size", "2"],
     "PatchCleanser needs a plain model"),
    (["--certificate", "patchcleanser"], "give one --patch-size P"),
    (["--certificate", "patchcleanser", "--patch-size", "9"], "patch_size"),
    (["--certificate", "patch", "--patch-size", "0"], "patch size must be a positive integer"),
])
def test_bad_patch_certify_requests_are_one_line_and_change_nothing(patch_run, capsys, argv, message):
    before = (patch_run / "summary.json").read_bytes()
    assert main(["certify", str(patch_run), "--max-points", "5", *argv, *QUIET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkit: error:") and message in err[0], err
    assert (patch_run / "summary.json").read_bytes() == before


def test_patchcleanser_with_a_cutout_finetune_certifies_a_recorded_copy(patch_run, capsys):
    assert main(["certify", str(patch_run), "--certificate", "patchcleanser", "--patch-size", "2", "--masks", "3",
                 "--cutout-finetune", "1", "--max-points", "12", *QUIET]) == 0
    run = RunDirectory.open(patch_run)
    assert "undefended-cutout1" in run.models()
    step = run.manifest["steps"]["cutout/undefended-cutout1"]
    assert step["base"] == "undefended" and step["mask_side"] == 4 and step["epochs"] == 1   # k = 3 masks: side 4
    assert step["clean_samples"] == round(0.2 * 1257)
    models = {r["model"] for r in _summary(patch_run)["patch"] if r["certificate"] == "patchcleanser"}
    assert "undefended-cutout1" in models
    # the fine-tuned copy differs from the model it started from, and the original is untouched
    import torch
    a, b = run.load_state_dict("undefended"), run.load_state_dict("undefended-cutout1")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main(["certify", str(patch_run), "--certificate", "patch", "--cutout-finetune", "1", *QUIET]) == 2
    assert "applies to --certificate patchcleanser only" in capsys.readouterr().err


def test_cutout_hides_between_one_and_two_squares_per_image():
    import torch

    from certkit.certify.patch import CutoutTransform

    t = CutoutTransform(side=3, seed=5, masks=2)
    hidden = (t(torch.ones(64, 1, 8, 8), 0) == 0).sum(dim=(1, 2, 3))
    assert int(hidden.min()) >= 9 and int(hidden.max()) <= 18 and (hidden > 9).any()
    assert not torch.equal(t(torch.ones(4, 1, 8, 8), 0), t(torch.ones(4, 1, 8, 8), 1))
