"""``certkit demo``: train, certify and report a backdoored digits model in one call (the README's first command)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from certkit.errors import InputError
from certkit.runs.defaults import CERTIFY, DEMO
from certkit.runs.report import report
from certkit.runs.rundir import RunDirectory
from certkit.runs.single import RUN_KIND, CertifyConfig, TrainConfig, certify_run, model_name_for, train_run

__all__ = ["DEMO_SIGMAS", "run_demo"]


DEMO_SIGMAS: tuple[float, ...] = DEMO["sigmas"]


def run_demo(out: str | Path = DEMO["out"], *, sigmas: Sequence[float] = DEMO_SIGMAS, attack: str = "badnets",
             attack_params: dict[str, Any] | None = None, poison_rate: float = DEMO["poison_rate"], target: int = 0,
             epochs: int = DEMO["epochs"], n0: int = CERTIFY["n0"], n: int = DEMO["n"],
             alpha: float = CERTIFY["alpha"], seed: int = 0,
             max_points: int | None = None, device: str = "auto", progress: bool = True,
             log: Any = print) -> str:
    """The digits walk-through: train a backdoored CNN (and one noise-trained CNN per sigma), measure CA and
    ASR, certify the clean and triggered test sets with test-time smoothing at each sigma, write the run
    directory (``summary.json``, ``points.csv``, ``plots/certified_accuracy.png``) and return the table."""
    sigmas = tuple(float(s) for s in sigmas)
    if not sigmas or any(not math.isfinite(s) or s <= 0 for s in sigmas):
        raise InputError(f"demo sigmas must be positive and finite, got {sigmas}")
    cfg = TrainConfig(dataset="digits", model="digits-cnn", attack=attack, attack_params=dict(attack_params or {}),
                      poison_rate=poison_rate, target=target, epochs=epochs, noise_sigmas=(0.0, *sigmas), seed=seed)
    run = RunDirectory.create(out, {"train": cfg.to_dict()}, kind=RUN_KIND)
    t0 = time.perf_counter()
    train_run(run, device=device, progress=progress, log=log)
    certify_run(run, CertifyConfig(pairs=tuple((model_name_for(s), s) for s in sigmas), n0=n0, n=n, alpha=alpha,
                                   seed=seed, max_points=max_points),
                device=device, progress=progress, log=log)
    run.record_timing("demo/total", time.perf_counter() - t0)
    return report(run.path, replot=False)
