"""``certkit train --defense fct-st``: FCT's D-ST (Chen, Wu, Wang, NeurIPS 2022) as a training-time run path.
On digits it lowers the BadNets ASR within a stated clean-accuracy margin, the split is stored and reported,
the resolved settings are in the manifest, a resumed run does not retrain, and bad input is one line with
nothing written."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from conftest import file_snapshot, one_line_error, one_thread

from certkit.cli import main
from certkit.errors import InputError, UnknownNameError
from certkit.runs.defaults import FCT_SD_DIGITS, FCT_ST_DIGITS
from certkit.runs.fct import SD_SETTINGS, ST_SETTINGS, fct_st_settings, fct_st_work
from certkit.runs.rundir import RunDirectory
from certkit.runs.single import TrainConfig
from purifiers.fct import CLEAN, POISONED, fct_secure_train, split_sizes

QUIET = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def dst_run(tmp_path_factory):
    """A digits BadNets run (8 epochs) with the D-ST model at the digits defaults (about 10 s)."""
    out = tmp_path_factory.mktemp("dst") / "run"
    with one_thread():
        assert main(["train", "--out", str(out), "--epochs", "8", "--defense", "fct-st", *QUIET]) == 0
    return out


def test_dst_lowers_the_asr_of_the_same_poisoned_training_within_the_margin(dst_run):
    """Observed (digits-cnn, one thread, seed 0): undefended CA ~0.97 / ASR ~1.0, D-ST CA ~0.9 / ASR ~0.3
    (seeds 0-2 of `certkit train --defense fct-st`, two threads: ASR 0.34 / 0.02 / 0.03, CA 0.91-0.92).
    Margin stated here: ASR at least 0.3 lower, CA at most 0.12 lower than the undefended model's."""
    emp = json.loads((dst_run / "summary.json").read_text())["empirical"]
    und, dst = emp["undefended"], emp["fct-st"]
    assert und["attack_success_rate"] > 0.9
    assert dst["attack_success_rate"] < und["attack_success_rate"] - 0.3
    assert dst["clean_accuracy"] >= und["clean_accuracy"] - 0.12
    assert dst["defense"] == "fct-st" and dst["noise_sigma"] == 0.0


def test_the_split_is_stored_with_its_diagnostic_and_the_settings_resolved(dst_run):
    run = RunDirectory.open(dst_run)
    split = run.read_summary()["empirical"]["fct-st"]["split"]
    n = split["n"]
    assert n == 1257 and split["n_poisoned"] == split_sizes(n)[1]  # D_c is per class on digits: not checked
    # observed: D_p precision 1.00 (62 samples, 49% of the 126 poisoned)
    assert split["poisoned_precision"] >= 0.8 and split["n_poisoned_true"] == 126
    assert run.has_file(split["file"]) and split["file"] == "train/fct-st_split.npz"
    with np.load(run.file(split["file"])) as z:
        assert z["scores"].shape == z["flags"].shape == (n,)
        assert int((z["flags"] == POISONED).sum()) == split["n_poisoned"]
        assert int((z["flags"] == CLEAN).sum()) == split["n_clean"] and set(np.unique(z["flags"])) <= {0, 1, 2}
        assert float(z["gamma_p"]) == pytest.approx(split["gamma_p"])
    cfg = run.config["train"]
    assert cfg["defense"] == "fct-st"
    sd, st = cfg["defense_params"]["sd"], cfg["defense_params"]["st"]
    assert sd.items() >= FCT_SD_DIGITS.items() and st.items() >= json.loads(json.dumps(FCT_ST_DIGITS)).items()
    assert set(sd) == SD_SETTINGS and set(st) == ST_SETTINGS  # every value it trained with, defaults included
    assert st["temperature"] == 0.1 and sd["alpha_p"] == 0.05
    # the D-ST model has the run's architecture: certifiable like any model of the run
    assert run.model_spec("fct-st") == run.model_spec("undefended")


