"""The one data pipeline (certkit.backdoor.prepare): every run kind gets the same poisoned indices, triggered
test set and defender clean set from the same data settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from certkit.backdoor.prepare import DataConfig, draw_clean_indices, prepare_data
from certkit.errors import InputError, UnknownNameError
from certkit.runs.compare.grid import _data, cell_data_config
from certkit.runs.compare.spec import CompareSpec
from certkit.runs.ensemble_train import EnsembleSpec
from certkit.runs.single import TrainConfig

SETTINGS = {"attack": "blended", "poison_rate": 0.05, "target": 2, "seed": 3}


def _same(a, b) -> None:
    assert np.array_equal(a.poisoned.poison_indices, b.poisoned.poison_indices)
    assert torch.equal(a.triggered.x, b.triggered.x) and torch.equal(a.triggered.y_true, b.triggered.y_true)
    assert a.data_hashes == b.data_hashes
    assert np.array_equal(a.defender_clean_indices(0.2), b.defender_clean_indices(0.2))


def test_single_runs_ensembles_and_compare_cells_get_the_same_data():
    single = prepare_data(TrainConfig(**SETTINGS), cache=False)
    ensemble = prepare_data(EnsembleSpec(**SETTINGS, members=1), cache=False)
    spec = CompareSpec(attacks=("blended",), poison_rates=(0.05,), target=2, seed=3, defenses=("undefended",))
    cell = spec.cells()[0]
    compare = prepare_data(cell_data_config(spec, cell), cache=False)
    _same(single, ensemble)
    _same(single, compare)
    assert single.poisoned.num_poisoned == round(0.05 * len(single.splits.train))


def test_compare_and_purify_draw_the_same_defender_clean_set():
    spec = CompareSpec(attacks=("blended",), poison_rates=(0.05,), target=2, seed=3, defenses=("undefended",),
                       clean_fraction=0.2)
    cell = spec.cells()[0]
    in_compare = _data(spec, cell).clean
    # certkit purify draws prepare_data(train_cfg).defender_clean_indices(fraction, purify seed)
    purify_idx = prepare_data(TrainConfig(**SETTINGS)).defender_clean_indices(0.2, seed=3)
    single = prepare_data(TrainConfig(**SETTINGS))
    assert in_compare.sha256() == single.splits.train.subset(purify_idx).sha256()
    assert not set(purify_idx.tolist()) & set(single.poisoned.poison_indices.tolist())


def test_the_defender_never_gets_an_attacked_sample():
    data = prepare_data(DataConfig(attack="wanet", poison_rate=0.1, seed=1), cache=False)
    attacked = data.attacked_indices()
    assert len(data.poisoned.noise_indices) > 0  # WaNet's noise mode touches extra samples
    assert set(data.poisoned.noise_indices.tolist()) <= set(attacked.tolist())
    clean = data.defender_clean_indices(0.5)
    assert not set(clean.tolist()) & set(attacked.tolist())
    assert np.array_equal(clean, np.sort(clean)) and len(np.unique(clean)) == len(clean)


def test_the_cache_returns_the_same_object_for_equal_configs():
    a = prepare_data(DataConfig(seed=11))
    assert prepare_data(TrainConfig(seed=11, poison_rate=0.1)) is a
    assert prepare_data(DataConfig(seed=12)) is not a


@pytest.mark.parametrize("field,value,message", [
    ("poison_rate", 1.0, "poison_rate must lie in [0, 1)"),
    ("poison_rate", float("nan"), "poison_rate must be a number"),
    ("target", -1, "target must be a non-negative integer"),
    ("target", True, "target must be a non-negative integer"),
    ("seed", -5, "seed must be an integer in [0, 2**32)"),
    ("seed", 2**32, "seed must be an integer in [0, 2**32)"),
    ("seed", 1.0, "seed must be an integer in [0, 2**32)"),
    ("dataset", "", "dataset must be a non-empty string"),
    ("attack_params", {"alpha": float("inf")}, "attack params must be JSON serialisable"),
])
def test_every_data_field_is_checked_once_for_every_run_kind(field, value, message):
    for make in (DataConfig, TrainConfig, lambda **kw: EnsembleSpec(members=1, **kw)):
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace(")", r"\)").replace("*", r"\*")):
            make(**{field: value})


def test_unknown_attack_names_are_refused_with_the_choices():
    with pytest.raises(UnknownNameError, match="badnets"):
        DataConfig(attack="nosuchattack")


def test_target_out_of_range_for_the_dataset():
    with pytest.raises(InputError, match="target class 10 is out of range"):
        prepare_data(DataConfig(target=10), cache=False)


def test_draw_clean_indices_errors():
    with pytest.raises(InputError, match="clean fraction must lie in"):
        draw_clean_indices(10, np.array([], dtype=np.int64), 0.0, 0)
    with pytest.raises(InputError, match="only 2 training samples are unpoisoned"):
        draw_clean_indices(10, np.arange(8), 0.5, 0)
