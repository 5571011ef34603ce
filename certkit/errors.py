"""Exception types raised by certkit.

Every error names the offending input; the CLI turns :class:`CertkitError` subclasses into a one-line
message and exit code 2.
"""

from __future__ import annotations


class CertkitError(Exception):
    """Base class of certkit's own errors (bad input, corrupt records)."""


class InputError(CertkitError, ValueError):
    """An argument has the wrong value, shape, dtype or contains NaN/inf."""


class UnknownNameError(CertkitError, KeyError):
    """An unknown dataset, model, attack or purifier name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RecordError(CertkitError):
    """A run directory, manifest or checkpoint is missing, corrupt, or fails its hash check."""
