"""`certkit compare`: the attacks x defenses grid, its resumable comparison directory, table and plots."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

import purifiers
from certkit.cli import main
from certkit.errors import CertkitError, InputError, RecordError, UnknownNameError
from certkit.runs.compare.grid import NOT_AVAILABLE, CompareSpec, purifier_budget, run_compare
from certkit.runs.compare.plots import certified_curve
from certkit.runs.compare.spec import PURIFIERS, attack_key, preset
from certkit.runs.compare.table import load_cells, to_markdown

# A tiny grid: BN-less digits CNN (so ANP, a BatchNorm method, must be skipped), fine-tuning with
# re-activation, the undefended model and a 2-member RAB ensemble; 40 certified points.
TINY = dict(model="digits-cnn", attacks=["badnets"], epochs=8, defenses=["undefended", "ft", "anp", "rab"],
            purifier_params={"ft": {"epochs": 2}}, noise_finetune_epochs=1, n0=50, n=100, max_points=40,
            ensemble_members=2, ensemble_epochs=1, reactivation=True)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "grid"
    res = run_compare(CompareSpec.from_dict(TINY), out, progress=False, log=lambda *_: None)
    return out, res


def _row(table: pd.DataFrame, defense: str) -> pd.Series:
    return table[table["defense"] == defense].iloc[0]


def test_tiny_grid_end_to_end_writes_table_and_plots(grid):
    out, res = grid
    t = res.table
    assert list(t["defense"]) == TINY["defenses"] and res.computed == 4 and res.reused == 0
    assert set(t.columns) >= {"ca", "asr", "ra", "der", "acr", "ctr", "ca@0", "ca@0.5", "wall_s", "budget"}
    ok = t[t["status"] == "ok"]
    assert list(ok["defense"]) == ["undefended", "ft", "rab"]
    for col in ("ca", "asr", "der", "smoothed_ca", "ctr"):
        assert ok[col].between(0, 1).all(), col
    und = _row(t, "undefended")
    assert und["ca"] == und["ca_before"] and und["der"] == 0.5 and und["asr"] > 0.5  # the backdoor works
    assert json.loads(_row(t, "ft")["budget"])["epochs"] == 2  # the budget used is recorded per row
    assert 0 <= _row(t, "ft")["reactivation_asr"] <= 1
    assert (t["wall_s"] > 0).all()
    assert (out / "table.csv").is_file() and "| defense |" in (out / "table.md").read_text().replace("attack | poison_rate | ", "")
    assert (out / "plots" / "asr_vs_ctr.png").stat().st_size > 1000
    assert (out / "plots" / f"certified_accuracy_{attack_key('badnets', {}, 0.1)}.png").is_file()
    again = pd.read_csv(out / "table.csv")
    assert list(again["defense"]) == TINY["defenses"]


def test_cells_that_cannot_run_are_skipped_with_their_reason(grid):
    t = grid[1].table
    anp = _row(t, "anp")
    if "anp" in purifiers.available():
        assert anp["status"] == "skipped" and "BatchNorm" in anp["reason"]
    else:
        assert anp["reason"] == NOT_AVAILABLE


def test_an_unknown_defense_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown defense.*'nosuchdefense'.*choose from undefended"):
        run_compare({**TINY, "defenses": ["undefended", "nosuchdefense"]}, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_a_known_purifier_that_is_not_registered_is_a_skipped_row(grid, tmp_path, monkeypatch):
    registered = dict(purifiers.available())
    monkeypatch.setattr(purifiers, "available", lambda: {k: v for k, v in registered.items() if k != "clp"})
    res = run_compare({**TINY, "defenses": ["clp"], "reactivation": False}, grid[0].parent / "unregistered",
                      progress=False, plots=False, log=lambda *_: None)
    missing = _row(res.table, "clp")
    assert missing["status"] == "skipped" and missing["reason"] == NOT_AVAILABLE
    assert np.isnan(missing["ca"])


def test_resume_keeps_finished_cells(grid):
    out, _ = grid
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    res = run_compare(CompareSpec.from_dict(TINY), out, progress=False, plots=False, log=lambda *_: None)
    assert res.computed == 0 and res.reused == 4
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == mtimes
    pd.testing.assert_frame_equal(res.table, grid[1].table)


def test_a_directory_from_another_spec_is_refused(grid):
    with pytest.raises(RecordError, match="another spec"):
        run_compare(CompareSpec.from_dict({**TINY, "sigma": 0.5}), grid[0], progress=False, log=lambda *_: None)


def test_unknown_spec_keys_are_named(tmp_path):
    with pytest.raises(InputError, match="sigmas, wrong_key"):
        CompareSpec.from_dict({"sigmas": [0.25], "wrong_key": 1})
    with pytest.raises(InputError, match=r"attacks\[0\]: colour"):
        CompareSpec.from_dict({"attacks": [{"name": "badnets", "colour": 1}]})
    with pytest.raises(InputError, match="fts"):
        CompareSpec(purifier_params={"fts": {"epochs": 1}})  # a typo of a purifier name is not ignored
    with pytest.raises(InputError, match="poison_rates"):
        CompareSpec(poison_rates=[1.5])
    with pytest.raises(CertkitError, match="unknown attack 'nope'"):
        CompareSpec(attacks=["nope"])


def test_cli_exit_code_2_on_bad_spec(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("attacks: [badnets]\nsigmaa: 0.3\n")
    assert main(["compare", "--spec", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "sigmaa" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_with_a_yaml_spec_resumes_the_grid(grid, tmp_path, capsys):
    import yaml

    f = tmp_path / "spec.yml"
    f.write_text(yaml.safe_dump(TINY))
    assert CompareSpec.from_file(f).sha256() == CompareSpec.from_dict(TINY).sha256()
    assert main(["compare", "--spec", str(f), "--out", str(grid[0]), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "0 cell(s) run, 4 kept" in printed and "badnets  undefended" in printed  # the compact console table


def test_dask_cluster_gives_the_same_rows(grid, tmp_path):
    distributed = pytest.importorskip("distributed")
    spec = {**TINY, "defenses": ["undefended"], "reactivation": False}
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        res = run_compare(spec, tmp_path / "dask", scheduler=client, progress=False, plots=False,
                          log=lambda *_: None)
    a, b = _row(res.table, "undefended"), _row(grid[1].table, "undefended")
    for col in ("ca", "asr", "smoothed_ca", "acr", "ctr"):
        assert a[col] == b[col], col


def test_certified_curve_counts_points_at_or_beyond_each_radius():
    curve = {"n_points": 4, "correct_radii": [0.1, 0.5]}
    np.testing.assert_allclose(certified_curve(curve, np.array([0.0, 0.1, 0.2, 0.5, 0.6])),
                               [0.5, 0.5, 0.25, 0.25, 0.0])


def test_preset_lists_every_purifier_with_capped_budgets():
    spec = preset("digits")
    assert len(set(PURIFIERS)) == len(PURIFIERS) and set(PURIFIERS) <= set(spec.defenses)
    assert {"undefended", "rab", "cert-ssb"} <= set(spec.defenses)
    assert set(purifiers.available()) <= set(PURIFIERS)  # every registered method is in the grid
    if "sau" in purifiers.available():
        assert purifier_budget(spec, "sau")["epochs"] == 10  # official 100, capped for digits
    assert set(spec.purifier_params) == {*PURIFIERS, "fct-st"} and spec.reactivation  # fct-st: a training cell
    for name in PURIFIERS:  # every preset setting is a real parameter of a registered method
        purifiers.make(name, **purifier_budget(spec, name))
    with pytest.raises(InputError, match="unknown preset"):
        preset("cifar")


def test_markdown_table_formats_numbers_and_blanks():
    md = to_markdown(pd.DataFrame({"defense": ["a|b"], "ca": [0.12345], "asr": [np.nan]}))
    assert md.splitlines()[2] == "| a\\|b | 0.123 |  |"


def test_load_cells_refuses_other_run_kinds(tmp_path):
    from certkit.runs.rundir import RunDirectory

    RunDirectory.create(tmp_path / "r", {"x": 1}, kind="single")
    with pytest.raises(RecordError, match="not a comparison directory"):
        load_cells(tmp_path / "r")
    assert os.path.isdir(tmp_path / "r")


# Patch and poisoning-count cells: PatchCleanser columns, de-randomized smoothing, DPA / DPA+ROE / joint.
CERTS = dict(model="digits-cnn", attacks=["badnets", "blended"], epochs=2,
             defenses=["undefended", "ds-column", "dpa", "dpa-roe", "dpa-joint"], noise_finetune_epochs=1, n0=20,
             n=50, max_points=30, patchcleanser=True, patchcleanser_masks=3, dpa_k=4, dpa_epochs=1,
             dpa_batch_size=64)


@pytest.fixture(scope="module")
def cert_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "certs"
    return out, run_compare(CompareSpec.from_dict(CERTS), out, progress=False, log=lambda *_: None)


def test_patch_and_poisoning_cells_report_each_ctr_in_its_own_column(cert_grid):
    out, res = cert_grid
    t = res.table.set_index(["attack", "defense"])
    bad, blend = "badnets", "blended"
    for d in ("undefended", "ds-column"):
        assert 0 <= t.loc[(bad, d), "patch_ctr"] <= 1 and 0 <= t.loc[(bad, d), "patch_ca"] <= 1
        assert np.isnan(t.loc[(blend, d), "patch_ctr"])           # a global trigger: not applicable, not 0
    assert t.loc[(bad, "ds-column"), "patch_certificate"] == "column-smoothing"
    for d in ("dpa", "dpa-roe", "dpa-joint"):
        assert 0 <= t.loc[(bad, d), "ctr_samples"] <= 1 and np.isnan(t.loc[(bad, d), "ctr"])
    rows = {(r["attack"], r["defense"]): r for r in load_cells(out)}
    assert rows[(bad, "dpa")]["poisoned_in_unit"] == 2 * 126                 # 10% of 1257, each counting 2
    assert rows[(blend, "dpa-joint")]["status"] == "skipped" and "global trigger" in rows[(blend, "dpa-joint")]["reason"]
    assert "not applicable" in rows[(blend, "undefended")]["patch_note"]
    # dpa and dpa-roe certify the same partition ensemble (trained once per attack)
    ens = sorted(p.name for p in (out / "ensembles").iterdir())
    assert ens == sorted([f"{attack_key(a, {}, 0.1)}__dpa" for a in (bad, blend)]
                         + [f"{attack_key(bad, {}, 0.1)}__dpa-joint"])
    assert (out / "plots" / "asr_vs_ctr.png").stat().st_size > 1000


def test_the_patchcleanser_column_is_the_certificate_of_the_row_model(cert_grid):
    from certkit.backdoor.prepare import prepare_data
    from certkit.certify.patch import patch_trigger_robustness, patchcleanser_certify
    from certkit.runs.compare.grid import backdoored_name, cell_data_config
    from certkit.runs.rundir import RunDirectory

    out, res = cert_grid
    spec = CompareSpec.from_dict(CERTS)
    cell = next(c for c in spec.cells() if c["attack"] == "badnets" and c["defense"] == "undefended")
    data = prepare_data(cell_data_config(spec, cell))
    model = RunDirectory.open(out).load_model(backdoored_name(cell["attack_key"]))
    keep = np.sort(np.random.default_rng(spec.seed).permutation(len(data.splits.test))[: spec.max_points])
    trig = data.triggered
    kt = np.flatnonzero(np.isin(np.asarray(trig.indices), keep))
    cert = patchcleanser_certify(model, trig.x[kt], trig.y_true[kt], patch_size=2, k=3)
    row = res.table[(res.table["attack"] == "badnets") & (res.table["defense"] == "undefended")].iloc[0]
    assert row["patch_ctr"] == pytest.approx(patch_trigger_robustness(cert, 2, spec.target))
