"""Working state of one BBP-MAP run: global atoms, their counts, assignments.

Private to :mod:`fedsim.matching.bbp`, whose :func:`~fedsim.matching.bbp.match_units`
validates the inputs and drives a :class:`_Matcher` (seed, sweeps of remove and
update); the formulas are in that module's docstring.

Speed: the existing-atom block of the score matrix is computed by matrix
products (never a loop over units). Entries whose precision pattern (prior and
every client) is the same share one ``tau`` per atom, so a large block of such
entries costs one GEMM ``X H^T`` scaled per atom; the remaining entries use the
general form ``(X*X) A^T + 2 X (H*A)^T`` with ``A = 1 / (tau + s)``. The
assignment is first solved with only a few new-atom slots, widened only when
all are taken (exact, see :meth:`_Matcher.update`). Atom storage grows by
doubling, deleted atoms are dropped with a keep-mask and a ``cumsum`` remap,
and every client's assignment lives in one flat index array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

from fedsim.exceptions import ConfigError

__all__ = ["COUNT_CAP", "MaxNew", "Popularity"]

Popularity = Literal["reference", "consistent"]
"""Popularity term of an existing atom (see :mod:`fedsim.matching.bbp`)."""

MaxNew = Callable[[int, int], int]
"""``max_new(n_local, n_global)``: new-atom slots offered to one client update."""

COUNT_CAP = 10
"""The reference code caps the popularity count of an atom at 10."""

_FACTOR_MIN = 32
"""Entries sharing one precision pattern are factored out when at least this many."""

_FIRST_SPARE_SLOTS = 16
"""New-atom slots tried first beyond the mandatory ones (doubled when all used)."""

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True)
class _Layout:
    """Entry order used internally: factored blocks first, then the rest."""

    order: I64  # internal entry e is original entry order[e]
    starts: I64  # first internal entry of each factored block
    stops: I64
    n_fact: int  # entries before the general ("rest") block

    @classmethod
    def of(cls, prior_precision: F64, precisions: Sequence[F64]) -> _Layout:
        pattern = np.vstack([prior_precision, *precisions])
        _, label, sizes = np.unique(
            pattern, axis=1, return_inverse=True, return_counts=True
        )
        label = label.reshape(-1)
        big = np.flatnonzero(sizes >= _FACTOR_MIN)
        blocks = [np.flatnonzero(label == b) for b in big]
        rest = np.flatnonzero(~np.isin(label, big))
        order = np.concatenate([*blocks, rest]).astype(np.int64)
        stops = np.cumsum([len(b) for b in blocks], dtype=np.int64)
        starts = stops - np.array([len(b) for b in blocks], dtype=np.int64)
        n_fact = int(stops[-1]) if len(stops) else 0
        return cls(order=order, starts=starts, stops=stops, n_fact=n_fact)

    def split(self, vector: F64) -> tuple[F64, F64]:
        """A length-D vector as (one value per factored block, the rest entries)."""
        inner = vector[self.order]
        return inner[self.starts], inner[self.n_fact :]


@dataclass(frozen=True)
class _Client:
    """One client's fixed quantities, in internal entry order."""

    x: F64  # (L_j, D) natural parameters s * v
    s_fact: F64  # (G,) precision of each factored block
    s_rest: F64  # (R,) precision of each other entry
    xx_fact: F64  # (L_j, G) per-block sums of x^2
    new_base: F64  # (L_j,) new-atom score without the gamma and -2 log k terms


