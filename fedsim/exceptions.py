"""Typed errors raised by fedsim.

Every user-facing check raises one of these with a single sentence that names
the bad value and the allowed choices; the CLI prints that sentence and exits
with status 2 instead of showing a traceback.
"""

from __future__ import annotations

__all__ = ["AggregationError", "ConfigError", "DataError", "FedsimError"]


class FedsimError(Exception):
    """Base class of every error fedsim raises on purpose."""


class ConfigError(FedsimError, ValueError):
    """A configuration value is unknown, out of range or inconsistent."""


class DataError(FedsimError, ValueError):
    """A dataset cannot be read, or cannot be split as asked."""


class AggregationError(FedsimError, ValueError):
    """Client updates cannot be combined (shapes, widths, non-finite values)."""
