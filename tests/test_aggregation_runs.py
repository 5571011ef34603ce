"""Aggregation ensembles end to end (Mode D): member layouts, training, evaluate once, certify offline, CLI,
report, and the bad input of issue 13 (one line, nothing written)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import file_snapshot, one_line_error

from certkit.backdoor.data import ArrayDataset
from certkit.certify.aggregation import Layout, dpa_certify, roe_certify
from certkit.cli import main
from certkit.errors import CertkitError, InputError, RecordError
from certkit.runs.aggregation import (
    AggregationCertifyConfig,
    certify_aggregation,
    certify_outputs,
    read_member_outputs,
)
from certkit.runs.ensemble_train import EnsembleSpec, read_layout, train_ensemble
from certkit.runs.layouts import member_layout
from certkit.runs.rundir import RunDirectory

QUIET = ["--device", "cpu", "--no-progress"]
SMALL = ["--epochs", "1", "--batch-size", "64", *QUIET]


# ------------------------------------------------------------------------------------------ spec
def test_full_noise_configs_are_unchanged_and_layouts_round_trip():
    rab = EnsembleSpec(members=4)
    assert "layout" not in rab.to_dict() and rab.to_dict()["sigma"] == 0.5 and rab.members == 4
    dpa = EnsembleSpec(layout="partition", k=7)
    d = dpa.to_dict()
    assert d["members"] == 7 and "sigma" not in d and "noise" not in d
    assert EnsembleSpec.from_dict(d) == dpa
    assert EnsembleSpec(layout="finite-aggregation", k=5, d=3).members == 15
    assert EnsembleSpec(layout="bootstrap", k=100, members=9).members == 9


@pytest.mark.parametrize("kwargs, fragment", [
    ({"layout": "partition"}, "needs k"),
    ({"layout": "partition", "k": 1}, "k must be"),
    ({"layout": "finite-aggregation", "k": 4}, "needs d"),
    ({"layout": "finite-aggregation", "k": 4, "d": 0}, "d must be"),
    ({"layout": "partition", "k": 4, "d": 2}, "finite-aggregation layout only"),
    ({"layout": "partition", "k": 4, "members": 5}, "has 4 members"),
    ({"layout": "partition", "k": 4, "sigma": 0.25}, "full-noise (RAB) layout only"),
    ({"layout": "partition", "k": 4, "band": 2}, "only with an ablation"),
    ({"layout": "partition", "k": 4, "ablation": "column"}, "needs band"),
    ({"k": 4}, "only apply to the aggregation layouts"),
    ({"layout": "pieces", "k": 4}, "layout"),
])
def test_bad_layout_specs_are_refused_with_a_named_reason(kwargs, fragment):
    with pytest.raises(CertkitError) as info:
        EnsembleSpec(**kwargs)
    assert fragment in str(info.value)


# ------------------------------------------------------------------------------------------ layouts
def _toy(n: int = 60, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (n, 1, 4, 4), generator=g).float() / 255, torch.arange(n) % 3, 3)


def test_partition_layout_is_a_content_hash_independent_of_the_sample_order():
    data = _toy()
    lay = member_layout("partition", data, k=4)
    flat = np.concatenate(lay.indices)
    assert sorted(flat.tolist()) == list(range(len(data)))          # every sample in exactly one partition
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    shuffled = ArrayDataset(data.x[perm], data.y[perm], 3)
    again = member_layout("partition", shuffled, k=4)
    for a, b in zip(lay.indices, again.indices):                    # same contents, same order
        assert torch.equal(data.x[a], shuffled.x[b]) and torch.equal(data.y[a], shuffled.y[b])
    assert lay.layout.kind == "partition" and lay.layout.member_subset == (0, 1, 2, 3)


def test_finite_aggregation_puts_every_sample_in_d_subsets_and_bootstrap_is_seeded():
    data = _toy(80)
    fa = member_layout("finite-aggregation", data, k=3, d=2, seed=5)
    counts = np.bincount(np.concatenate(fa.indices), minlength=80)
    assert (counts == 2).all() and len(fa.indices) == 6 and len(fa.layout.shifts) == 2
    b1 = member_layout("bootstrap", data, k=30, members=4, seed=5)
    b2 = member_layout("bootstrap", data, k=30, members=4, seed=5)
    b3 = member_layout("bootstrap", data, k=30, members=4, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(b1.indices, b2.indices))
    assert not all(np.array_equal(a, b) for a, b in zip(b1.indices, b3.indices))
    assert b1.layout.n_train == 80 and b1.layout.bootstrap_size == 30 and b1.layout.num_draws == 4


def test_a_worker_computes_the_member_layout_once_per_training_set(monkeypatch):
    import certkit.runs.ensemble_train as et

    calls = []
    real = et.member_layout
    monkeypatch.setattr(et, "member_layout", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(et, "_LAYOUT_CACHE", [])
    spec = EnsembleSpec(layout="partition", k=4, epochs=1)
    data = et.prepare_data(spec)
    first = et.ensemble_layout(spec, data)
    assert et.ensemble_layout(spec, data) is first and len(calls) == 1      # every member of a worker: once
    other = EnsembleSpec(layout="partition", k=5, epochs=1)
    assert len(et.ensemble_layout(other, data).indices) == 5 and len(calls) == 2   # another k: recomputed
    train = data.poisoned.dataset
    other_data = dataclasses.replace(data, poisoned=dataclasses.replace(
        data.poisoned, dataset=ArrayDataset(train.x.flip(0), train.y.flip(0), data.num_classes)))
    assert et.ensemble_layout(spec, other_data) is not first and len(calls) == 3    # another training set
    fresh = real("partition", train, k=4)
    assert all(np.array_equal(a, b) for a, b in zip(first.indices, fresh.indices))


def test_an_empty_partition_and_a_too_large_k_are_named():
    data = _toy(6)
    with pytest.raises(InputError, match="only 6 samples"):
        member_layout("partition", data, k=7)
    same = ArrayDataset(torch.zeros(6, 1, 2, 2), torch.zeros(6, dtype=torch.int64), 2)
    with pytest.raises(InputError, match="of 3 partitions are empty"):
        member_layout("partition", same, k=3)


# ------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def dpa_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("agg") / "dpa"
    assert main(["ensemble", "train", "--out", str(out), "--layout", "partition", "--k", "5", *SMALL]) == 0
    return out


def test_a_partition_run_records_its_layout_and_member_sizes(dpa_run):
    run = RunDirectory.open(dpa_run)
    rec = run.read_json("layout.json")
    assert rec["layout"]["kind"] == "partition" and rec["layout"]["k"] == 5
    assert sum(rec["member_sizes"]) == len(pd.Series(range(1257)))  # the digits training split
    assert read_layout(run) == Layout.dpa(5, member_subset=range(5))
    steps = run.manifest["steps"]
    assert [steps[f"train/member-000{m}"]["samples"] for m in range(5)] == rec["member_sizes"]


def test_dpa_and_roe_certify_offline_and_add_to_the_summary(dpa_run, capsys):
    assert main(["ensemble", "certify", str(dpa_run), *QUIET]) == 0            # the layout's own: dpa
    assert main(["ensemble", "certify", str(dpa_run), "--certificate", "roe", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "reusing the saved outputs of 5 members" in out                       # evaluated once
    run = RunDirectory.open(dpa_run)
    summary = run.read_summary()
    assert set(summary["aggregation"]) == {"dpa", "roe"}
    arrays, meta = read_member_outputs(run)
    assert arrays["clean_logits"].dtype == np.float32 and arrays["clean_logits"].shape[:2] == (5, 540)
    # the recorded radii are those of the certificate functions on the saved logits
    for name, fn in (("dpa", dpa_certify), ("roe", roe_certify)):
        cert = fn(arrays["clean_logits"], arrays["clean_labels"])
        points = pd.read_csv(dpa_run / "aggregation" / f"{name}.csv")
        clean = points[points["set"] == "clean"]
        assert np.array_equal(clean["radius"].to_numpy(), cert.radius)
        row = summary["aggregation"][name]
        assert row["certified_accuracy"]["0"] == pytest.approx(cert.certified_accuracy(0))
        assert row["poisoned_in_unit"] == 2 * row["n_poisoned"] and row["deterministic"] is True
    assert main(["report", str(dpa_run)]) == 0
    report = capsys.readouterr().out
    assert "layout partition (k=5" in report and "\ndpa " in report and "\nroe " in report


def test_another_layouts_certificate_is_refused_and_nothing_changes(dpa_run, capsys):
    before = file_snapshot(dpa_run)
    for cert, fragment in (("fa", "'fa' certificate is valid only for a 'finite-aggregation' layout"),
                           ("bagging", "'bootstrap' layout"), ("l2", "'l2' certificate is valid only for a "
                                                                    "'full-noise' layout"),
                           ("joint", "needs members trained with an ablation")):
        assert main(["ensemble", "certify", str(dpa_run), "--certificate", cert, *QUIET]) == 2
        one_line_error(capsys, fragment)
    assert file_snapshot(dpa_run) == before


def test_saved_outputs_of_other_members_are_not_reused(dpa_run, capsys):
    run = RunDirectory.open(dpa_run)
    arrays, meta = read_member_outputs(run)
    import io

    meta["test_sha256"] = "0" * 64                      # as if evaluated on another test set
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
    run.write_bytes("member_outputs.npz", buf.getvalue())
    certify_aggregation(run, AggregationCertifyConfig(certificate="dpa"), progress=False)
    assert "evaluated 5 members" in capsys.readouterr().out
    assert read_member_outputs(run)[1]["test_sha256"] != "0" * 64


def test_certify_outputs_refuses_nan_logits_and_a_wrong_layout():
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]][:, None, :]
    arrays = {"clean_logits": logits, "clean_labels": np.array([0])}
    with pytest.raises(InputError, match="'partition' layout"):
        certify_outputs(arrays, Layout.fa(2, 2), "dpa")
    arrays["clean_logits"] = np.where(logits == 1, np.nan, logits)
    with pytest.raises(InputError, match="NaN"):
        certify_outputs(arrays, Layout.dpa(4), "dpa")


def test_layout_training_does_not_depend_on_n_jobs(tmp_path):
    spec = EnsembleSpec(layout="partition", k=3, epochs=1, batch_size=64)
    a = train_ensemble(spec, tmp_path / "a", n_jobs=1, progress=False)
    b = train_ensemble(spec, tmp_path / "b", n_jobs=2, progress=False)
    assert {m: a.manifest["models"][m]["sha256"] for m in a.models()} == \
        {m: b.manifest["models"][m]["sha256"] for m in b.models()}


def test_a_bootstrap_run_certifies_bagging_with_its_alpha(tmp_path, capsys):
    out = tmp_path / "bag"
    assert main(["ensemble", "train", "--out", str(out), "--layout", "bootstrap", "--k", "200", "--members", "6",
                 *SMALL]) == 0
    assert main(["ensemble", "certify", str(out), "--alpha", "0.01", "--bonferroni", *QUIET]) == 0
    row = RunDirectory.open(out).read_summary()["aggregation"]["bagging-a0.01-bonferroni"]
    assert row["deterministic"] is False and row["alpha"] == 0.01 and row["poisoned_in_unit"] == row["n_poisoned"]
    assert "probability" in row["threat_model"] and "for all certified points" in row["threat_model"]


def test_the_joint_certificate_uses_the_members_patch_certificates(tmp_path, capsys):
    out = tmp_path / "joint"
    assert main(["ensemble", "train", "--out", str(out), "--layout", "partition", "--k", "3", "--ablation",
                 "column", "--band", "2", *SMALL]) == 0
    assert main(["ensemble", "certify", str(out), "--certificate", "joint", "--patch-size", "1", *QUIET]) == 0
    run = RunDirectory.open(out)
    arrays, _ = read_member_outputs(run)
    votes = np.where(arrays["clean_side"] >= 1, arrays["clean_pred"], -1)
    row = run.read_summary()["aggregation"]["joint-m1"]
    assert row["patch_size"] == 1 and "patch of side <= 1" in row["threat_model"]
    points = pd.read_csv(out / "aggregation" / "joint-m1.csv")
    clean = points[points["set"] == "clean"]
    from certkit.certify.aggregation import joint_certify

    cert = joint_certify(votes, 10, arrays["clean_labels"])
    assert np.array_equal(clean["radius"].to_numpy(), cert.radius)
    # the saved counts, predictions and sides are member 1's own de-randomized smoothing certificate
    from certkit.backdoor.prepare import prepare_data
    from certkit.certify.patch import derandomized_certify
    from certkit.runs.models import load_run_model

    x = prepare_data(EnsembleSpec.from_run(run)).splits.test.x[:20]
    member = derandomized_certify(load_run_model(run, "member-0001"), x, kind="column", band=2)
    assert np.array_equal(arrays["clean_logits"][1, :20], member.counts.astype(np.float32))
    assert np.array_equal(arrays["clean_pred"][1, :20], member.prediction)
    assert np.array_equal(arrays["clean_side"][1, :20], member.certified_side)


@pytest.mark.parametrize("argv, fragment", [
    (["--layout", "partition", "--k", "1"], "k must be"),
    (["--layout", "partition", "--k", "5000"], "only 1257 samples"),
    (["--layout", "partition", "--k", "4", "--d", "2"], "finite-aggregation layout only"),
    (["--layout", "bootstrap", "--k", "0"], "k must be"),
    (["--layout", "partition", "--k", "4", "--sigma", "0.3"], "full-noise (RAB) layout only"),
])
def test_bad_layout_flags_are_one_line_and_create_nothing(tmp_path, capsys, argv, fragment):
    out = tmp_path / "run"
    assert main(["ensemble", "train", "--out", str(out), *argv, *SMALL]) == 2
    one_line_error(capsys, fragment)
    assert not out.exists()


def test_a_rab_run_refuses_poisoning_count_certificates(tmp_path, capsys):
    out = tmp_path / "rab"
    assert main(["ensemble", "train", "--out", str(out), "--members", "2", *SMALL]) == 0
    before = file_snapshot(out)
    assert main(["ensemble", "certify", str(out), "--certificate", "dpa", *QUIET]) == 2
    one_line_error(capsys, "'dpa' certificate is valid only for a 'partition' layout", "'full-noise'")
    assert file_snapshot(out) == before
    with pytest.raises(RecordError):
        read_member_outputs(RunDirectory.open(out))


# ------------------------------------------------------------------------------------------ DPA* (versions)
def test_versions_spec_and_member_layout():
    spec = EnsembleSpec(layout="partition", k=4, versions=3, epochs=1)
    assert spec.members == 12 and spec.to_dict()["versions"] == 3
    assert "versions" not in EnsembleSpec(layout="partition", k=4, epochs=1).to_dict()  # earlier configs unchanged
    assert EnsembleSpec(layout="partition", k=4, versions=1).versions is None
    assert EnsembleSpec(layout="finite-aggregation", k=3, d=2, versions=1).versions is None  # the default, anywhere
    data = _toy()
    lay = member_layout("partition", data, k=4, versions=3)
    one = member_layout("partition", data, k=4)
    assert lay.layout.member_subset == tuple(m // 3 for m in range(12)) and lay.layout.versions == 3
    assert all(np.array_equal(lay.indices[m], one.indices[m // 3]) for m in range(12))  # same partition data
    for kwargs, fragment in ((dict(layout="finite-aggregation", k=3, d=2, versions=2), "partition layout only"),
                             (dict(layout="partition", k=3, versions=2, ablation="column", band=2), "cannot be combined"),
                             (dict(layout="partition", k=3, versions=2, members=3), "6 members"),
                             (dict(versions=2), "partition layout only; this spec has layout='full-noise'")):
        with pytest.raises(InputError, match=fragment):
            EnsembleSpec(**kwargs)


def test_a_dpa_star_run_certifies_the_averaged_versions(tmp_path, capsys):
    out = tmp_path / "dstar"
    assert main(["ensemble", "train", "--out", str(out), "--layout", "partition", "--k", "4", "--versions", "2",
                 *SMALL]) == 0
    run = RunDirectory.open(out)
    lay = read_layout(run)
    assert lay.versions == 2 and len(run.models()) >= 8
    assert main(["ensemble", "certify", str(out), "--certificate", "dpa", *QUIET]) == 0
    assert "4x2" in capsys.readouterr().out
    row = RunDirectory.open(out).read_summary()["aggregation"]["dpa"]
    assert row["versions"] == 2 and row["members"] == 8
    with np.load(out / "member_outputs.npz") as z:
        logits, labels = z["clean_logits"], z["clean_labels"]
    ms = np.asarray(lay.member_subset)
    manual = np.stack([logits[ms == p].mean(axis=0) for p in range(4)])  # independent per-partition average
    frame = pd.read_csv(out / "aggregation" / "dpa.csv")
    clean = frame[frame["set"] == "clean"]
    want = dpa_certify(manual, labels)
    assert np.array_equal(clean["radius"].to_numpy(), want.radius)
    assert np.array_equal(clean["prediction"].to_numpy(), want.prediction)
    assert main(["ensemble", "certify", str(out), "--certificate", "joint", *QUIET]) != 0  # no ablation: refused


@pytest.mark.parametrize("argv, fragment", [
    (["--max-points", "30"], "--max-points does not apply to the 'dpa' certificate (--max-points: l2)"),
    (["--certificate", "roe", "--patch-size", "3"], "--patch-size does not apply to the 'roe' certificate"),
    (["--bound", "hoeffding", "--alpha", "0.5"], "--alpha, --bound do not apply to the 'dpa' certificate"),
    (["--bonferroni"], "--bonferroni does not apply to the 'dpa' certificate (--bonferroni: bagging)"),
])
def test_settings_a_certificate_does_not_use_are_refused_not_ignored(dpa_run, capsys, argv, fragment):
    before = file_snapshot(dpa_run)
    assert main(["ensemble", "certify", str(dpa_run), *argv, *QUIET]) != 0
    one_line_error(capsys, fragment)
    assert file_snapshot(dpa_run) == before
