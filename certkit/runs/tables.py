"""Plain-text table cells shared by the run reports: one column per point of a certified-accuracy curve and
numbers that may be missing.

>>> curve_header([1, 3], prefix="@") + "|" + curve_cells({"1": 0.5}, [1, 3]) + "|" + number_or(None, 5)
'     @1     @3|  0.500       |  n/a'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["curve_cells", "curve_header", "number_or"]


def curve_header(points: Sequence[Any], *, prefix: str = "@", width: int = 7) -> str:
    """One right-aligned heading ``<prefix><point>`` per curve point."""
    return "".join(f"{prefix + str(p):>{width}}" for p in points)


def curve_cells(values: Mapping[str, float], points: Sequence[Any], *, width: int = 7) -> str:
    """The curve's value at each point (``values`` keyed by ``str(point)``, 3 decimals), blank where absent."""
    return "".join(f"{values[str(p)]:>{width}.3f}" if str(p) in values else " " * width for p in points)


def number_or(value: float | None, width: int, *, na: str = "n/a") -> str:
    """``value`` with 3 decimals, or ``na`` when it is None or NaN, right-aligned in ``width``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{na:>{width}}"
    return f"{value:>{width}.3f}"
