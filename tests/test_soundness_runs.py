"""Soundness of what runs report as certified (docs/design.md section 10): deployable sample-specific sigmas,
transductive storage evaluated in deployment order, simultaneous whole-test-set statements, and no certified
column that depends on data-chosen training scales."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pandas as pd
import pytest
import torch

from certkit.runs import single
from certkit.runs.rundir import RunDirectory
from certkit.runs.single import CertifyConfig, TrainConfig, certify_run, train

N_TEST = 540  # digits test split


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssb") / "run"
    train(TrainConfig(epochs=3, noise_sigmas=(0.25,)), out, device="cpu", progress=False, log=lambda *_: None)
    return out


def _fake_sigma(clean_scale: float):
    """A stand-in for optimize_sigma whose sigma of an input is a function of that input (and, for clean
    inputs, of ``clean_scale``): ids >= N_TEST are triggered queries (certify_run's id convention)."""
    calls = []

    def fake(model, x, *, base_sigma, ids, **kwargs):
        ids = torch.as_tensor(ids)
        own = base_sigma + 0.05 * x.flatten(1).mean(1).double()
        sigma = torch.where(ids >= N_TEST, own, clean_scale * own)
        calls.append({"n": len(x), "triggered": bool((ids >= N_TEST).all())})
        return types.SimpleNamespace(sigma=sigma.numpy(), save=lambda path: _save(path, sigma.numpy()))

    fake.calls = calls
    return fake


def _save(path, sigma):
    from certkit.certify.sigma import SigmaResult

    SigmaResult(sigma=sigma, base_sigma=np.full(len(sigma), 0.25), steps=1, lr=1e-4, detach_model=True,
                proxy_radius=np.zeros(len(sigma))).save(path)


def _certify(run_dir, monkeypatch, clean_scale):
    monkeypatch.setattr(single, "optimize_sigma", _fake_sigma(clean_scale))
    run = RunDirectory.open(run_dir)
    cfg = CertifyConfig(pairs=(("noise-0.25", 0.25),), n0=20, n=60, max_points=25, sigma_modes=("sample-specific",))
    certify_run(run, cfg, device="cpu", progress=False, log=lambda *_: None)
    points = pd.read_csv(run_dir / "points.csv")
    return points[points["set"] == "triggered"].reset_index(drop=True), run.read_summary()["certified"][0]


def test_the_sigma_of_a_triggered_input_never_depends_on_its_clean_twin(small_run, tmp_path, monkeypatch):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    shutil.copytree(small_run, a_dir)
    shutil.copytree(small_run, b_dir)
    trig_a, _ = _certify(a_dir, monkeypatch, clean_scale=1.0)
    trig_b, _ = _certify(b_dir, monkeypatch, clean_scale=1.6)  # the clean twins get other sigmas
    clean_a = pd.read_csv(a_dir / "points.csv").query("set == 'clean'")
    clean_b = pd.read_csv(b_dir / "points.csv").query("set == 'clean'")
    assert not np.allclose(clean_a["sigma"], clean_b["sigma"])
    for col in ("sigma", "prediction", "radius", "p_lower"):  # x + t's result is unchanged
        np.testing.assert_array_equal(trig_a[col].to_numpy(), trig_b[col].to_numpy(), err_msg=col)
    # and it is the sigma found at x + t itself
    from certkit.backdoor.prepare import prepare_data

    data = prepare_data(TrainConfig(epochs=3, noise_sigmas=(0.25,)))
    idx = trig_a["index"].to_numpy() - N_TEST
    pos = np.searchsorted(np.asarray(data.triggered.indices), idx)
    own = 0.25 + 0.05 * data.triggered.x[pos].flatten(1).mean(1).double().numpy()
    np.testing.assert_allclose(trig_a["sigma"].to_numpy(), own, rtol=1e-12)


def test_storage_ctr_processes_triggered_queries_before_their_clean_twins(small_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "c"
    shutil.copytree(small_run, run_dir)
    trig, row = _certify(run_dir, monkeypatch, clean_scale=1.0)
    storage = row["storage"]
    assert storage["kind"] == "transductive, order-dependent"
    assert storage["triggered_order"].startswith("triggered queries in test-set order, before (without)")
    # CTR: non-target triggered queries whose deployed answer (triggered-first store) is certified correct
    non_target = trig["label"] != 0
    expected = ((trig["prediction"] == trig["label"]) & (trig["radius"] >= 0))[non_target].mean()
    assert row["certified_trigger_robustness"] == pytest.approx(expected)
    assert row["smoothed_asr"] == pytest.approx((trig["prediction"] == 0).mean())
    assert "ctr_clean_first_diagnostic" in storage and "not a deployable" in storage["ctr_clean_first_diagnostic_meaning"]
    # the deployed store of the triggered queries holds only triggered queries, in test order
    from certkit.certify.storage import CertifiedStore

    store = CertifiedStore.load(run_dir / "stores" / "noise-0.25__sigma-0.25__triggered-first.npz")
    assert set(np.asarray(store.ids).tolist()) <= set(trig["index"].tolist())


def test_summaries_state_a_simultaneous_bound_at_95_percent(small_run, tmp_path):
    run_dir = tmp_path / "d"
    shutil.copytree(small_run, run_dir)
    run = RunDirectory.open(run_dir)
    certify_run(run, CertifyConfig(pairs=(("noise-0.25", 0.25),), n0=20, n=60, max_points=25), device="cpu",
                progress=False, log=lambda *_: None)
    row = run.read_summary()["certified"][0]
    bound = row["asr_bound"]
    assert bound["delta"] == 0.05 and "with probability >= 0.95" in bound["statement"]
    assert bound["bound"] >= 1 - row["certified_trigger_robustness"]
    assert "certified_asr_upper_bound" not in row  # the per-point "1 - CTR" is never reported as a bound


def test_a_second_certify_adds_to_the_first_instead_of_erasing_it(small_run, tmp_path):
    run_dir = tmp_path / "e"
    shutil.copytree(small_run, run_dir)
    run = RunDirectory.open(run_dir)
    settings = dict(n0=20, n=60, max_points=25)
    certify_run(run, CertifyConfig(pairs=(("noise-0.25", 0.25),), **settings), device="cpu", progress=False,
                log=lambda *_: None)
    certify_run(run, CertifyConfig(pairs=(("noise-0.25", 0.5),), **settings), device="cpu", progress=False,
                log=lambda *_: None)
    rows = run.read_summary()["certified"]
    assert [(r["model"], r["sigma"]) for r in rows] == [("noise-0.25", 0.25), ("noise-0.25", 0.5)]
    points = run.read_frame("points.csv")
    assert sorted(set(points["base_sigma"])) == [0.25, 0.5]
    assert (points.groupby(["base_sigma", "set"]).size().unstack()["clean"] == 25).all()
    # certifying the first again replaces its rows, it does not duplicate them
    certify_run(run, CertifyConfig(pairs=(("noise-0.25", 0.25),), **settings), device="cpu", progress=False,
                log=lambda *_: None)
    assert len(run.read_summary()["certified"]) == 2
    assert len(run.read_frame("points.csv")) == len(points)
