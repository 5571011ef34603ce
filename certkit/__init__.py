"""certkit: certification-first toolkit for backdoor robustness of neural networks.

The package is layered (``docs/design.md`` section 4); a module imports only from its own layer or
a lower one:

* ``certkit.errors``, ``_validation``, ``io``, ``seeding``, ``devices``, ``parallel``, ``version``: the base;
* ``certkit.certify``: the certification maths (bounds, radii, smoothing, ensembles' votes, sample-specific
  sigma, storage certification, results and certified metrics); no run directories;
* ``certkit.backdoor``: data, attacks, models, training and the one ``prepare`` pipeline;
* ``purifiers`` (a package of its own): empirical defenses;
* ``certkit.runs``: run directories, single-model runs, ensembles, purify runs, reports, compare grid;
* ``certkit.cli``: the command line.

This module is only a facade: the public names below are imported on first use (PEP 562), so
``import certkit`` stays fast and loading a low layer never pulls in a higher one.

>>> import certkit
>>> certkit.clopper_pearson(10, 10, alpha=0.001, alternative="greater").low > 0.49
True
"""

from __future__ import annotations

import importlib
from typing import Any

from certkit.version import __version__ as __version__

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ConfidenceInterval": "certkit.certify.bounds",
    "clopper_pearson": "certkit.certify.bounds",
    "hoeffding": "certkit.certify.bounds",
    "hoeffding_halfwidth": "certkit.certify.bounds",
    "gaussian_radius": "certkit.certify.radius",
    "CertificationResult": "certkit.certify.results",
    "certified_trigger_robustness": "certkit.certify.metrics",
    "simultaneous_asr_bound": "certkit.certify.metrics",
    "SimultaneousBound": "certkit.certify.metrics",
    "PredictionResult": "certkit.certify.smoothing",
    "RandomizedSmoothing": "certkit.certify.smoothing",
    "EnsembleVotes": "certkit.certify.ensemble",
    "SmoothedEnsemble": "certkit.certify.ensemble",
    "certify_votes": "certkit.certify.ensemble",
    "SigmaResult": "certkit.certify.sigma",
    "optimize_sigma": "certkit.certify.sigma",
    "CertifiedStore": "certkit.certify.storage",
    "StorageCertifier": "certkit.certify.storage",
    "StorageResult": "certkit.certify.storage",
    "certified_triggered_accuracy": "certkit.certify.metrics",
    "AblatedModel": "certkit.certify.patch",
    "PatchCertificate": "certkit.certify.patch",
    "derandomized_certify": "certkit.certify.patch",
    "patchcleanser_certify": "certkit.certify.patch",
    "patch_trigger_robustness": "certkit.certify.patch",
    "AggregationCertificate": "certkit.certify.aggregation",
    "Layout": "certkit.certify.aggregation",
    "bagging_certify": "certkit.certify.aggregation",
    "combine_versions": "certkit.certify.aggregation",
    "dpa_certify": "certkit.certify.aggregation",
    "dpa_partition": "certkit.certify.aggregation",
    "fa_certify": "certkit.certify.aggregation",
    "joint_certify": "certkit.certify.aggregation",
    "poisoning_trigger_robustness": "certkit.certify.aggregation",
    "roe_certify": "certkit.certify.aggregation",
    "defense_effectiveness_rating": "certkit.backdoor.metrics",
    "empirical_metrics": "certkit.backdoor.metrics",
    "ArrayDataset": "certkit.backdoor.data",
    "DatasetSplits": "certkit.backdoor.data",
    "dataset_spec": "certkit.backdoor.data",
    "load_dataset": "certkit.backdoor.data",
    "load_digits": "certkit.backdoor.data",
    "load_image_folder": "certkit.backdoor.data",
    "load_npz": "certkit.backdoor.data",
    "load_torchvision": "certkit.backdoor.data",
    "BadNets": "certkit.backdoor.attacks",
    "Blended": "certkit.backdoor.attacks",
    "make_attack": "certkit.backdoor.attacks",
    "triggered_test_set": "certkit.backdoor.attacks",
    "MODELS": "certkit.backdoor.models",
    "build_model": "certkit.backdoor.models",
    "model_from_spec": "certkit.backdoor.models",
    "predict_labels": "certkit.backdoor.models",
    "predict_logits": "certkit.backdoor.models",
    "train_model": "certkit.backdoor.training",
    "DataConfig": "certkit.backdoor.prepare",
    "PreparedData": "certkit.backdoor.prepare",
    "prepare_data": "certkit.backdoor.prepare",
    "CertkitError": "certkit.errors",
    "InputError": "certkit.errors",
    "RecordError": "certkit.errors",
    "UnknownNameError": "certkit.errors",
    "RunDirectory": "certkit.runs.rundir",
    "load_run_model": "certkit.runs.models",
    "ExportedModel": "certkit.runs.export",
    "export_model": "certkit.runs.export",
    "EnsembleSpec": "certkit.runs.ensemble_train",
    "load_ensemble": "certkit.runs.ensemble_train",
    "train_ensemble": "certkit.runs.ensemble_train",
    "train_member": "certkit.runs.ensemble_train",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'certkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