def test_a_resumed_run_does_not_retrain_and_the_report_names_the_method(dst_run, capsys):
    sha = RunDirectory.open(dst_run).manifest["models"]["fct-st"]["sha256"]
    assert main(["train", "--out", str(dst_run), "--epochs", "8", "--defense", "fct-st", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "fct-st: checkpoint verified, not retrained" in out and "[budget]" not in out
    assert RunDirectory.open(dst_run).manifest["models"]["fct-st"]["sha256"] == sha
    assert main(["report", str(dst_run)]) == 0
    out = capsys.readouterr().out
    assert "fct-st: trained by FCT's D-ST" in out and "D_p precision" in out


def test_restating_a_default_setting_resumes_the_run(dst_run, capsys):
    sha = RunDirectory.open(dst_run).manifest["models"]["fct-st"]["sha256"]
    assert main(["train", "--out", str(dst_run), "--epochs", "8", "--defense", "fct-st", "--defense-params",
                 '{"st": {"temperature": 0.1}, "sd": {"alpha_c": 0.2}}', *QUIET]) == 0
    assert "fct-st: checkpoint verified, not retrained" in capsys.readouterr().out
    assert RunDirectory.open(dst_run).manifest["models"]["fct-st"]["sha256"] == sha


def test_a_tampered_split_file_is_recomputed_not_trusted(dst_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(dst_run, copy)
    (copy / "train" / "fct-st_split.npz").write_bytes(b"not an npz")
    assert not RunDirectory.open(copy).has_file("train/fct-st_split.npz")
    with one_thread():
        assert main(["train", "--out", str(copy), "--epochs", "8", "--defense", "fct-st", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "fct-st split:" in out and "fct-st: checkpoint verified, not retrained" not in out  # split recomputed
    assert RunDirectory.open(copy).manifest["models"]["fct-st"] == RunDirectory.open(dst_run).manifest["models"][
        "fct-st"]  # ... and the model reused, not retrained
    assert RunDirectory.open(copy).has_file("train/fct-st_split.npz")


def test_settings_resolve_over_digits_or_official_defaults():
    digits = fct_st_settings({"st": {"epochs": 3}}, dataset="digits")
    assert digits["sd"].items() >= FCT_SD_DIGITS.items() and digits["st"]["epochs"] == 3
    assert digits["st"]["head_lr"] == FCT_ST_DIGITS["head_lr"]
    official = fct_st_settings(None, dataset="mnist")
    assert official["sd"]["sd_epochs"] == 2 and official["st"] == {  # the functions' own defaults
        n: (list(p.default) if isinstance(p.default, tuple) else p.default)
        for n, p in inspect.signature(fct_secure_train).parameters.items() if n in ST_SETTINGS}
    cfg = TrainConfig(defense="fct-st", defense_params={"sd": {"draws": 2}})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # settings round-trip
    assert cfg.defense_params == {"sd": {"draws": 2}, "st": {}}  # resolved by train() when the run is made
    # a stored (resolved) config is read as it is: defaults added later never change what a run says it used
    stored = {**TrainConfig().to_dict(), "defense": "fct-st", "defense_params": {"sd": {"sd_epochs": 3}, "st": {}}}
    assert TrainConfig.from_dict(stored).defense_params == {"sd": {"sd_epochs": 3}, "st": {}}
    assert "defense" not in TrainConfig().to_dict()  # runs without a defense keep the earlier manifest


def test_the_budget_counts_every_training_input():
    # 1000 samples at the official thresholds: D_c 201 + D_p 50 = 251; the official budgets (2 SD epochs, 200
    # contrastive epochs of 2 views, 10 head epochs)
    inputs, _ = fct_st_work(1000, {})
    assert inputs == 2 * 1000 + 2 * 200 * 1000 + 10 * 251 + 10 * 1000  # + 10 official L_intra epochs


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(defense="fct-bt"), UnknownNameError, "fct-bt"),
    (dict(defense="fct-st", defense_params={"st": {"epoch": 3}}), InputError, "unknown fct-st st setting(s) epoch"),
    (dict(defense="fct-st", defense_params={"br": {}}), InputError, "unknown defense_params key(s) br"),
    (dict(defense="fct-st", defense_params={"sd": 3}), InputError, "must be a JSON object"),
    (dict(defense_params={"st": {"epochs": 3}}), InputError, "--defense-params applies to --defense fct-st"),
    (dict(defense="fct-st", defense_params={"st": {"epochs": "3"}}), InputError,
     "defense_params 'st': epochs must be a positive integer, got '3'"),
    (dict(defense="fct-st", defense_params={"st": {"epochs": -5}}), InputError,
     "defense_params 'st': epochs must be a positive integer"),
    (dict(defense="fct-st", defense_params={"st": {"crop_scale": [0.9, 0.1]}}), InputError, "crop_scale must be"),
    (dict(defense="fct-st", defense_params={"sd": {"alpha_p": 2.0}}), InputError, "defense_params 'sd': alpha_p"),
])
def test_bad_defense_settings_are_named(kwargs, error, fragment):
    with pytest.raises(error) as exc:
        TrainConfig(**kwargs)
    assert fragment in str(exc.value)


def test_bad_defense_values_are_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--defense", "fct-st", "--defense-params", '{"st": {"epochs": -5}}',
                 *QUIET]) != 0
    one_line_error(capsys, "defense_params 'st': epochs must be a positive integer")
    assert file_snapshot(out) == {}


def test_a_training_set_too_small_for_the_split_is_one_line_and_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (15, 8, 8), dtype=np.uint8), y_train=np.arange(15) % 3,
             x_test=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), y_test=np.arange(6) % 3)
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--dataset", f"npz:{path}", "--input-shape", "1,8,8",
                 "--defense", "fct-st", "--epochs", "1", *QUIET])
    assert code != 0
    one_line_error(capsys, "poisoned training set of", "too small for the FCT thresholds", "D_c would get 4 samples and D_p 0")
    assert file_snapshot(out) == {}


def test_train_help_lists_every_defense_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    missing = sorted(n for n in SD_SETTINGS | ST_SETTINGS if n not in text)
    assert not missing, missing
