"""Working with long steps (issue 15 items 3, 4 and 6): budget lines before long steps, per-batch progress,
``--quiet``, smoke-test labels of ``--fast`` purifications, the certify settings in ``certkit report`` and the
compact console table of ``certkit compare``."""

from __future__ import annotations

import inspect
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

import purifiers
from certkit.backdoor.data import load_digits
from certkit.backdoor.models import build_model
from certkit.backdoor.training import train_model
from certkit.cli import main
from certkit.runs.budget import announce, format_duration, seconds_per_input
from certkit.runs.compare.grid import cell_line
from certkit.runs.compare.table import console_table
from certkit.runs.defaults import PURIFY_CPU_HEAVY
from certkit.runs.report import SMOKE_MARK, certify_settings_lines, purified_table

CPU = ["--device", "cpu"]
BAR = re.compile(r"\d+%\||it/s|s/it|batch/s|█")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits run with the undefended model and one noise-trained model (2 epochs each)."""
    out = tmp_path_factory.mktemp("workflow") / "run"
    assert main(["train", "--out", str(out), "--epochs", "2", "--noise-sigmas", "0", "0.25", *CPU,
                 "--no-progress"]) == 0
    return out


# ------------------------------------------------------------------------------------------ budgets
def test_certify_prints_its_budget_before_the_work_and_report_prints_the_settings(run_dir, capsys):
    assert main(["certify", str(run_dir), "--n0", "10", "--n", "20", "--max-points", "8", "--batch-size", "16",
                 *CPU, "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    row = summary["certified"][-1]
    points = row["n_clean"] + row["n_triggered"]
    budget = next(line for line in out.splitlines() if line.startswith("[budget] certify"))
    assert f"1 (model, sigma) x 1 sigma mode(s) x {points} points (clean + triggered) x (n0 10 + n 20) draws " \
           f"= {points * 30:,} forward passes; estimated ~" in budget
    assert "on this machine (cpu)" in budget
    assert out.index("[budget] certify") < out.index("[certify] noise-0.25")  # before the long loop
    # the row records every setting, and the report prints them
    assert (row["n0"], row["n"], row["alpha"], row["seed"], row["batch_size"], row["max_points"]) == \
        (10, 20, 0.001, 0, 16, 8)
    settings = (f"certify settings: n0 10, n 20, alpha 0.001, 8 clean + {row['n_triggered']} triggered points "
                "(max_points 8), seed 0, batch size 16")
    assert settings in out
    assert main(["report", str(run_dir)]) == 0
    assert settings in capsys.readouterr().out


def test_certify_settings_of_rows_made_before_they_were_recorded():
    old = {"n0": 100, "n": 1000, "alpha": 0.001, "n_clean": 40, "n_triggered": 36, "model": "noise-0.5",
           "sigma": 0.5}
    lines = certify_settings_lines({"certified": [old], "certify_settings": {"seed": 3, "max_points": 40}})
    assert lines == ["certify settings: n0 100, n 1000, alpha 0.001, 40 clean + 36 triggered points "
                     "(max_points 40), seed 3, batch size n/a"]
    other = {**old, "model": "undefended", "sigma": 0.25, "n": 50, "seed": 0, "batch_size": 8,
             "max_points": None}
    two = certify_settings_lines({"certified": [old, other]})
    assert two[0].startswith("certify settings of noise-0.5@0.5: n0 100, n 1000")
    assert two[1].startswith("certify settings of undefended@0.25: n0 100, n 50") and "(all)" in two[1]


def test_train_budget_line_and_quiet_output(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "a"), "--epochs", "1", "--noise-sigmas", "0.5", *CPU]) == 0
    cap = capsys.readouterr()
    assert "[budget] train: will run 1 model(s) x 1 epochs x 20 batches of 64 = 20 training steps; estimated ~" \
        in cap.out
    assert "[train] noise-0.5: CA" in cap.out
    assert BAR.search(cap.err)  # bars by default (the check below is not vacuous)
    assert main(["train", "--out", str(tmp_path / "b"), "--epochs", "1", "--noise-sigmas", "0.5", *CPU,
                 "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == f"run directory: {tmp_path / 'b'}"  # only the final result
    assert not BAR.search(cap.out + cap.err) and "[train]" not in cap.out + cap.err and "[budget]" not in cap.out


def test_budget_helpers():
    durations = [format_duration(s) for s in (0.2, 40, 600, 7200, 3 * 86400)]
    assert durations == ["~1 s", "~40 s", "~10 min", "~2.0 h", "~3.0 days"]
    lines: list[str] = []
    est = announce(lines.append, "x", 1000, "forward passes", detail="10 x 100", seconds_per_unit=0.01,
                   device="cpu", workers=2, note="n")
    assert est == pytest.approx(5.0)
    assert lines == ["[budget] x: will run 10 x 100 = 1,000 forward passes; estimated ~5 s on this machine "
                     "(cpu, 2 workers); n"]
    assert announce(lines.append, "y", 3, "steps") is None and lines[-1] == "[budget] y: will run 3 steps"
    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert seconds_per_input(model, (1, 8, 8), batch=32, backward=True) > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG and the model are untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert seconds_per_input(model, (3, 9, 9), batch=4) is None  # a failing pass gives no estimate


# ------------------------------------------------------------------------------------------ progress
def test_training_progress_advances_per_batch(capsys):
    data = load_digits().train.subset(np.arange(100))
    model = build_model("digits-cnn", num_classes=10, input_shape=(1, 8, 8))
    train_model(model, data, epochs=3, batch_size=25, device="cpu", progress=True, desc="t")
    err = capsys.readouterr().err
    assert "/12 " in err or "/12[" in err  # total = 3 epochs x 4 batches


class _RecordingBar:
    """Stands in for certkit.progress.bar: records the total and the updates of every bar a purifier opens."""

    opened: list = []

    def __init__(self, total, desc, *, enabled=True, unit="batch", leave=False):
        self.total, self.desc, self.updates, self.closed = total, desc, 0, False
        _RecordingBar.opened.append(self)

    def update(self, k=1):
        self.updates += k

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.parametrize("name, params, full", [
    ("nad", dict(te_epochs=2, epochs=2, batch_size=32), True),
    ("i-bau", dict(n_rounds=2, K=1, batch_size=32), True),
    ("mesa", dict(target=0, epochs=1, repair_epochs=2, batch_size=32, hidden=16), True),
    ("tsbd", dict(n=0.1, lr_unlearn=1e-2, ft_epochs=2, batch_size=32), True),
    ("rnp", dict(unlearn_epochs=3, mask_epochs=2, batch_size=32), False),   # unlearning may stop early
])
def test_purifier_bars_advance_per_batch(name, params, full, monkeypatch):
    """Each training loop of these purifiers advances its bar once per mini-batch (total = epochs x batches),
    so a long epoch never looks frozen."""
    module = inspect.getmodule(type(purifiers.make(name)))
    monkeypatch.setattr(module, "progress_bar", _RecordingBar)
    _RecordingBar.opened = []
    torch.manual_seed(0)
    kind = "digits-bn-cnn" if name == "rnp" else "digits-cnn"
    model = build_model(kind, num_classes=10, input_shape=(1, 8, 8))
    data = load_digits().train.subset(np.arange(100))
    purifiers.make(name, **params, device="cpu", progress=True).purify(model, data, seed=0)
    assert _RecordingBar.opened and all(b.closed for b in _RecordingBar.opened)
    for b in _RecordingBar.opened:
        assert b.total >= 4, (b.desc, b.total)  # at least 2 epochs (rounds) x 2 batches of 32 of ~80 images
        if full or "unlearn" not in b.desc:
            assert b.updates == b.total, (b.desc, b.updates, b.total)
        else:
            assert 0 < b.updates <= b.total, (b.desc, b.updates, b.total)


# ------------------------------------------------------------------------------------------ --fast
def test_fast_purification_is_labelled_a_smoke_test(run_dir, capsys):
    assert main(["purify", str(run_dir), "--method", "ft", "--fast", *CPU, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "--fast smoke-test budgets" in out
    # the budget line comes before the work: fast_params of ft are 2 epochs over the 251 clean images
    lines = out.splitlines()
    budget = next(i for i, x in enumerate(lines) if x.startswith("[budget] purify ft: will run 2 fine-tune epochs "
                                                                  "over 251 images = 502 inputs"))
    assert budget < next(i for i, x in enumerate(lines) if x.startswith("[purify] purified-ft:"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["purified"]["purified-ft"]["smoke_test"] is True
    assert json.loads((run_dir / "purify" / "ft.json").read_text())["smoke_test"] is True
    line = next(x for x in out.splitlines() if x.startswith("purified-ft "))
    assert line.endswith(SMOKE_MARK)
    # a faithful-budget entry is not marked
    faithful = {**summary["purified"]["purified-ft"], "smoke_test": False}
    table = purified_table({"purified": {"purified-x": faithful}})
    assert SMOKE_MARK not in table
    # a certified purified model made with --fast is named as a smoke test under the certified table
    assert main(["certify", str(run_dir), "--model", "purified-ft", "--sigma", "0.25", "--n0", "10", "--n", "20",
                 "--max-points", "4", *CPU, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{SMOKE_MARK}: purified-ft" in out and "[certify]" not in out and "[budget]" not in out


def test_a_purifier_refused_by_its_checks_prints_no_budget(run_dir, capsys):
    assert main(["purify", str(run_dir), "--method", "anp", *CPU, "--no-progress"]) != 0  # digits-cnn: no BN
    cap = capsys.readouterr()
    assert "has no BatchNorm layer" in cap.err and "[budget]" not in cap.out


def test_every_purifier_states_its_work_or_none():
    """Purifier.work: passes over the data of every registered method at its defaults (CLP trains nothing),
    with closed forms checked for the formulas that follow the reference's relative costs (purifier-notes
    section 1: SAU ~12 FT epochs per epoch, I-BAU ~5 x (1 + ~7), TSC ~1,200 curve epochs + FT)."""
    for name in purifiers.available():
        work = purifiers.make(name).work(200, 10)
        if name == "clp":
            assert work is None
            continue
        passes, words = work
        assert passes > 0 and isinstance(words, str) and words, name
    assert purifiers.make("sau").work(200, 10)[0] == 100 * 12
    assert purifiers.make("i-bau").work(200, 10)[0] == 5 * (1 + 7)
    assert purifiers.make("tsc").work(200, 10)[0] == 1200 + 10
    assert purifiers.make("ft-sam", epochs=3).work(200, 10)[0] == 6
    assert purifiers.make("anp", n_iters=100, batch_size=50).work(200, 10)[0] == pytest.approx(100 * 0.25 * 7 / 3)
    assert purifiers.make("mesa", detect=True, epochs=2, repair_epochs=1).work(200, 10)[0] == pytest.approx(
        10 * 3 * 2 * 0.9 + 1)
    assert purifiers.make("tsbd", n=0.1, ft_epochs=5).work(200, 10)[0] == 10


def test_purify_help_names_the_budgets_infeasible_on_a_cpu(capsys):
    with pytest.raises(SystemExit):
        main(["purify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "infeasible on a CPU" in text and "tsc (rounds=3, curve_epochs=200)" in text
    for name, budget in PURIFY_CPU_HEAVY.items():  # the listed budgets are the methods' defaults
        params = inspect.signature(type(purifiers.make(name)).__init__).parameters.values()
        defaults = {p.name: p.default for p in params}
        assert {k: defaults[k] for k in budget} == budget, name


# ------------------------------------------------------------------------------------------ compare
def test_compare_logs_one_line_per_cell_and_prints_a_compact_table(tmp_path, capsys):
    import yaml

    spec = dict(model="digits-cnn", attacks=["badnets"], epochs=1, defenses=["undefended", "ft"],
                purifier_params={"ft": {"epochs": 1, "batch_size": 32}}, noise_finetune_epochs=1, n0=10,
                n=20, max_points=10)
    f = tmp_path / "spec.yml"
    f.write_text(yaml.safe_dump(spec))
    out_dir = tmp_path / "cmp"
    assert main(["compare", "--spec", str(f), "--out", str(out_dir), *CPU, "--no-progress"]) == 0
    out = capsys.readouterr().out
    one_cell = re.compile(r"\[compare\] badnets\S*__(undefended|ft): ok  CA ")
    cells = [line for line in out.splitlines() if one_cell.match(line)]
    assert len(cells) == 2 and all(" ASR " in c and " CTR " in c and c.endswith(" s)") for c in cells)
    assert "[budget] compare: will run 2 cell(s) (0 kept); certification of 2 smoothed cell(s) x 10 points" in out
    head = next(line for line in out.splitlines() if line.startswith("attack"))
    assert head.split() == ["attack", "defense", "CA", "ASR", "CTR", "(l2)", "patch", "CTR", "CTR(samples)",
                            "status"]
    assert "| badnets |" not in out  # the wide Markdown table stays in table.md
    assert "full table (" in out and str(out_dir / "table.md") in out
    # resumed quietly: the table and the final line only
    assert main(["compare", "--spec", str(f), "--out", str(out_dir), *CPU, "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "[compare]" not in cap.out and "[budget]" not in cap.out and not BAR.search(cap.out + cap.err)
    assert "0 cell(s) run, 2 kept" in cap.out


def test_console_table_and_cell_lines():
    table = pd.DataFrame({"attack": ["badnets", "blended"], "poison_rate": [0.1, 0.05],
                          "defense": ["dpa", "rab"], "ca": [0.9, np.nan], "asr": [0.1, 0.2], "ctr": [np.nan, 0.5],
                          "patch_ctr": [np.nan] * 2, "ctr_samples": [0.75, np.nan], "status": ["ok", "ok"]})
    lines = console_table(table).splitlines()
    assert lines[2].split() == ["badnets@0.1", "dpa", "0.900", "0.100", "-", "-", "0.750", "ok"]
    assert lines[3].split() == ["blended@0.05", "rab", "-", "0.200", "0.500", "-", "-", "ok"]
    skipped = {"cell_id": "badnets__anp", "status": "skipped", "reason": "InputError: no BatchNorm",
               "wall_s": 0.25}
    assert cell_line(skipped) == "[compare] badnets__anp: skipped: InputError: no BatchNorm (0.2 s)"
    ok = {"cell_id": "c", "status": "ok", "ca": 0.5, "asr": 0.25, "ctr": None, "ctr_samples": 0.125,
          "wall_s": 2}
    assert cell_line(ok) == "[compare] c: ok  CA 0.500  ASR 0.250  CTR(samples) 0.125 (2.0 s)"
