"""The certkit version, read once from the installed package metadata (``pyproject.toml`` is its source).

>>> certkit_version() == __version__
True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__", "certkit_version"]


def certkit_version() -> str:
    """The installed certkit version (package metadata), or ``"0+unknown"`` when running uninstalled."""
    try:
        return version("certkit")
    except PackageNotFoundError:  # a source tree on sys.path without `pip install`
        return "0+unknown"


__version__ = certkit_version()
