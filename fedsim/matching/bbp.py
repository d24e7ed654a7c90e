"""BBP-MAP matching of client units to global atoms: the layer matcher of PFNM.

Probabilistic Federated Neural Matching (Yurochkin et al., 2019,
arxiv.org/abs/1905.12022) treats every hidden unit of every client as a noisy
copy of one of a growing set of global *atoms* under a Beta-Bernoulli process
prior. :func:`match_units` finds the MAP assignment by coordinate ascent: one
client at a time is taken out of the global set and put back by a linear
assignment over the existing atoms plus a few new-atom slots.

Each client ``j`` brings its units as an ``(L_j, D)`` array ``v`` and one
precision vector ``s_j`` of length ``D`` (zero = the client does not observe
that entry). In natural parameters, with ``x = s_j * v`` and prior
``N(mu0, 1 / p0)`` per entry, atom ``i`` holds ``h_i = p0 * mu0 + sum x`` and
``tau_i = p0 + sum s`` over its ``m_i`` members; its estimate is the posterior
mean ``h_i / tau_i``. The score of unit ``l`` is::

    existing atom i:  sum_d (h_i + x_l)^2 / (tau_i + s) - sum_d h_i^2 / tau_i
                      + popularity(m_i)
    new slot k:       sum_d (p0 mu0 + x_l)^2 / (p0 + s) - sum_d p0 mu0^2
                      + 2 log(gamma / J) - 2 log k

where ``popularity`` is ``log(c / (J - c))`` with ``c = min(m_i, 10)`` in the
reference code (``"reference"``) and ``2 log(m_i / (J - m_i))`` in the clean
derivation (``"consistent"``).

The working state of a run (atom storage, the vectorised scores, the
assignment step) lives in :mod:`fedsim.matching._atoms`; this module validates
inputs and drives it. BLAS runs single-threaded while matching: the products
are small (``L_j x D x L``) and a multi-threaded BLAS on a busy machine (Ray
workers beside the server) made them 10-50 times slower in measurements.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from threadpoolctl import ThreadpoolController

from fedsim.exceptions import AggregationError, ConfigError
from fedsim.matching._atoms import COUNT_CAP, MaxNew, Popularity, _Matcher

__all__ = [
    "COUNT_CAP",
    "SOFT_WIDTH",
    "MatchResult",
    "Popularity",
    "check_match_options",
    "match_units",
    "reference_max_new",
    "rematch_scores",
]

SOFT_WIDTH = 700
"""Past this global width the reference offers one new-atom slot per update."""

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@functools.cache
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded in this process (found once, on first use)."""
    return ThreadpoolController()


def reference_max_new(n_local: int, n_global: int) -> int:
    """New-atom slots of the reference code: ``min(L_j, max(700 - L, 1))``.

    Parameters
    ----------
    n_local : int
        Units of the client being matched (``L_j``).
    n_global : int
        Current global width with that client removed (``L``).
    """
    return min(n_local, max(SOFT_WIDTH - n_global, 1))


@dataclass(frozen=True)
class MatchResult:
    """The global atoms and every client's assignment to them.

    Attributes
    ----------
    atoms : ndarray, shape (L, D)
        Posterior means ``h / tau``.
    precisions : ndarray, shape (L, D)
        Posterior precisions ``tau``.
    counts : ndarray, shape (L,)
        Number of client units assigned to each atom (all positive).
    assignments : list of ndarray
        ``assignments[j][l]`` is the atom of client ``j``'s unit ``l``
        (injective per client).
    history : ndarray, shape (updates, 2)
        For every client update after the seed, in order: the global width it
        was matched against (after removing the client) and how many new atoms
        it opened.
    """

    atoms: F64
    precisions: F64
    counts: I64
    assignments: list[I64]
    history: I64

    @property
    def width(self) -> int:
        """Number of global atoms ``L``."""
        return int(self.atoms.shape[0])


