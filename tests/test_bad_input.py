"""Bad input, tried as a new user would: every case is one line ``certkit: error: ...``, exit code 2, and
nothing created or changed. Also: run directories saved before the package was layered still load."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import file_snapshot, one_line_error

from certkit.certify.smoothing import RandomizedSmoothing
from certkit.cli import build_parser, main
from certkit.errors import InputError
from certkit.runs.rundir import RunDirectory

LEGACY = Path(__file__).parent / "data" / "legacy-runs"
QUIET = ["--device", "cpu", "--no-progress"]


@pytest.fixture
def legacy_single(tmp_path: Path) -> Path:
    """A copy of a single-model run directory written by certkit before the layering (2 epochs, 12 points)."""
    out = tmp_path / "legacy-single"
    shutil.copytree(LEGACY / "single", out)
    return out


# ------------------------------------------------------------------------------------------ seeds, numbers
def test_a_negative_certify_seed_is_one_line_and_changes_nothing(legacy_single, capsys):
    before = file_snapshot(legacy_single)
    assert main(["certify", str(legacy_single), "--model", "noise-0.25", "--seed", "-5", "--n0", "5", "--n", "10",
                 *QUIET]) == 2
    one_line_error(capsys, "--seed", "seed must be an integer in [0, 2**32), got -5")
    assert file_snapshot(legacy_single) == before


def test_a_negative_train_seed_creates_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--seed", "-1", *QUIET]) == 2
    one_line_error(capsys, "--seed", "seed must be an integer in [0, 2**32), got -1")
    assert not out.exists()


@pytest.mark.parametrize("text,value", [("1e5", 1e5), ("1E-3", 1e-3), ("+0.5", 0.5)])
def test_numbers_in_any_python_notation_are_numbers(text, value):
    args = build_parser().parse_args(["train", "--out", "x", "--noise-sigmas", "0", text])
    assert args.noise_sigmas == [0.0, value]


def test_a_word_where_a_number_belongs_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "x", "--noise-sigmas", "lots"])
    assert exc.value.code == 2
    one_line_error(capsys, "--noise-sigmas", "not a number: 'lots'")


# ------------------------------------------------------------------------------------------ data files
def _npz_with_label(path: Path, label: int) -> Path:
    x = np.zeros((20, 8, 8), dtype=np.uint8)
    y = np.arange(20) % 10
    y_test = y.copy()
    y_test[0] = label
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y_test)
    return path


@pytest.mark.parametrize("kind,message", [
    ("empty", "is empty (0 bytes)"),
    ("npy", "holds a single array (a .npy file), not an .npz archive"),
    ("label", "has label 1000000000 but only 40 images"),
    ("text", "could not read"),
])
def test_bad_npz_files_are_refused_before_the_run_directory_exists(tmp_path, capsys, kind, message):
    path = tmp_path / "data.npz"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((4, 8, 8), dtype=np.uint8))
    elif kind == "label":
        _npz_with_label(path, 10**9)
    else:
        path.write_text("x_train,y_train\n1,2\n")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--dataset", f"npz:{path}", "--epochs", "1", *QUIET]) == 2
    one_line_error(capsys, message)
    assert not out.exists()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (the image data is one empty row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00"))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_in_an_image_folder_is_refused(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--dataset", f"folder:{root}", "--epochs", "1", *QUIET]) == 2
    line = one_line_error(capsys, "bomb.png")
    assert "30000x30000" in line or "decompression bomb" in line
    assert not out.exists()


def test_after_a_rejected_train_a_valid_one_into_the_same_directory_works(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--target", "10", "--epochs", "1", *QUIET]) == 2
    one_line_error(capsys, "target class 10 is out of range")
    assert not out.exists()
    assert main(["train", "--out", str(out), "--epochs", "1", *QUIET]) == 0
    assert RunDirectory.open(out).has_model("undefended")


# ------------------------------------------------------------------------------------------ specs, checkpoints
@pytest.mark.parametrize("text,fragment", [
    ("attacks: [badnets\ndefenses: [ft]\n", "is not valid YAML"),
    ("model: !!python/object:os.system {}\n", "is not valid YAML"),
])
def test_bad_yaml_specs_are_one_line(tmp_path, capsys, text, fragment):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = tmp_path / "cmp"
    assert main(["compare", "--spec", str(spec), "--out", str(out), *QUIET]) == 2
    line = one_line_error(capsys, fragment, "line ")
    assert "python/object" not in line or "constructor" in line
    assert not out.exists()


def test_an_unknown_defense_fails_before_any_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--defenses", "undefended", "nosuchdefense", "--out", str(out), *QUIET]) == 2
    one_line_error(capsys, "unknown defense(s) 'nosuchdefense'", "choose from undefended")
    assert not out.exists()


def test_a_checkpoint_of_the_wrong_shapes_is_one_line(legacy_single, capsys):
    run = RunDirectory.open(legacy_single)
    state = run.load_state_dict("noise-0.25")
    first = next(iter(k for k, v in state.items() if v.dim() > 1))
    state[first] = torch.zeros(3, *state[first].shape[1:])
    path = legacy_single / "models" / "noise-0.25.pt"
    torch.save(state, path)
    manifest = json.loads((legacy_single / "manifest.json").read_text())
    manifest["models"]["noise-0.25"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (legacy_single / "manifest.json").write_text(json.dumps(manifest))
    before = file_snapshot(legacy_single)
    assert main(["certify", str(legacy_single), "--model", "noise-0.25", "--n0", "5", "--n", "10", *QUIET]) == 2
    one_line_error(capsys, "does not fit the model built from its spec", f"size mismatch for {first}")
    assert file_snapshot(legacy_single) == before


# ------------------------------------------------------------------------------------------ library
def test_certifying_no_input_raises_instead_of_returning_nan():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    smoother = RandomizedSmoothing(model, num_classes=10, sigma=0.25, progress=False)
    with pytest.raises(InputError, match="holds no inputs"):
        smoother.certify(torch.zeros(0, 1, 8, 8), n0=5, n=10)


def test_inputs_that_do_not_fit_the_model_are_named_before_any_forward():
    from certkit.backdoor.models import build_model

    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8), mean=0.5, std=0.5)
    smoother = RandomizedSmoothing(model, num_classes=10, sigma=0.25, progress=False)
    with pytest.raises(InputError, match="3 channel"):
        smoother.certify(torch.zeros(2, 3, 8, 8), n0=5, n=10)
    with pytest.raises(InputError, match="size 16x16 but the model was built for 8x8"):
        smoother.certify(torch.zeros(2, 1, 16, 16), n0=5, n=10)
    with pytest.raises(InputError, match="floating-point"):
        smoother.certify(torch.zeros(2, 1, 8, 8, dtype=torch.int64), n0=5, n=10)


# ------------------------------------------------------------------------------------------ legacy runs
def test_run_directories_from_before_the_layering_still_report_and_certify(legacy_single, capsys):
    assert main(["report", str(legacy_single)]) == 0
    assert "noise-0.25" in capsys.readouterr().out
    assert main(["certify", str(legacy_single), "--model", "noise-0.25", "--sigma", "0.5", "--n0", "5", "--n", "10",
                 "--max-points", "6", *QUIET]) == 0
    summary = json.loads((legacy_single / "summary.json").read_text())
    assert any(row["sigma"] == 0.5 for row in summary["certified"])
    assert RunDirectory.open(legacy_single).verify() == []


def test_ensemble_run_directories_from_before_the_layering_still_report(tmp_path, capsys):
    out = tmp_path / "legacy-ensemble"
    shutil.copytree(LEGACY / "ensemble", out)
    assert main(["report", str(out)]) == 0
    assert "ensemble (M=3" in capsys.readouterr().out
    from certkit.runs.ensemble_train import load_ensemble

    ens = load_ensemble(out, progress=False, device="cpu")
    assert ens.n_members == 3
