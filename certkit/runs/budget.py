"""Budgets: before a long step, one line saying what it will run and how long that should take here.

A step counts its work (forward passes for certification and ensemble votes, optimiser steps of epochs x
batches for training), times a short warm-up of the real workload with :func:`seconds_per_input` (one
batch through the step's own model on its device, after one untimed call) and logs the line through the
run's ``log`` callable with :func:`announce`::

    [budget] certify: 2 (model, sigma) x 1 sigma mode x 80 points x (n0 20 + n 100) draws = 19,200 forward
    passes; estimated ~4 s on this machine (cpu)

The estimate is the timed cost per input times the count; data loading, certificate bookkeeping and work
reused from earlier runs are not in it. A timing that fails gives the count without an estimate: the
estimate never stops a run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from certkit.devices import resolve_device

__all__ = ["TIMING_BATCH", "TIMING_REPEATS", "TIMING_SECONDS", "announce", "format_duration",
           "seconds_per_input"]

#: inputs in the timed batch (at most): the timing stays short whatever the step's batch size
TIMING_BATCH = 256
#: timed calls after the warm-up (at most; they stop once ``TIMING_SECONDS`` have passed): the fastest counts,
#: so a machine shared with other work is not mistaken for a slow one
TIMING_REPEATS = 10
TIMING_SECONDS = 1.0


def format_duration(seconds: float) -> str:
    """A rough duration: ``~40 s``, ``~12 min``, ``~3.5 h``, ``~2.0 days``."""
    if seconds < 90:
        return f"~{max(seconds, 1.0):.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"~{seconds / 3600:.1f} h"
    return f"~{seconds / 86400:.1f} days"


def seconds_per_input(model: nn.Module, input_shape: Sequence[int], *, batch: int, device: Any = "cpu",
                      backward: bool = False) -> float | None:
    """Seconds per input of one forward pass (``backward``: forward and backward, a training step) of a batch
    of ``min(batch, TIMING_BATCH)`` random inputs through a copy of ``model`` on ``device``: the fastest of up
    to ``TIMING_REPEATS`` calls after one untimed warm-up call. ``model``, its buffers and the global RNG are
    untouched; None when the pass fails."""
    try:
        dev = resolve_device(device)
        b = max(1, min(int(batch), TIMING_BATCH))
        work = copy.deepcopy(model).to(dev).eval()
        shape = (b, *(int(s) for s in input_shape))
        x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(dev)

        def once() -> None:
            if backward:
                work.zero_grad(set_to_none=True)
                work(x).float().sum().backward()
            else:
                with torch.no_grad():
                    work(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        once()
        start, best = time.perf_counter(), float("inf")
        for _ in range(TIMING_REPEATS):
            t0 = time.perf_counter()
            once()
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() - start > TIMING_SECONDS:
                break
        return best / b
    except Exception:  # noqa: BLE001 - an estimate must never stop the run; the real step reports the error
        return None


def announce(log: Callable[[str], Any], what: str, count: int, unit: str, *, detail: str = "",
             seconds_per_unit: float | None = None, device: Any = None, workers: int = 1,
             note: str = "") -> float | None:
    """Log ``[budget] WHAT: will run DETAIL = COUNT UNIT; estimated ~T on this machine (DEVICE); NOTE`` and
    return the estimate in seconds (None without a timing). ``workers`` parallel workers divide the time."""
    line = f"[budget] {what}: will run {detail + ' = ' if detail else ''}{count:,} {unit}"
    estimate = None
    if seconds_per_unit is not None and count > 0:
        estimate = count * seconds_per_unit / max(1, int(workers))
        line += f"; estimated {format_duration(estimate)} on this machine"
        line += f" ({device}{f', {workers} workers' if workers > 1 else ''})" if device is not None else ""
    if note:
        line += f"; {note}"
    log(line)
    return estimate