def match_units(
    neurons: Sequence[ArrayLike],
    precisions: Sequence[ArrayLike],
    prior_mean: ArrayLike,
    prior_precision: ArrayLike,
    *,
    gamma: float,
    iters: int,
    rng: np.random.Generator,
    popularity: Popularity = "reference",
    max_new: MaxNew = reference_max_new,
    max_atoms: int | None = None,
    init: Sequence[ArrayLike] | None = None,
) -> MatchResult:
    """Match every client's units to a common, growing set of global atoms.

    Without ``init`` the largest client (the lowest index among ties) seeds one
    atom per unit, the others are matched one after another in order of
    decreasing size, then ``iters`` sweeps each remove and re-match every
    client in the order of a fresh ``rng.permutation(J)``. With ``init`` the
    atoms are built from those assignments and only the sweeps run.

    Parameters
    ----------
    neurons : sequence of array_like, each (L_j, D)
        Client ``j``'s units, one per row.
    precisions : sequence of array_like, each (D,)
        Client ``j``'s observation precision per entry (``0`` = not observed).
    prior_mean, prior_precision : array_like, (D,)
        Prior of every atom; the precision must be positive.
    gamma : float
        Beta-Bernoulli mass: larger opens new atoms more readily.
    iters : int
        Sweeps over all clients after the initial pass.
    rng : numpy.random.Generator
        Draws the client order of every sweep.
    popularity : {"reference", "consistent"}
        ``log(min(m, 10) / (J - min(m, 10)))`` as the reference code, or
        ``2 log(m / (J - m))`` as the clean derivation.
    max_new : callable
        ``max_new(L_j, L)``: new-atom slots offered to one update (default
        :func:`reference_max_new`). At least ``L_j - L`` slots are always
        offered so that every unit has a column.
    max_atoms : int or None
        Hard cap on the global width; once reached, no new-atom slots are
        offered. Must be at least the largest client.
    init : sequence of array_like or None
        Previous assignments (client ``j``'s unit ``l`` -> atom), injective
        per client; atoms no unit is assigned to are dropped.

    Returns
    -------
    MatchResult
        The atoms, their precisions and counts, and every client's assignment.

    Raises
    ------
    fedsim.exceptions.AggregationError
        For inputs of inconsistent shape, non-finite values, negative
        precisions or an invalid ``init``.
    fedsim.exceptions.ConfigError
        For a bad ``gamma``, ``iters``, ``popularity`` or ``max_atoms``.
    """
    matcher, v = _checked_matcher(
        neurons,
        precisions,
        prior_mean,
        prior_precision,
        gamma=gamma,
        iters=iters,
        popularity=popularity,
        max_new=max_new,
        max_atoms=max_atoms,
    )
    start = None if init is None else _checked_init(init, v)
    if start is not None and max_atoms is not None:
        used = len(np.unique(np.concatenate(start)))
        if used > max_atoms:
            raise ConfigError(
                f"init uses {used} atoms, more than max_atoms={max_atoms}."
            )
    n_clients = len(v)
    with _blas().limit(limits=1, user_api="blas"):
        if start is None:
            order = sorted(range(n_clients), key=lambda j: -len(v[j]))
            matcher.seed(order[0])
            for j in order[1:]:
                matcher.update(j)
        else:
            matcher.load(start)
        for _ in range(iters):
            for j in rng.permutation(n_clients):
                matcher.remove(int(j))
                matcher.update(int(j))
    return MatchResult(*matcher.result())


def rematch_scores(
    result: MatchResult,
    neurons: Sequence[ArrayLike],
    precisions: Sequence[ArrayLike],
    prior_mean: ArrayLike,
    prior_precision: ArrayLike,
    client: int,
    *,
    gamma: float,
    popularity: Popularity = "reference",
    max_new: MaxNew = reference_max_new,
    max_atoms: int | None = None,
) -> F64:
    """The score matrix client ``client`` faces when re-matched against ``result``.

    The atoms are rebuilt from ``result.assignments``, the client is removed
    (atoms left empty are deleted), and the matrix of its next update is
    returned: columns ``0..L-1`` are the remaining atoms in order, the last
    ones the new-atom slots ``k = 1, 2, ...``. Useful to inspect how confident
    a matching is.

    Parameters
    ----------
    result : MatchResult
        A matching of these same clients.
    neurons, precisions, prior_mean, prior_precision, gamma, popularity, max_new, \
max_atoms
        As for :func:`match_units`.
    client : int
        Which client to remove and score.

    Returns
    -------
    ndarray, shape (L_j, L + K_new)
    """
    matcher, v = _checked_matcher(
        neurons,
        precisions,
        prior_mean,
        prior_precision,
        gamma=gamma,
        iters=0,
        popularity=popularity,
        max_new=max_new,
        max_atoms=max_atoms,
    )
    if not 0 <= client < len(v):
        raise ConfigError(f"client={client} is not in 0..{len(v) - 1}.")
    with _blas().limit(limits=1, user_api="blas"):
        matcher.load(_checked_init(result.assignments, v))
        matcher.remove(client)
        n_new = matcher.n_new_slots(len(v[client]))
        return matcher.with_slots(client, matcher.existing_scores(client), n_new)


