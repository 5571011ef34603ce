"""Data formats a user brings (issue 15 item 2): flat ``.npz`` rows with ``--input-shape C,H,W`` or a square
guess, the shape recorded in the dataset spec (``npz@C,H,W:PATH``), clear one-line refusals, and the format
documented where users look (``--help``)."""

from __future__ import annotations

import doctest
import json
import warnings

import numpy as np
import pytest

import certkit._validation as validation_module
import certkit.backdoor.data as data_module
from certkit._validation import check_input_shape
from certkit.backdoor.data import GuessedShapeWarning, dataset_spec, load_dataset, load_npz
from certkit.cli import build_parser, main
from certkit.errors import InputError, UnknownNameError

QUIET = ["--device", "cpu", "--no-progress"]


def _save(path, x_train, x_test, k=3):
    np.savez(path, x_train=x_train, y_train=np.arange(len(x_train)) % k, x_test=x_test,
             y_test=np.arange(len(x_test)) % k)
    return path


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_flat_rows_with_an_explicit_shape_are_read_in_c_h_w_order(tmp_path):
    x = _images((7, 3, 4, 5))
    path = _save(tmp_path / "flat.npz", x.reshape(7, -1), x[:3].reshape(3, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit shape is not a guess: no warning
        d = load_npz(path, input_shape=(3, 4, 5))
    assert d.input_shape == (3, 4, 5) and len(d.train) == 7 and len(d.test) == 3
    np.testing.assert_allclose(d.train.x.numpy(), x / 255.0, atol=1e-7)
    np.testing.assert_allclose(d.test.x.numpy(), x[:3] / 255.0, atol=1e-7)


def test_float_flat_rows_keep_their_values(tmp_path):
    x = np.random.default_rng(1).random((4, 1, 6, 6)).astype(np.float32)
    d = load_npz(_save(tmp_path / "f.npz", x.reshape(4, 36), x.reshape(4, 36)), input_shape="1,6,6")
    np.testing.assert_array_equal(d.train.x.numpy(), x)


@pytest.mark.parametrize("c, h", [(1, 8), (3, 4), (1, 28), (3, 32)])
def test_flat_rows_without_a_shape_get_a_square_guess_named_in_a_warning(tmp_path, c, h):
    x = _images((5, c, h, h))
    path = _save(tmp_path / "g.npz", x.reshape(5, -1), x.reshape(5, -1))
    with pytest.warns(GuessedShapeWarning, match=rf"x_train holds flat rows of {c * h * h} values: read as images of "
                      rf"shape \({c}, {h}, {h}\) in C, H, W order \(a guess; pass input_shape, CLI --input-shape"):
        d = load_npz(path)
    assert d.input_shape == (c, h, h)
    np.testing.assert_allclose(d.train.x.numpy(), x / 255.0, atol=1e-7)


@pytest.mark.parametrize("d", [50, 2, 20, 3 * 7 * 8])
def test_flat_rows_that_fit_no_square_are_refused_in_one_line(tmp_path, d):
    path = _save(tmp_path / "n.npz", np.zeros((4, d), np.uint8), np.zeros((2, d), np.uint8))
    with pytest.raises(InputError) as exc:
        load_npz(path)
    message = str(exc.value)
    assert "\n" not in message
    assert f"x_train holds flat rows of {d} values, neither H*H (1 channel) nor 3*H*H (3 channels)" in message
    assert "--input-shape C,H,W" in message


def test_flat_rows_of_another_size_than_the_given_shape_are_refused(tmp_path):
    path = _save(tmp_path / "w.npz", np.zeros((4, 64), np.uint8), np.zeros((2, 64), np.uint8))
    with pytest.raises(InputError, match=r"x_train holds flat rows of 64 values but input_shape \(1, 7, 7\) needs 49"):
        load_npz(path, input_shape=(1, 7, 7))


def test_the_shape_settles_an_ambiguous_four_dimensional_layout(tmp_path):
    x = _images((4, 3, 4, 3))  # NCHW (3, 4, 3) by default, NHWC (3, 3, 4) when the shape says so
    path = _save(tmp_path / "a.npz", x, x)
    assert load_npz(path).input_shape == (3, 4, 3)
    d = load_npz(path, input_shape=(3, 3, 4))
    np.testing.assert_allclose(d.train.x.numpy(), x.transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    with pytest.raises(InputError, match=r"x_train has shape \(4, 3, 4, 3\), which does not hold images of "
                       r"input_shape \(1, 4, 3\)"):
        load_npz(path, input_shape=(1, 4, 3))
    nhw = _save(tmp_path / "nhw.npz", x[:, 0], x[:, 0])
    assert load_npz(nhw, input_shape=(1, 4, 3)).input_shape == (1, 4, 3)


def test_the_shape_is_written_into_the_dataset_spec(tmp_path):
    x = _images((6, 64))
    path = _save(tmp_path / "s.npz", x, x)
    spec = dataset_spec(f"npz:{path}", (1, 8, 8))
    assert spec == f"npz@1,8,8:{path}"
    assert dataset_spec(spec, "1,8,8") == spec  # idempotent
    assert dataset_spec("digits") == "digits"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = load_dataset(spec)
        b = load_dataset(f"npz:{path}", input_shape=(1, 8, 8))
    assert a.input_shape == b.input_shape == (1, 8, 8) and a.train.sha256() == b.train.sha256()


@pytest.mark.parametrize("spec, shape, error, message", [
    ("npz@1,8,8:{p}", (1, 4, 16), InputError, "input_shape (1, 4, 16) contradicts the shape (1, 8, 8)"),
    ("digits", (1, 8, 8), InputError, "input_shape applies to npz:PATH datasets"),
    ("folder:{p}", (1, 8, 8), InputError, "input_shape applies to npz:PATH datasets"),
    ("digits@1,8,8", None, InputError, "a shape (@C,H,W) applies to npz@C,H,W:PATH only"),
    ("npz@1,8:{p}", None, InputError, "must be three positive integers C,H,W, got '1,8'"),
    ("npz@0,8,8:{p}", None, InputError, "must be three positive integers C,H,W"),
    ("npz@1,8,8:", None, InputError, "needs a path after 'npz@1,8,8:'"),
    ("npz@1,8,8", None, UnknownNameError, "npz@C,H,W:PATH"),
])
def test_bad_shapes_in_specs_are_refused_with_a_clear_message(tmp_path, spec, shape, error, message):
    spec = spec.format(p=tmp_path / "s.npz")
    with pytest.raises(error) as exc:
        load_dataset(spec, input_shape=shape)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("value", [(1, 8), (1, 8, 8, 1), (0, 8, 8), (1, -8, 8), (1.0, 8, 8), (True, 8, 8), "1,8,x",
                                   "1,,8", 8, None])
def test_input_shape_must_be_three_positive_integers(value):
    with pytest.raises(InputError, match="input_shape must be three positive integers C,H,W"):
        check_input_shape(value)


def test_train_round_trip_with_flat_rows_and_input_shape(tmp_path, capsys):
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = (d.images / 16.0 * 255).astype(np.uint8).reshape(len(d.images), 64)  # flat 8x8 images
    path = tmp_path / "digits-flat.npz"
    np.savez(path, x_train=rows[:1200], y_train=d.target[:1200], x_test=rows[1200:1300], y_test=d.target[1200:1300])
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuessedShapeWarning)
        assert main(["train", "--out", str(out), "--dataset", f"npz:{path}", "--input-shape", "1,8,8", "--epochs",
                     "1", "--noise-sigmas", "0.25", *QUIET]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["train"]["dataset"] == f"npz@1,8,8:{path}"  # the run records the shape
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["input_shape"] == [1, 8, 8] and summary["dataset"]["n_test"] == 100
    # the same command resumes the run (same config); certify reloads the data from the recorded spec
    assert main(["train", "--out", str(out), "--dataset", f"npz:{path}", "--input-shape", "1,8,8", "--epochs",
                 "1", "--noise-sigmas", "0.25", *QUIET]) == 0
    assert "checkpoint verified, not retrained" in capsys.readouterr().out
    assert main(["certify", str(out), "--n0", "10", "--n", "20", "--max-points", "5", *QUIET]) == 0


def test_train_with_a_guessed_shape_warns_and_trains(tmp_path):
    x = _images((60, 64))
    path = _save(tmp_path / "guess.npz", x, x[:20], k=2)
    out = tmp_path / "run"
    with pytest.warns(GuessedShapeWarning, match=r"\(1, 8, 8\)"):
        assert main(["train", "--out", str(out), "--dataset", f"npz:{path}", "--epochs", "1", "--target", "1",
                     *QUIET]) == 0
    assert json.loads((out / "summary.json").read_text())["dataset"]["input_shape"] == [1, 8, 8]


def _one_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("certkit: error: "), err
    for f in fragments:
        assert f in err[0], err[0]


@pytest.mark.parametrize("extra, fragments", [
    (["--input-shape", "1,8,8"], ["--input-shape needs --dataset npz:PATH"]),
    (["--dataset", "digits", "--input-shape", "1,8,8"], ["input_shape applies to npz:PATH datasets"]),
    (["--dataset", "npz:{flat}", "--input-shape", "1,8"], ["--input-shape: input_shape must be three positive"]),
    (["--dataset", "npz:{flat}", "--input-shape", "1,7,7"], ["holds flat rows of 50 values but input_shape"]),
    (["--dataset", "npz:{flat}"], ["neither H*H (1 channel) nor 3*H*H", "--input-shape C,H,W"]),
])
def test_cli_refusals_are_one_line_and_create_nothing(tmp_path, capsys, extra, fragments):
    flat = _save(tmp_path / "flat50.npz", np.zeros((6, 50), np.uint8), np.zeros((3, 50), np.uint8))
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *[a.format(flat=flat) for a in extra], "--epochs", "1", *QUIET]
    assert main(argv) == 2
    _one_line(capsys, *fragments)
    assert not out.exists()


def test_a_shape_that_is_not_integers_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "x", "--dataset", "npz:a.npz", "--input-shape", "1,eight,8"])
    assert exc.value.code == 2
    _one_line(capsys, "--input-shape", "not integers C,H,W: '1,eight,8'")


@pytest.mark.parametrize("command", [["train", "--out", "x"], ["certify", "run"], ["ensemble", "train", "--out", "x"],
                                     ["compare"]])
def test_the_npz_format_and_input_shape_are_in_the_help(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if command[0] == "ensemble":
        sub = sub._subparsers._group_actions[0].choices["train"]
    text = " ".join(sub.format_help().split())
    for fragment in ("x_train, y_train, x_test, y_test", "uint8 0..255 or float 0..1", "NHW, NCHW or NHWC",
                     "flat N x C*H*W in C,H,W order", "labels integers 0..K-1", "--input-shape C,H,W",
                     "npz@C,H,W:PATH"):
        assert fragment in text, (command, fragment)
    args = parser.parse_args([*command, "--dataset", "npz:a.npz", "--input-shape", "3,32,32"])
    assert args.input_shape == (3, 32, 32)


def test_doctests_of_the_loaders_and_checks_pass():
    for module in (data_module, validation_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
