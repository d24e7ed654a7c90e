"""Choosing PFNM's hyperparameters on held-out client data.

PFNM has three knobs: ``sigma2`` (how far a client's unit may lie from its
global atom), ``sigma0_2`` (how far atoms spread around the prior mean) and
``gamma`` (how readily new global units open). The reference code can pick
them by grid search, but it scores each setting on the pooled training set of
all clients, which a federation does not have. fedsim scores a setting by
*federated evaluation*: the global model matched with it is sent to the
clients, each evaluates it on the share of its own data it held out from local
training (``evaluation.local_test_fraction`` under ``evaluation=federated``),
and the example-weighted mean of their metric is the setting's score. The
server's test set is never used. A setting whose global model is wider than
``max_width_factor`` times the widest client in some layer is not evaluated.

This module holds the pure parts (the candidate grid, the width rule, the
choice); the ``pfnm`` strategy (``strategies/pfnm.py``) does the matching and
the federated evaluation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedsim.exceptions import ConfigError

__all__ = [
    "GRID_KEYS",
    "Candidate",
    "Hyper",
    "best_candidate",
    "candidates",
    "width_ratio",
]

GRID_KEYS = ("sigma2", "sigma0_2", "gamma")
"""The hyperparameters a selection grid may list values for."""


@dataclass(frozen=True)
class Hyper:
    """One setting of PFNM's hyperparameters (see :func:`fedsim.matching.pfnm_mlp`).

    Attributes
    ----------
    sigma2 : float
        Variance of a client's unit around its atom.
    sigma0_2 : float
        Prior variance of an atom.
    gamma : float
        Beta-Bernoulli mass (larger opens new global units more readily).
    """

    sigma2: float = 1.0
    sigma0_2: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        for name in GRID_KEYS:
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(f"{name}={value!r} must be a finite number > 0.")

    def label(self) -> str:
        """``sigma2=1 sigma0_2=1 gamma=1`` (shortest float form)."""
        return " ".join(f"{k}={getattr(self, k):g}" for k in GRID_KEYS)


@dataclass(frozen=True)
class Candidate:
    """A setting tried during selection and what it gave.

    Attributes
    ----------
    hyper : Hyper
        The setting.
    widths : dict of str to int
        Global width of every matched group.
    ratio : float
        Largest ``global width / widest client`` over the groups.
    score : float or None
        Example-weighted held-out metric; ``None`` when the setting broke the
        width rule and was not evaluated.
    """

    hyper: Hyper
    widths: dict[str, int]
    ratio: float
    score: float | None


def candidates(base: Hyper, grid: Mapping[str, Sequence[float]]) -> list[Hyper]:
    """``base`` followed by every combination of the grid's values (no repeats).

    A key missing from ``grid`` keeps ``base``'s value.

    Raises
    ------
    ConfigError
        For a key other than ``sigma2``, ``sigma0_2``, ``gamma``, an empty list,
        or a value that is not a finite number > 0.
    """
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(
            f"select_grid has key {unknown[0]!r}; allowed keys: {', '.join(GRID_KEYS)}."
        )
    axes = []
    for key in GRID_KEYS:
        values = list(grid.get(key, [getattr(base, key)]))
        if not values:
            raise ConfigError(f"select_grid.{key} is empty; give at least one value.")
        axes.append(values)
    out = [base]
    for combo in itertools.product(*axes):
        hyper = Hyper(*(float(v) for v in combo))
        if hyper not in out:
            out.append(hyper)
    return out


def width_ratio(
    global_widths: Mapping[str, int], local_widths: Mapping[str, int]
) -> float:
    """Largest ``global_widths[g] / local_widths[g]`` over the groups (1.0 if none)."""
    ratios = [global_widths[g] / max(1, local_widths[g]) for g in global_widths]
    return max(ratios, default=1.0)


def best_candidate(
    tried: Sequence[Candidate], *, higher_is_better: bool = True
) -> Candidate:
    """The evaluated candidate with the best score (the earliest among ties).

    When no candidate was evaluated (every one broke the width rule) the one
    with the smallest width ratio is returned.

    Raises
    ------
    ValueError
        If ``tried`` is empty.
    """
    if not tried:
        raise ValueError("best_candidate needs at least one candidate, got none.")
    scored = [(c, c.score) for c in tried if c.score is not None]
    if not scored:
        return min(tried, key=lambda c: c.ratio)
    sign = 1.0 if higher_is_better else -1.0
    return max(scored, key=lambda pair: sign * pair[1])[0]
