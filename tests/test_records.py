"""Tests of certkit.runs.rundir: run directories, atomic writes, verified checkpoints."""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from certkit import io as records
from certkit.errors import InputError, RecordError
from certkit.runs.rundir import MANIFEST, SCHEMA_VERSION, RunDirectory

CONFIG = {"dataset": "digits", "sigma": 0.25, "seeds": (0, 1), "n": 1000, "model": {"arch": "mlp"}}


class Small(nn.Module):
    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def build(spec: dict) -> nn.Module:
    assert spec["arch"] == "small"
    return Small(spec["hidden"])


SPEC = {"arch": "small", "hidden": 5}


@pytest.fixture
def run(tmp_path: Path) -> RunDirectory:
    return RunDirectory.create(tmp_path / "run", CONFIG, kind="smoothing")


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- manifest


def test_create_open_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "a" / "run"
    r = RunDirectory.create(root, CONFIG, kind="smoothing")
    assert r.path == root and (root / MANIFEST).is_file()
    m = json.loads((root / MANIFEST).read_text())
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["kind"] == "smoothing"
    assert m["torch_version"] == torch.__version__
    for key in ("certkit_version", "python_version", "created"):
        assert isinstance(m[key], str) and m[key]
    assert m["created"].endswith("+00:00")
    for section in ("seeds", "data_hashes", "timings", "steps", "models", "files"):
        assert m[section] == {}
    assert m["config"]["seeds"] == [0, 1]  # tuples normalised to lists

    r.record_seed("run", 7)
    r.record_data_hash("train", "ab" * 32)
    r.record_timing("certify", np.float64(1.5))
    r.mark_done("train", members=3)
    r.update_manifest(note="hello", extra=np.arange(3))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same certkit version: no warning
        r2 = RunDirectory.open(root)
    assert r2.kind == "smoothing"
    assert r2.config == json.loads(json.dumps(m["config"]))
    mm = r2.manifest
    assert mm["seeds"] == {"run": 7}
    assert mm["data_hashes"] == {"train": "ab" * 32}
    assert mm["timings"] == {"certify": 1.5}
    assert mm["steps"]["train"]["done"] is True and mm["steps"]["train"]["members"] == 3
    assert mm["note"] == "hello" and mm["extra"] == [0, 1, 2]
    assert r2.is_done("train") and not r2.is_done("certify")
    # the manifest property is a copy
    mm["kind"] = "changed"
    assert r2.kind == "smoothing"


def test_update_manifest_protects_sections(run: RunDirectory) -> None:
    with pytest.raises(InputError, match="config"):
        run.update_manifest(config={})
    with pytest.raises(InputError, match="models"):
        run.update_manifest(models={})


def test_resume_same_config(tmp_path: Path) -> None:
    root = tmp_path / "run"
    r = RunDirectory.create(root, CONFIG, kind="smoothing")
    r.mark_done("step1")
    created = r.manifest["created"]
    # same config, tuples vs lists and key order do not matter
    cfg = dict(reversed(list(CONFIG.items())))
    cfg["seeds"] = [0, 1]
    r2 = RunDirectory.create(root, cfg, kind="smoothing")
    assert r2.is_done("step1")
    assert r2.manifest["created"] == created


def test_refuse_different_config(tmp_path: Path) -> None:
    root = tmp_path / "run"
    RunDirectory.create(root, CONFIG, kind="smoothing")
    other = dict(CONFIG, sigma=0.5, n=2000)
    del other["dataset"]
    other["new_key"] = 1
    with pytest.raises(RecordError, match="different config") as info:
        RunDirectory.create(root, other, kind="smoothing")
    msg = str(info.value)
    # every differing setting by name with both values (the unchanged ones are not listed)
    assert ('dataset is "digits" in the run, not set now; n is 1000 in the run, 2000 now; new_key is not set in '
            'the run, 1 now; sigma is 0.25 in the run, 0.5 now') in msg
    assert "model" not in msg
    assert "new --out" in msg


def test_refuse_different_kind_or_no_resume(tmp_path: Path) -> None:
    root = tmp_path / "run"
    RunDirectory.create(root, CONFIG, kind="smoothing")
    with pytest.raises(RecordError, match="ensemble"):
        RunDirectory.create(root, CONFIG, kind="ensemble")
    with pytest.raises(RecordError, match="resume"):
        RunDirectory.create(root, CONFIG, kind="smoothing", resume=False)


