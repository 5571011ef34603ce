"""Certification results: one row per test point, plain arrays, serialisable to CSV and JSON.

A :class:`CertificationResult` holds, for every certified point, the true label (``-1`` when unknown),
the smoothed prediction (``-1`` = abstain), the certified l2 radius (0 when abstaining), the lower
confidence bound on the top-class probability, the sigma used *both* to sample noise and to compute the
radius, and whether the certified prediction is correct. Curves (certified accuracy vs radius), the
average certified radius and the abstain rate are computed from these rows, so any curve can be recomputed
later from ``points.csv`` (the habit of Cohen et al.'s per-point logs).

Convention (Cohen et al. 2019, their tables): a point is *certified correct at radius r* when it is
correct and ``radius >= r``. For a concrete perturbation of norm ``d`` the certificate only covers
``d < radius`` (strict); :func:`certkit.metrics.certified_trigger_robustness` uses the strict form.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from certkit.certify.plots import plot_certified_accuracy
from certkit.errors import InputError
from certkit.io import atomic_write_text

#: Columns written to ``points.csv`` (in this order); ``trigger_norm`` is NaN where not applicable.
POINT_COLUMNS = ("index", "label", "prediction", "radius", "p_lower", "sigma", "correct", "triggered", "trigger_norm")


def _as_1d(name: str, values: Any, dtype: Any, n: int | None) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim == 0:
        arr = np.full(n if n is not None else 1, arr.item(), dtype=dtype)
    if arr.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name} has {arr.shape[0]} entries, expected {n}")
    return arr


@dataclass
class CertificationResult:
    """Per-point certificates of a smoothed classifier.

    Attributes (all 1-D arrays of length ``N``):
        label: true class, ``-1`` if unknown.
        prediction: certified class, ``-1`` if the smoothed classifier abstains.
        radius: certified l2 radius in pixel units (0 when abstaining).
        p_lower: lower confidence bound on the top-class probability.
        sigma: noise level used to sample *and* in the radius (per point).
        correct: ``prediction == label`` (False when abstaining or the label is unknown).
        triggered: whether the input carries a trigger.
        index: the point's id (position in the certified set unless given).
        trigger_norm: l2 norm of the trigger at this point (NaN when not applicable).
        meta: free-form settings (method, alpha, n0, n, seed, ...), JSON-serialisable.
    """

    label: np.ndarray
    prediction: np.ndarray
    radius: np.ndarray
    p_lower: np.ndarray
    sigma: np.ndarray
    correct: np.ndarray | None = None
    triggered: np.ndarray | None = None
    index: np.ndarray | None = None
    trigger_norm: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prediction = _as_1d("prediction", self.prediction, np.int64, None)
        n = self.prediction.shape[0]
        self.label = _as_1d("label", self.label, np.int64, n)
        self.radius = _as_1d("radius", self.radius, np.float64, n)
        self.p_lower = _as_1d("p_lower", self.p_lower, np.float64, n)
        self.sigma = _as_1d("sigma", self.sigma, np.float64, n)
        if self.correct is None:
            self.correct = (self.prediction == self.label) & (self.label >= 0) & (self.prediction >= 0)
        self.correct = _as_1d("correct", self.correct, bool, n)
        self.triggered = _as_1d("triggered", False if self.triggered is None else self.triggered, bool, n)
        self.index = _as_1d("index", np.arange(n) if self.index is None else self.index, np.int64, n)
        tn = np.nan if self.trigger_norm is None else self.trigger_norm
        self.trigger_norm = _as_1d("trigger_norm", tn, np.float64, n)
        if np.isnan(self.radius).any() or (self.radius < 0).any():
            raise InputError("radius must be finite and non-negative")
        if (self.correct & (self.prediction < 0)).any():
            raise InputError("a point cannot be correct while abstaining (prediction -1)")
        self.meta = dict(self.meta)

    # ------------------------------------------------------------------ size and selection
    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    def __repr__(self) -> str:
        name = self.meta.get("name", "")
        return (
            f"CertificationResult({name + ', ' if name else ''}n={len(self)}, "
            f"certified_accuracy@0={self.certified_accuracy(0.0):.4f}, acr={self.acr():.4f}, "
            f"abstain_rate={self.abstain_rate():.4f})"
        )

    def subset(self, mask: np.ndarray | Sequence[int]) -> CertificationResult:
        """The rows selected by a boolean mask or an index array (meta is kept)."""
        sel = np.asarray(mask)
        return CertificationResult(
            label=self.label[sel], prediction=self.prediction[sel], radius=self.radius[sel],
            p_lower=self.p_lower[sel], sigma=self.sigma[sel], correct=self.correct[sel],
            triggered=self.triggered[sel], index=self.index[sel], trigger_norm=self.trigger_norm[sel],
            meta=self.meta,
        )

    @staticmethod
    def concat(results: Iterable[CertificationResult], meta: dict[str, Any] | None = None) -> CertificationResult:
        """Stack several results row-wise (meta of the first unless given)."""
        results = list(results)
        if not results:
            raise InputError("concat needs at least one CertificationResult")
        cols = {c: np.concatenate([getattr(r, c) for r in results]) for c in POINT_COLUMNS}
        return CertificationResult(**cols, meta=dict(results[0].meta if meta is None else meta))

    # ------------------------------------------------------------------ metrics
    def certified_accuracy(self, radii: float | Sequence[float] | np.ndarray) -> np.ndarray | float:
        """Fraction of points that are correct with ``radius >= r``, for each r in ``radii``."""
        r = np.asarray(radii, dtype=np.float64)
        if np.isnan(r).any():
            raise InputError("radii contain NaN")
        if len(self) == 0:
            out = np.full(r.shape, np.nan)
        else:
            ok = self.correct[None, :] & (self.radius[None, :] >= r.reshape(-1, 1))
            out = ok.mean(axis=1).reshape(r.shape)
        return float(out) if out.ndim == 0 else out

    def acr(self) -> float:
        """Average certified radius: mean over all points of ``radius * correct``."""
        return float(np.mean(self.radius * self.correct)) if len(self) else float("nan")

    def abstain_rate(self) -> float:
        """Fraction of points on which the smoothed classifier abstains."""
        return float(np.mean(self.prediction < 0)) if len(self) else float("nan")

    def accuracy(self) -> float:
        """Fraction of points whose (non-abstaining) smoothed prediction is correct (= certified acc. at 0)."""
        return float(np.mean(self.correct)) if len(self) else float("nan")

    def summary(self, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[str, Any]:
        """A JSON-ready dictionary: size, ACR, abstain rate and certified accuracy at ``radii``."""
        ca = np.atleast_1d(self.certified_accuracy(list(radii)))
        return {
            "n": len(self),
            "acr": self.acr(),
            "abstain_rate": self.abstain_rate(),
            "certified_accuracy": {f"{r:g}": float(a) for r, a in zip(radii, ca)},
            "meta": self.meta,
        }

    # ------------------------------------------------------------------ serialisation
    def to_frame(self) -> pd.DataFrame:
        """One row per point with the columns of :data:`POINT_COLUMNS`."""
        return pd.DataFrame({c: getattr(self, c) for c in POINT_COLUMNS})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, meta: dict[str, Any] | None = None) -> CertificationResult:
        """Rebuild from a frame with at least ``label, prediction, radius`` (others get defaults)."""
        missing = [c for c in ("label", "prediction", "radius") if c not in frame.columns]
        if missing:
            raise InputError(f"frame lacks required columns: {', '.join(missing)}")
        n = len(frame)

        def col(name: str, default: Any) -> Any:
            return frame[name].to_numpy() if name in frame.columns else np.full(n, default)

        return cls(
            label=col("label", -1), prediction=col("prediction", -1), radius=col("radius", 0.0),
            p_lower=col("p_lower", np.nan), sigma=col("sigma", np.nan),
            correct=frame["correct"].to_numpy().astype(bool) if "correct" in frame.columns else None,
            triggered=col("triggered", False).astype(bool), index=col("index", 0) if "index" in frame.columns else None,
            trigger_norm=col("trigger_norm", np.nan), meta=meta or {},
        )

    def to_csv(self, path: str | Path) -> Path:
        """Write ``points.csv``-style rows (atomically)."""

        path = Path(path)
        atomic_write_text(path, self.to_frame().to_csv(index=False))
        return path

    @classmethod
    def from_csv(cls, path: str | Path, meta: dict[str, Any] | None = None) -> CertificationResult:
        """Read rows written by :meth:`to_csv` (or any CSV/TSV with label, prediction, radius)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no such file: {path}")
        sep = "\t" if path.suffix in (".tsv", ".txt") else ","
        frame = pd.read_csv(path, sep=sep)
        return cls.from_frame(frame, meta=meta)

    def to_dict(self) -> dict[str, Any]:
        """Columns as lists plus ``meta``: the JSON form."""
        out: dict[str, Any] = {c: getattr(self, c).tolist() for c in POINT_COLUMNS}
        out["trigger_norm"] = [None if np.isnan(v) else v for v in self.trigger_norm.tolist()]
        out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CertificationResult:
        cols = {c: data[c] for c in POINT_COLUMNS if c in data}
        if "trigger_norm" in cols:
            cols["trigger_norm"] = [np.nan if v is None else v for v in cols["trigger_norm"]]
        return cls(**cols, meta=data.get("meta", {}))

    def to_json(self, path: str | Path) -> Path:
        """Write the JSON form (atomically)."""

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict()))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> CertificationResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ plotting
    def plot(self, ax: Any = None, *, label: str | None = None, max_radius: float | None = None, **kwargs: Any) -> Any:
        """Plot certified accuracy against radius on ``ax`` (new figure if None); returns the axes."""

        return plot_certified_accuracy([self], labels=[label] if label else None, ax=ax, max_radius=max_radius, **kwargs)
