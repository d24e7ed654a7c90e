"""Argument checks shared by the partitioners of :mod:`fedsim.data.partition`.

Each raises :class:`~fedsim.exceptions.ConfigError` (a bad setting) or
:class:`~fedsim.exceptions.DataError` (labels that cannot be split as asked)
with one sentence naming the value and the allowed range.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from fedsim.exceptions import ConfigError, DataError

__all__ = ["as_int", "check_alpha", "check_common", "check_labels", "check_min_size"]


def as_int(value: Any, what: str) -> int:
    """``value`` as an int, refusing floats, bools and strings."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None


def check_labels(labels: Any, *, integer: bool = True) -> np.ndarray:
    """A non-empty 1-D label array (int64 when ``integer``)."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0:
        raise DataError(
            f"labels must be a non-empty 1-D array, got shape {array.shape}"
        )
    if integer and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"labels must be integers, got dtype {array.dtype}")
    return array.astype(np.int64) if integer else array


def check_common(
    labels: Any, num_clients: Any, seed: Any, *, integer: bool = True
) -> tuple[np.ndarray, int, int]:
    """Validated (labels, num_clients, seed) shared by every partitioner."""
    array = check_labels(labels, integer=integer)
    clients = as_int(num_clients, "num_clients")
    if not 1 <= clients <= len(array):
        raise ConfigError(
            f"num_clients must lie in 1..{len(array)} (the number of examples), "
            f"got {clients}"
        )
    seed_int = as_int(seed, "seed")
    if seed_int < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed_int}")
    return array, clients, seed_int


def check_alpha(alpha: Any) -> float:
    """A Dirichlet concentration: a positive, finite float."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}") from None
    if not value > 0 or not np.isfinite(value):
        raise ConfigError(f"alpha must be a positive finite number, got {alpha!r}")
    return value


def check_min_size(min_size: Any, what: str, n: int, clients: int) -> int:
    """A per-client minimum that ``n`` examples over ``clients`` can meet."""
    value = as_int(min_size, what)
    if value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {value}")
    if value * clients > n:
        raise DataError(
            f"{what}={value} is impossible for {n} examples over {clients} clients; "
            f"it must lie in 0..{n // clients}"
        )
    return value
