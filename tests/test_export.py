"""Using certkit's models and data without certkit, and the names a user needs (issue 15 item 9):
``certkit export`` (TorchScript or a plain state dict, checked against the run's model), ``certkit certify
--ids FILE`` and the top-level names of the README examples."""

from __future__ import annotations

import doctest
import hashlib
import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import certkit.io as io_module
import certkit.runs.export as export_module
from certkit.backdoor.data import load_digits
from certkit.backdoor.models import build_model, model_from_spec
from certkit.certify.patch import AblatedModel
from certkit.cli import main
from certkit.errors import InputError, RecordError, UnknownNameError
from certkit.runs.export import export_model
from certkit.runs.models import build_model_from_spec, load_run_model
from certkit.runs.rundir import RunDirectory
from certkit.runs.single import CertifyConfig

QUIET = ["--device", "cpu", "--no-progress"]
CERT = ["--n0", "10", "--n", "20", *QUIET]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny BatchNorm run (one epoch; models undefended and noise-0.25)."""
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", "--out", str(out), "--model", "digits-bn-cnn", "--epochs", "1", "--noise-sigmas", "0",
                 "0.25", *QUIET]) == 0
    return out


@pytest.fixture(scope="module")
def test_inputs():
    return load_digits().test.x


def _plain_torch_logits(model_file, inputs, tmp_path) -> torch.Tensor:
    """Logits of a TorchScript file computed in a fresh Python that cannot import certkit."""
    x_file, y_file = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x_file, inputs.numpy())
    code = (
        "import sys\n"
        "sys.modules['certkit'] = None; sys.modules['purifiers'] = None  # any import of them fails\n"
        "import numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        f"model = torch.jit.load({str(model_file)!r})\n"
        f"x = torch.from_numpy(np.load({str(x_file)!r}))\n"
        "with torch.no_grad():\n"
        f"    np.save({str(y_file)!r}, model(x).numpy())\n"
        "assert not [m for m in sys.modules if m.startswith(('certkit', 'purifiers')) and sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return torch.from_numpy(np.load(y_file))


def _certkit_logits(run: RunDirectory, name: str, inputs: torch.Tensor) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return load_run_model(run, name)(inputs)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ export
def test_torchscript_export_loads_without_certkit_and_gives_identical_logits(run_dir, test_inputs, tmp_path, capsys):
    out = tmp_path / "noise.pt"
    assert main(["export", str(run_dir), "--model", "noise-0.25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "logits match the run's model" in printed and "torch.jit.load" in printed
    got = _plain_torch_logits(out, test_inputs, tmp_path)
    want = _certkit_logits(RunDirectory.open(run_dir), "noise-0.25", test_inputs)
    assert got.shape == (540, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_the_torchscript_file_holds_the_normalisation_and_batchnorm_statistics(run_dir, tmp_path):
    exported = export_model(run_dir, "undefended", tmp_path / "u.pt")
    run = RunDirectory.open(run_dir)
    spec = run.model_spec("undefended")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # recent torch deprecates TorchScript
        loaded = torch.jit.load(str(exported.path))
    state = {k: v for k, v in loaded.state_dict().items()}
    mean = torch.tensor(spec["kwargs"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    assert torch.equal(state["normalize.mean"], mean)
    assert torch.equal(state["normalize.std"], torch.tensor(spec["kwargs"]["std"], dtype=torch.float32).view(1, -1, 1, 1))
    saved = run.load_state_dict("undefended")
    assert all(torch.equal(state[k], saved[k]) for k in saved if "running" in k)  # BN statistics, eval mode
    desc = json.loads(exported.description.read_text())
    assert desc["format"] == "torchscript" and desc["input"]["shape"] == ["N", 1, 8, 8]
    assert desc["input"]["range"] == [0.0, 1.0] and desc["output"]["shape"] == ["N", 10]
    assert desc["normalisation"]["mean"] == spec["kwargs"]["mean"] and desc["architecture"] == spec
    assert desc["source"]["model_sha256"] == run.manifest["models"]["undefended"]["sha256"]
    assert desc["check"]["inputs"] == 16 and desc["check"]["max_abs_logit_diff"] <= 1e-5
    assert desc["sha256"] == hashlib.sha256(exported.path.read_bytes()).hexdigest()


def test_state_dict_export_is_tensors_only_and_loads_into_the_architecture(run_dir, test_inputs, tmp_path, capsys):
    out = tmp_path / "sd.pt"
    assert main(["export", str(run_dir), "--model", "noise-0.25", "--out", str(out), "--format", "state-dict"]) == 0
    assert "weights_only=True" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    desc = json.loads((tmp_path / "sd.pt.json").read_text())
    assert desc["state_dict"] == {k: list(v.shape) for k, v in state.items()}
    assert "normalize" in desc["modules"] and desc["format"] == "state-dict"
    model = model_from_spec(desc["architecture"])
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(test_inputs), _certkit_logits(RunDirectory.open(run_dir), "noise-0.25",
                                                                        test_inputs), rtol=0, atol=1e-6)


def test_a_purified_model_with_an_inserted_layer_exports(tmp_path, test_inputs):
    base = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8), mean=(0.3,), std=(0.4,))
    spec = {**base.certkit_spec, "structure": [{"op": "neural-polarizer", "path": "features.2", "channels": 16}]}
    torch.manual_seed(0)
    model = build_model_from_spec(spec)
    run = RunDirectory.create(tmp_path / "run", {"note": "purified"}, kind="single")
    run.save_model("purified-npd", model, spec)
    exported = export_model(run, "purified-npd", tmp_path / "npd.pt", check_inputs=test_inputs[:50])
    assert exported.max_abs_diff is not None and exported.max_abs_diff <= 1e-5
    got = _plain_torch_logits(exported.path, test_inputs[:50], tmp_path)
    torch.testing.assert_close(got, _certkit_logits(run, "purified-npd", test_inputs[:50]), rtol=0, atol=1e-6)


def test_export_refuses_unknown_and_ablated_models_and_bad_arguments(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--model", "nope", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model 'nope'" in err[0] and "'undefended'" in err[0]
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(InputError, match="is a directory"):
        export_model(run_dir, "undefended", tmp_path)
    with pytest.raises(UnknownNameError, match="unknown format 'onnx'; choose one of 'torchscript', 'state-dict'"):
        export_model(run_dir, "undefended", tmp_path / "y.pt", format="onnx")
    with pytest.raises(InputError, match=r"check_inputs must be a tensor \[N, 1, 8, 8\]"):
        export_model(run_dir, "undefended", tmp_path / "y.pt", check_inputs=torch.zeros(2, 3, 8, 8))
    base = build_model("digits-cnn", num_classes=10, input_shape=(2, 8, 8))
    ablated = AblatedModel(base, channels=1)
    spec = {**base.certkit_spec, "ablation": {"kind": "column", "band": 2, "channels": 1}}
    run = RunDirectory.create(tmp_path / "abl", {"note": "ablated"}, kind="single")
    run.save_model("column-ablation-b2", ablated, spec)
    with pytest.raises(InputError, match="de-randomized smoothing base model"):
        export_model(run, "column-ablation-b2", tmp_path / "abl.pt")
    assert not (tmp_path / "abl.pt").exists()


def test_a_tampered_checkpoint_is_not_exported(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with open(copy / "models" / "undefended.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(RecordError, match="checksum mismatch"):
        export_model(copy, "undefended", tmp_path / "t.pt")
    assert not (tmp_path / "t.pt").exists()


# ------------------------------------------------------------------------------------------ certify --ids
def test_certify_ids_restricts_to_the_given_test_points(run_dir, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("# five test points\n17, 3\n250\n0 539\n")
    assert main(["certify", str(run_dir), "--ids", str(ids), *CERT]) == 0
    points = pd.read_csv(run_dir / "points.csv")
    clean = points[(points["set"] == "clean") & (points["model"] == "noise-0.25")]
    assert clean["index"].tolist() == [0, 3, 17, 250, 539]  # test order
    trig = points[(points["set"] == "triggered") & (points["model"] == "noise-0.25")]
    assert set(trig["index"] - 540) <= {0, 3, 17, 250, 539} and len(trig) >= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["certify_settings"]["ids"] == [0, 3, 17, 250, 539]
    assert summary["certified"][-1]["n_clean"] == 5 and summary["certified"][-1]["n_ids"] == 5
    assert "5 clean + " in (out := capsys.readouterr().out) and "points (5 given ids)" in out
    np.save(tmp_path / "ids.npy", np.array([5, 1], dtype=np.int32))
    assert main(["certify", str(run_dir), "--ids", str(tmp_path / "ids.npy"), *CERT]) == 0
    points = pd.read_csv(run_dir / "points.csv")
    assert points[(points["set"] == "clean")]["index"].tolist() == [1, 5]  # another selection is certified anew


@pytest.mark.parametrize("content, fragments", [
    ("3\n3\n", ["--ids: ids must not repeat an index: 3 appears 2 times"]),
    ("1\n540\n", ["--ids: ids has index 540 but there are only 540 points (indices 0..539)"]),
    ("1\n-2\n", ["--ids: ids must be indices >= 0, got -2"]),
    ("1\n2.0\n", ["line 2: '2.0' is not an integer", "fmt='%d'"]),
    ("# nothing\n", ["--ids: ids is empty"]),
])
def test_bad_ids_files_are_one_line_errors(run_dir, tmp_path, capsys, content, fragments):
    ids = tmp_path / "ids.txt"
    ids.write_text(content)
    before = (run_dir / "summary.json").read_text()
    assert main(["certify", str(run_dir), "--ids", str(ids), *CERT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkit: error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    assert (run_dir / "summary.json").read_text() == before


def test_ids_and_max_points_and_patch_certificates_do_not_mix(run_dir, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2")
    assert main(["certify", str(run_dir), "--ids", str(ids), "--max-points", "5", *CERT]) == 2
    assert "ids and max_points cannot be combined" in capsys.readouterr().err
    assert main(["certify", str(run_dir), "--ids", str(ids), "--certificate", "patchcleanser", "--patch-size", "2",
                 *QUIET]) == 2
    assert "--ids applies to --certificate smoothing" in capsys.readouterr().err
    assert main(["certify", str(run_dir), "--ids", str(tmp_path / "missing.txt"), *CERT]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "f.npy", np.array([1.0, 2.0]))
    with pytest.raises(InputError, match="must hold integers, got dtype float64"):
        CertifyConfig(pairs=(("m", 0.25),), ids=tmp_path / "f.npy")
    assert CertifyConfig(pairs=(("m", 0.25),), ids=[4, 2]).ids == (2, 4)


# ------------------------------------------------------------------------------------------ top-level names
def test_the_readme_example_needs_only_top_level_names():
    import certkit

    for name in ("load_dataset", "load_npz", "load_image_folder", "dataset_spec", "make_attack", "BadNets",
                 "triggered_test_set", "build_model", "train_model", "predict_labels", "RandomizedSmoothing",
                 "export_model", "load_run_model", "RunDirectory", "dpa_partition"):
        assert name in certkit.__all__ and getattr(certkit, name) is not None, name
    from certkit import BadNets, make_attack

    assert isinstance(make_attack("badnets"), BadNets)


def test_doctests_of_export_and_index_reading_pass():
    for module in (export_module, io_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