# ----------------------------------------------------------------- validation
def _checked_matcher(
    neurons: Sequence[ArrayLike],
    precisions: Sequence[ArrayLike],
    prior_mean: ArrayLike,
    prior_precision: ArrayLike,
    *,
    gamma: float,
    iters: int,
    popularity: Popularity,
    max_new: MaxNew,
    max_atoms: int | None,
) -> tuple[_Matcher, list[F64]]:
    """Validate the inputs and options of one run; its matcher and the units."""
    v, s, mu0, p0 = _checked_inputs(neurons, precisions, prior_mean, prior_precision)
    check_match_options(gamma, iters, popularity)
    _check_max_atoms(max_atoms, v)
    matcher = _Matcher(
        v,
        s,
        mu0,
        p0,
        gamma=float(gamma),
        popularity=popularity,
        max_new=max_new,
        max_atoms=None if max_atoms is None else int(max_atoms),
    )
    return matcher, v


def _checked_inputs(
    neurons: Sequence[ArrayLike],
    precisions: Sequence[ArrayLike],
    prior_mean: ArrayLike,
    prior_precision: ArrayLike,
) -> tuple[list[F64], list[F64], F64, F64]:
    if len(neurons) == 0:
        raise AggregationError("neurons is empty; matching needs at least 1 client.")
    if len(precisions) != len(neurons):
        raise AggregationError(
            f"got {len(precisions)} precision vectors for {len(neurons)} clients; "
            "give one per client."
        )
    mu0 = np.asarray(prior_mean, dtype=np.float64)
    p0 = np.asarray(prior_precision, dtype=np.float64)
    if mu0.ndim != 1 or p0.shape != mu0.shape:
        raise AggregationError(
            f"prior_mean {mu0.shape} and prior_precision {p0.shape} must be vectors "
            "of the same length D."
        )
    dim = len(mu0)
    if not (np.isfinite(mu0).all() and np.isfinite(p0).all() and (p0 > 0).all()):
        raise AggregationError(
            "prior_mean must be finite and prior_precision finite and positive."
        )
    v = [np.asarray(x, dtype=np.float64) for x in neurons]
    s = [np.asarray(x, dtype=np.float64) for x in precisions]
    for j, (vj, sj) in enumerate(zip(v, s, strict=True)):
        if vj.ndim != 2 or vj.shape[1] != dim or len(vj) == 0:
            raise AggregationError(
                f"client {j}'s units have shape {vj.shape}; expected (L_j >= 1, {dim})."
            )
        if sj.shape != (dim,):
            raise AggregationError(
                f"client {j}'s precisions have shape {sj.shape}; expected ({dim},)."
            )
        if not np.isfinite(vj).all():
            raise AggregationError(f"client {j}'s units contain NaN or Inf.")
        if not (np.isfinite(sj).all() and (sj >= 0).all()):
            raise AggregationError(f"client {j}'s precisions must be finite and >= 0.")
    return v, s, mu0, p0


def check_match_options(gamma: float, iters: int, popularity: str) -> None:
    """Raise :class:`ConfigError` for a bad ``gamma``, ``iters`` or ``popularity``.

    The checks :func:`match_units` makes, for callers that validate before
    they prepare its inputs.
    """
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma > 0):
        raise ConfigError(f"gamma={gamma!r} must be a finite number > 0.")
    if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
        raise ConfigError(f"iters={iters!r} must be an integer >= 0.")
    if popularity not in ("reference", "consistent"):
        raise ConfigError(
            f"popularity={popularity!r} is not one of 'reference', 'consistent'."
        )


def _check_max_atoms(max_atoms: int | None, v: Sequence[F64]) -> None:
    largest = max(len(x) for x in v)
    if max_atoms is not None and (
        isinstance(max_atoms, bool)
        or not isinstance(max_atoms, int | np.integer)
        or max_atoms < largest
    ):
        raise ConfigError(
            f"max_atoms={max_atoms!r} must be an integer >= {largest}, the width of "
            "the largest client."
        )


def _checked_init(init: Sequence[ArrayLike], v: Sequence[F64]) -> list[I64]:
    if len(init) != len(v):
        raise AggregationError(
            f"init has {len(init)} assignments for {len(v)} clients; give one each."
        )
    out = []
    for j, (a, vj) in enumerate(zip(init, v, strict=True)):
        arr = np.asarray(a)
        if (
            arr.shape != (len(vj),)
            or not np.issubdtype(arr.dtype, np.integer)
            or (arr < 0).any()
            or len(np.unique(arr)) != len(arr)
        ):
            raise AggregationError(
                f"init[{j}] must hold {len(vj)} distinct non-negative atom indices, "
                f"one per unit of client {j}."
            )
        out.append(arr.astype(np.int64))
    return out
