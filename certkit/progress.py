"""Progress bars and log lines that never break them.

:func:`bar` is the one tqdm bar of certkit's long loops (training and purification advance it per batch, so
``total`` is epochs x batches); :func:`console_log` is the command line's ``log`` callable: each line goes
through :func:`tqdm.tqdm.write`, which clears an open bar, prints the line and redraws the bar below it;
``quiet`` drops every line (``--quiet``: only the final result and errors are printed).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tqdm.auto import tqdm

__all__ = ["bar", "batches", "console_log"]


def batches(n: int, batch_size: int) -> int:
    """Mini-batches of ``batch_size`` in one pass over ``n`` samples (the last one may be smaller)."""
    return math.ceil(n / batch_size) if n > 0 and batch_size > 0 else 0


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "batch", leave: bool = False) -> tqdm:
    """A tqdm bar of ``total`` units (hidden when ``enabled`` is False); call ``update(1)`` per unit and
    ``set_postfix`` once per epoch."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, dynamic_ncols=True)


def _write(message: str) -> None:
    tqdm.write(str(message))


def _silent(message: str) -> None:
    return None


def console_log(quiet: bool = False) -> Callable[[str], None]:
    """The ``log`` callable of the command line: lines printed above any open progress bar (``tqdm.write``),
    or none at all when ``quiet``."""
    return _silent if quiet else _write