def test_refuse_non_empty_non_run_directory(tmp_path: Path) -> None:
    root = tmp_path / "user"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(RecordError, match="non-empty"):
        RunDirectory.create(root, CONFIG, kind="smoothing")
    assert (root / "thesis.tex").read_text() == "precious"
    assert not (root / MANIFEST).exists()
    # an empty existing directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDirectory.create(empty, CONFIG, kind="smoothing")
    # a file is refused
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RecordError, match="not a directory"):
        RunDirectory.create(f, CONFIG, kind="smoothing")


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="does not exist"):
        RunDirectory.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RecordError, match="manifest.json is missing"):
        RunDirectory.open(tmp_path / "plain")


def _rewrite_manifest(root: Path, **changes) -> None:
    m = json.loads((root / MANIFEST).read_text())
    for k, v in changes.items():
        if v is None:
            del m[k]
        else:
            m[k] = v
    (root / MANIFEST).write_text(json.dumps(m))


def test_schema_version_too_new_or_old(run: RunDirectory) -> None:
    _rewrite_manifest(run.path, schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(RecordError, match="newer"):
        RunDirectory.open(run.path)
    _rewrite_manifest(run.path, schema_version=SCHEMA_VERSION - 1)
    with pytest.raises(RecordError, match="older"):
        RunDirectory.open(run.path)
    _rewrite_manifest(run.path, schema_version=None)
    with pytest.raises(RecordError, match="schema_version"):
        RunDirectory.open(run.path)


def test_missing_required_key(run: RunDirectory) -> None:
    _rewrite_manifest(run.path, models=None)
    with pytest.raises(RecordError, match="models"):
        RunDirectory.open(run.path)


def test_corrupted_manifest_json(run: RunDirectory) -> None:
    text = (run.path / MANIFEST).read_text()
    (run.path / MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(RecordError, match="not valid JSON"):
        RunDirectory.open(run.path)
    with pytest.raises(RecordError, match="not valid JSON"):
        RunDirectory.create(run.path, CONFIG, kind="smoothing")


def test_version_mismatch_warns(run: RunDirectory) -> None:
    _rewrite_manifest(run.path, certkit_version="0.0.0-other")
    with pytest.warns(RuntimeWarning, match="0.0.0-other"):
        RunDirectory.open(run.path)


# ---------------------------------------------------------------------------------------------- models


def _trained_small() -> Small:
    torch.manual_seed(0)
    m = Small(5)
    m.train()
    m(torch.randn(8, 4))  # update BN running stats
    return m


def test_model_round_trip(run: RunDirectory) -> None:
    model = _trained_small()
    path = run.save_model("member-0", model, SPEC)
    assert path == run.path / "models" / "member-0.pt"
    entry = run.manifest["models"]["member-0"]
    assert entry["file"] == "models/member-0.pt"
    assert entry["sha256"] == records.sha256_file(path)
    assert entry["bytes"] == path.stat().st_size
    assert entry["spec"] == SPEC
    assert run.has_model("member-0") and not run.has_model("member-1")

    reopened = RunDirectory.open(run.path)
    state = reopened.load_state_dict("member-0")
    ref = model.state_dict()
    assert state.keys() == ref.keys()
    for k in ref:
        assert torch.equal(state[k], ref[k])

    loaded = reopened.load_model("member-0", builder=build)
    assert isinstance(loaded, Small) and not loaded.training
    x = torch.randn(6, 4)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert reopened.verify() == []


def test_load_model_shape_mismatch(run: RunDirectory) -> None:
    run.save_model("m", _trained_small(), SPEC)
    with pytest.raises(RecordError, match="does not fit"):
        run.load_model("m", builder=lambda spec: Small(7))


def test_unsafe_model_name(run: RunDirectory) -> None:
    for bad in ("../evil", "a/b", "a\\b", "", "..", "x y"):
        with pytest.raises(InputError, match="safe identifier"):
            run.save_model(bad, _trained_small(), SPEC)


def test_hash_mismatch_after_tampering(run: RunDirectory) -> None:
    path = run.save_model("m", _trained_small(), SPEC)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert not run.has_model("m")
    with pytest.raises(RecordError, match="checksum mismatch for model 'm'") as info:
        run.load_state_dict("m")
    assert "modified or is corrupt" in str(info.value)
    problems = run.verify()
    assert len(problems) == 1 and "model 'm'" in problems[0] and "modified" in problems[0]


def test_missing_checkpoint(run: RunDirectory) -> None:
    path = run.save_model("m", _trained_small(), SPEC)
    path.unlink()
    with pytest.raises(RecordError, match="missing"):
        run.load_state_dict("m")
    assert any("missing" in p for p in run.verify())


def _record_forged(run: RunDirectory, name: str, data: bytes) -> Path:
    """Write ``data`` as model ``name`` with a *matching* sha256 in the manifest (a forged run)."""
    path = run.path / "models" / f"{name}.pt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    m = json.loads((run.path / MANIFEST).read_text())
    m["models"][name] = {
        "file": f"models/{name}.pt",
        "sha256": records.sha256_file(path),
        "spec": SPEC,
        "bytes": len(data),
    }
    (run.path / MANIFEST).write_text(json.dumps(m))
    return path


def test_truncated_checkpoint(run: RunDirectory) -> None:
    path = run.save_model("m", _trained_small(), SPEC)
    data = path.read_bytes()
    _record_forged(run, "trunc", data[: len(data) // 2])
    r = RunDirectory.open(run.path)
    with pytest.raises(RecordError, match="is corrupt: torch cannot read it") as info:
        r.load_state_dict("trunc")
    assert "\n" not in str(info.value)


class _Exploit:
    """Unpickling this object runs code that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _ShellExploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_exploit_payload_is_live(tmp_path: Path) -> None:
    """Sanity check of the test payload: plain pickle *does* run it (so the next test is meaningful)."""
    marker = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["raw-pickle", "torch-zip", "torch-zip-in-dict", "os-system"])
def test_malicious_pickle_is_refused_and_not_run(run: RunDirectory, tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / f"marker-{fmt}"
    if fmt == "raw-pickle":
        data = pickle.dumps(_Exploit(marker))
    elif fmt == "os-system":
        data = pickle.dumps(_ShellExploit(marker))
    else:
        import io

        buf = io.BytesIO()
        payload = _Exploit(marker)
        if fmt == "torch-zip-in-dict":
            payload = {"fc1.weight": torch.zeros(2, 2), "evil": payload}
        torch.save(payload, buf)
        data = buf.getvalue()
    assert not marker.exists()
    _record_forged(run, "evil", data)
    r = RunDirectory.open(run.path)
    with pytest.raises(RecordError, match="is refused: it is not a plain tensor state dict") as info:
        r.load_state_dict("evil")
    message = str(info.value)
    assert "weights_only" not in message and "\n" not in message  # no hint to retry unsafely, one line
    with pytest.raises(RecordError, match="is refused: it is not a plain tensor state dict"):
        r.load_model("evil", builder=build)
    assert not marker.exists()
    assert r.verify() == []  # the hashes match: only the safe loader protects us


def test_non_state_dict_checkpoint_refused(run: RunDirectory) -> None:
    import io

    buf = io.BytesIO()
    torch.save([torch.zeros(2)], buf)
    _record_forged(run, "list", buf.getvalue())
    with pytest.raises(RecordError, match="not a state dict"):
        RunDirectory.open(run.path).load_state_dict("list")


def test_unknown_model_lists_available(run: RunDirectory) -> None:
    with pytest.raises(RecordError, match="available: none"):
        run.load_state_dict("nope")
    run.save_model("alpha", _trained_small(), SPEC)
    run.save_model("beta", _trained_small(), SPEC)
    with pytest.raises(RecordError, match="no model 'gamma'") as info:
        run.load_model("gamma", builder=build)
    assert "'alpha', 'beta'" in str(info.value)


# ---------------------------------------------------------------------------------------------- files


def test_json_and_text_round_trip(run: RunDirectory) -> None:
    obj = {
        "acc": np.float32(0.5),
        "counts": np.array([1, 2]),
        "nan": float("nan"),
        "inf": math.inf,
        "p": Path("a/b"),
        "t": torch.tensor([1.0, 2.0]),
        3: "int key",
    }
    path = run.write_json("summary.json", obj)
    assert path == run.path / "summary.json"
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == run.read_json("summary.json")
    assert run.read_json("summary.json") == {
        "acc": 0.5,
        "counts": [1, 2],
        "nan": None,
        "inf": None,
        "p": "a/b",
        "t": [1.0, 2.0],
        "3": "int key",
    }
    run.write_text("notes/readme.txt", "héllo\n")
    assert run.read_text("notes/readme.txt") == "héllo\n"
    files = RunDirectory.open(run.path).manifest["files"]
    assert set(files) == {"summary.json", "notes/readme.txt"}
    assert files["summary.json"]["sha256"] == records.sha256_file(path)


def test_frame_round_trip_and_verify_detects_modified_csv(run: RunDirectory) -> None:
    df = pd.DataFrame({"label": [0, 1, 2], "radius": [0.1, 1 / 3, 0.0], "correct": [True, False, True]})
    run.write_frame("points.csv", df)
    back = run.read_frame("points.csv")
    pd.testing.assert_frame_equal(back, df)
    assert run.verify() == []
    path = run.path / "points.csv"
    path.write_text(path.read_text().replace("0.1", "0.9"))
    problems = run.verify()
    assert len(problems) == 1 and "points.csv" in problems[0] and "modified" in problems[0]
    with pytest.raises(RecordError, match="checksum mismatch for file 'points.csv'"):
        run.read_frame("points.csv")
    assert run.read_frame("points.csv", verify=False)["radius"][0] == 0.9
    path.unlink()
    assert any("missing" in p for p in run.verify())


def test_record_external_file(run: RunDirectory) -> None:
    target = run.file("store.npz")
    np.savez(target, x=np.zeros(3))
    sha = run.record_file("store.npz")
    assert run.manifest["files"]["store.npz"]["sha256"] == sha
    assert run.verify() == []
    with pytest.raises(RecordError, match="no such file"):
        run.record_file("plots/missing.png")


def test_atomic_write_keeps_old_content_on_failure(run: RunDirectory) -> None:
    run.write_json("summary.json", {"acc": 0.9})
    before = (run.path / "summary.json").read_bytes()
    manifest_before = (run.path / MANIFEST).read_bytes()
    with pytest.raises(TypeError, match="object"):
        run.write_json("summary.json", {"acc": 0.8, "bad": object()})
    assert (run.path / "summary.json").read_bytes() == before
    assert (run.path / MANIFEST).read_bytes() == manifest_before
    assert _no_temp_files(run.path)
    assert run.verify() == []


def test_atomic_write_bytes_failure_midway_removes_temp(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.bin"
    records.atomic_write_bytes(target, b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        records.atomic_write_bytes(target, b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    records.atomic_write_json(tmp_path / "x.json", {"a": np.int64(3), "b": [np.nan]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 3, "b": [None]}
    records.atomic_write_text(tmp_path / "t.txt", "abc")
    assert (tmp_path / "t.txt").read_text() == "abc"


@pytest.mark.parametrize(
    "bad", ["/etc/passwd", "../outside.json", "a/../../x.json", "", ".", "a/..", "..\\x.json", "C:\\x.json"]
)
def test_path_escape_rejected(run: RunDirectory, bad: str) -> None:
    with pytest.raises(InputError):
        run.write_json(bad, {"a": 1})
    with pytest.raises(InputError):
        run.file(bad)
    assert not (run.path.parent / "outside.json").exists()


def test_symlink_escape_rejected(run: RunDirectory, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        (run.path / "link").symlink_to(outside, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not supported")
    with pytest.raises(InputError, match="outside"):
        run.write_text("link/x.txt", "no")
    assert not (outside / "x.txt").exists()


def test_manifest_cannot_be_overwritten_via_write(run: RunDirectory) -> None:
    with pytest.raises(InputError, match="managed"):
        run.write_json(MANIFEST, {})
    assert RunDirectory.open(run.path).kind == "smoothing"


def test_read_missing_file(run: RunDirectory) -> None:
    with pytest.raises(RecordError, match="missing"):
        run.read_json("summary.json")


def test_updates_from_two_handles_are_merged(run: RunDirectory) -> None:
    other = RunDirectory.open(run.path)
    run.record_seed("a", 1)
    other.record_seed("b", 2)  # re-reads the manifest before writing: nothing is lost
    assert RunDirectory.open(run.path).manifest["seeds"] == {"a": 1, "b": 2}


def test_save_model_with_a_step_records_model_step_and_timing_in_one_update(run: RunDirectory) -> None:
    writes = []
    original = run._update
    run._update = lambda mutate: (writes.append(1), original(mutate))[1]  # count manifest updates
    run.save_model("m", _trained_small(), SPEC, step="train/m", seconds=1.5, final_loss=0.25)
    assert len(writes) == 1  # killed at any moment: the model with its step and timing, or none of them
    m = json.loads((run.path / MANIFEST).read_text())
    assert m["timings"]["train/m"] == 1.5 and m["steps"]["train/m"]["done"] is True
    assert m["steps"]["train/m"]["sha256"] == m["models"]["m"]["sha256"]
    assert m["steps"]["train/m"]["final_loss"] == 0.25