class _Matcher:
    """Working state of one BBP-MAP run: atoms, counts and assignments."""

    def __init__(
        self,
        neurons: Sequence[F64],
        precisions: Sequence[F64],
        prior_mean: F64,
        prior_precision: F64,
        *,
        gamma: float,
        popularity: Popularity,
        max_new: MaxNew,
        max_atoms: int | None,
    ) -> None:
        self.gamma = gamma
        self.popularity = popularity
        self.max_new = max_new
        self.max_atoms = max_atoms
        self.n_clients = len(neurons)
        self.layout = lay = _Layout.of(prior_precision, precisions)
        self.prior_h = (prior_precision * prior_mean)[lay.order]
        self.p0_fact, self.p0_rest = lay.split(prior_precision)
        self.block_of_entry = np.repeat(
            np.arange(len(lay.starts)), lay.stops - lay.starts
        )
        p0 = prior_precision[lay.order]
        energy = float(np.sum(self.prior_h**2 / p0))
        self.clients = [
            self._client(v, s, p0, energy)
            for v, s in zip(neurons, precisions, strict=True)
        ]
        sizes = np.array([len(v) for v in neurons], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.flat = np.full(int(self.offsets[-1]), -1, dtype=np.int64)
        self.history: list[tuple[int, int]] = []
        cap = max(16, 2 * int(sizes.max()))
        self.h = np.empty((cap, len(prior_mean)))
        self.t_fact = np.empty((cap, len(lay.starts)))
        self.t_rest = np.empty((cap, len(prior_mean) - lay.n_fact))
        self.hh_fact = np.empty((cap, len(lay.starts)))
        self.counts = np.zeros(cap, dtype=np.int64)
        self.n = 0

    def _client(self, v: F64, s: F64, p0: F64, energy: float) -> _Client:
        lay = self.layout
        identity = bool(np.array_equal(lay.order, np.arange(len(lay.order))))
        s = s if identity else s[lay.order]
        x = v * s if identity else v[:, lay.order] * s
        if len(lay.starts):
            xx_fact = np.add.reduceat(x[:, : lay.n_fact] ** 2, lay.starts, axis=1)
        else:
            xx_fact = np.zeros((len(x), 0))
        new_base = ((self.prior_h + x) ** 2 / (p0 + s)).sum(1) - energy
        return _Client(x, s[lay.starts], s[lay.n_fact :], xx_fact, new_base)

    # ----------------------------------------------------------------- state
    def assignment(self, j: int) -> I64:
        return self.flat[self.offsets[j] : self.offsets[j + 1]]

    def _reserve(self, need: int) -> None:
        cap = len(self.counts)
        if need <= cap:
            return
        cap = max(2 * cap, need)
        n = self.n
        for name in ("h", "t_fact", "t_rest", "hh_fact"):
            old = getattr(self, name)
            new = np.empty((cap, old.shape[1]))
            new[:n] = old[:n]
            setattr(self, name, new)
        counts = np.zeros(cap, dtype=np.int64)
        counts[:n] = self.counts[:n]
        self.counts = counts

    def _refresh_energy(self, rows: I64 | slice) -> None:
        lay = self.layout
        if len(lay.starts):
            sq = self.h[rows, : lay.n_fact] ** 2
            self.hh_fact[rows] = np.add.reduceat(sq, lay.starts, axis=1)

    def seed(self, j: int) -> None:
        """Start the global set with client ``j``'s units, one atom each."""
        self._place(j, np.arange(len(self.clients[j].x), dtype=np.int64))

    def load(self, init: Sequence[I64]) -> None:
        """Build the atoms from given assignments, dropping unused atom indices."""
        width = 1 + max(int(a.max()) for a in init)
        self._reserve(width)
        self.n = width
        self.h[:width] = self.prior_h
        self.t_fact[:width] = self.p0_fact
        self.t_rest[:width] = self.p0_rest
        self.counts[:width] = 0
        for j, a in enumerate(init):
            c = self.clients[j]
            self.h[a] += c.x
            self.t_fact[a] += c.s_fact
            self.t_rest[a] += c.s_rest
            self.counts[a] += 1
            self.assignment(j)[:] = a
        self._refresh_energy(slice(0, width))
        self._compact()

    def remove(self, j: int) -> None:
        """Take client ``j`` out; atoms left with no member are deleted."""
        c, a = self.clients[j], self.assignment(j)
        self.counts[a] -= 1
        alive = self.counts[a] > 0
        rows = a[alive]
        self.h[rows] -= c.x[alive]
        self.t_fact[rows] -= c.s_fact
        self.t_rest[rows] -= c.s_rest
        self._refresh_energy(rows)
        if not alive.all():
            self._compact()

    def _compact(self) -> None:
        n = self.n
        keep = self.counts[:n] > 0
        remap = np.cumsum(keep) - 1
        for name in ("h", "t_fact", "t_rest", "hh_fact", "counts"):
            arr = getattr(self, name)
            kept = arr[:n][keep]
            arr[: len(kept)] = kept
        self.n = int(keep.sum())
        self.counts[self.n : n] = 0
        valid = self.flat >= 0
        self.flat[valid] = remap[self.flat[valid]]

    def _place(self, j: int, cols: I64) -> None:
        """Add client ``j``'s units to the chosen columns (``>= n``: new atoms)."""
        c, n = self.clients[j], self.n
        fresh = cols >= n
        n_new = int(fresh.sum())
        a = cols.copy()
        a[fresh] = n + np.arange(n_new)
        self._reserve(n + n_new)
        old = a[~fresh]
        self.h[old] += c.x[~fresh]
        self.t_fact[old] += c.s_fact
        self.t_rest[old] += c.s_rest
        self.counts[old] += 1
        new = slice(n, n + n_new)
        self.h[new] = self.prior_h + c.x[fresh]
        self.t_fact[new] = self.p0_fact + c.s_fact
        self.t_rest[new] = self.p0_rest + c.s_rest
        self.counts[new] = 1
        self.n = n + n_new
        self._refresh_energy(a)
        self.assignment(j)[:] = a

    # ---------------------------------------------------------------- scores
    def n_new_slots(self, n_local: int) -> int:
        n = self.n
        offered = int(self.max_new(n_local, n))
        if offered < 0:
            raise ConfigError(
                f"max_new({n_local}, {n}) returned {offered}; it must be >= 0."
            )
        if self.max_atoms is not None:
            offered = min(offered, self.max_atoms - n)
        # every unit must find a column, whatever the caps say
        return max(offered, n_local - n, 0)

    def existing_scores(self, j: int) -> F64:
        """Scores ``(L_j, L)`` of client ``j``'s units against the current atoms."""
        c, n, lay = self.clients[j], self.n, self.layout
        t_fact = self.t_fact[:n]
        a_fact = 1.0 / (t_fact + c.s_fact)
        exist = c.xx_fact @ a_fact.T
        for g, (lo, hi) in enumerate(zip(lay.starts, lay.stops, strict=True)):
            cross = c.x[:, lo:hi] @ self.h[:n, lo:hi].T
            cross *= 2.0 * a_fact[:, g]
            exist += cross
        # sum h^2 (1/(tau+s) - 1/tau) = -sum h^2 s / (tau (tau+s)): no cancellation
        const = -(self.hh_fact[:n] * (c.s_fact * a_fact / t_fact)).sum(1)
        if lay.n_fact < c.x.shape[1]:
            t_rest = self.t_rest[:n]
            h_rest = self.h[:n, lay.n_fact :]
            x_rest = c.x[:, lay.n_fact :]
            a_rest = 1.0 / (t_rest + c.s_rest)
            exist += (x_rest * x_rest) @ a_rest.T
            exist += 2.0 * (x_rest @ (h_rest * a_rest).T)
            const -= (h_rest * h_rest * (c.s_rest * a_rest / t_rest)).sum(1)
        exist += const + self._popularity(self.counts[:n])
        return exist

    def with_slots(self, j: int, exist: F64, n_new: int) -> F64:
        """``exist`` followed by ``n_new`` new-atom columns ``k = 1..n_new``."""
        k = np.arange(1, n_new + 1, dtype=np.float64)
        bonus = 2.0 * math.log(self.gamma / self.n_clients) - 2.0 * np.log(k)
        return np.hstack([exist, self.clients[j].new_base[:, None] + bonus])

    def _popularity(self, counts: I64) -> F64:
        j = self.n_clients
        if self.popularity == "reference":
            c = np.minimum(counts, COUNT_CAP).astype(np.float64)
            return np.log(c / (j - c))
        m = counts.astype(np.float64)
        return 2.0 * np.log(m / (j - m))

    def update(self, j: int) -> None:
        """Assign client ``j`` (already removed) by one linear assignment.

        The new-slot rewards ``-2 log k`` fall with ``k``, so the best total as
        a function of the number of new atoms is concave: a solution over the
        first ``k`` slots that leaves one of them unused is optimal over all
        ``n_slots``. Start with a few slots past the mandatory ones and double
        until one is left unused (or all are offered).
        """
        n, n_local = self.n, len(self.clients[j].x)
        n_slots = self.n_new_slots(n_local)
        exist = self.existing_scores(j)
        spare = _FIRST_SPARE_SLOTS
        while True:
            k = min(n_slots, max(n_local - n, 0) + spare)
            _, cols = linear_sum_assignment(self.with_slots(j, exist, k), maximize=True)
            opened = int((cols >= n).sum())
            if opened < k or k == n_slots:
                break
            spare *= 2
        self._place(j, cols.astype(np.int64))
        self.history.append((n, opened))

    def result(self) -> tuple[F64, F64, I64, list[I64], I64]:
        """Atoms, precisions, counts, assignments and history, in the fields'
        order of :class:`fedsim.matching.bbp.MatchResult`."""
        n, lay = self.n, self.layout
        tau_inner = np.concatenate(
            [self.t_fact[:n][:, self.block_of_entry], self.t_rest[:n]], axis=1
        )
        atoms = np.empty_like(tau_inner)
        tau = np.empty_like(tau_inner)
        atoms[:, lay.order] = self.h[:n] / tau_inner
        tau[:, lay.order] = tau_inner
        return (
            atoms,
            tau,
            self.counts[:n].copy(),
            [self.assignment(j).copy() for j in range(self.n_clients)],
            np.array(self.history, dtype=np.int64).reshape(-1, 2),
        )
