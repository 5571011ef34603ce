"""certkit: certification-first toolkit for backdoor robustness of neural networks.

Public API (DESIGN.md section 4): exact confidence bounds (:func:`clopper_pearson`, :func:`hoeffding`),
test-time randomized smoothing (:class:`RandomizedSmoothing`, Mode A), per-point results
(:class:`CertificationResult`), metrics, run directories (:class:`RunDirectory`) and the ``certkit`` CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .bounds import ConfidenceInterval, clopper_pearson, hoeffding, hoeffding_halfwidth
from .ensemble import EnsembleVotes, SmoothedEnsemble, certify_votes
from .ensemble_training import EnsembleSpec, train_ensemble, train_member
from .errors import CertkitError, InputError, RecordError, UnknownNameError
from .metrics import certified_trigger_robustness, defense_effectiveness_rating, empirical_metrics
from .radius import gaussian_radius
from .records import RunDirectory
from .results import CertificationResult
from .sigma import SigmaResult, optimize_sigma
from .smoothing import PredictionResult, RandomizedSmoothing
from .storage import CertifiedStore, StorageCertifier, StorageResult

__all__ = [
    "CertificationResult",
    "CertifiedStore",
    "CertkitError",
    "ConfidenceInterval",
    "EnsembleSpec",
    "EnsembleVotes",
    "InputError",
    "PredictionResult",
    "RandomizedSmoothing",
    "RecordError",
    "RunDirectory",
    "SigmaResult",
    "SmoothedEnsemble",
    "StorageCertifier",
    "StorageResult",
    "UnknownNameError",
    "__version__",
    "certified_trigger_robustness",
    "certify_votes",
    "clopper_pearson",
    "defense_effectiveness_rating",
    "empirical_metrics",
    "gaussian_radius",
    "hoeffding",
    "hoeffding_halfwidth",
    "optimize_sigma",
    "train_ensemble",
    "train_member",
]
