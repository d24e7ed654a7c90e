"""Plain-loop oracle of PFNM matching, used to check fedsim's fast matcher.

No test in here. Written straight from the formulas of
``/work/shared/specs/pfnm-fedma.md`` sections 1-2 with the reference code's
structure: a Python loop over the client's units to score them, ``np.vstack``
per new atom, atom deletion with nested renumbering loops, list-based counts,
weights in the reference's ``(in, out)`` layout. It shares no code with
``fedsim.matching``. The benchmark ``benchmarks/pfnm_speed.py`` imports it too
(with the repository root on ``sys.path``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

MaxNew = Callable[[int, int], int]


def reference_rule(n_local: int, n_global: int) -> int:
    """``min(L_j, max(700 - L, 1))`` new-atom slots."""
    return min(n_local, max(700 - n_global, 1))


def popularity_term(m: float, n_clients: int, popularity: str) -> float:
    """Popularity of an atom with ``m`` members (the client itself excluded)."""
    if popularity == "reference":
        c = min(m, 10)
        return math.log(c / (n_clients - c))
    return 2.0 * math.log(m / (n_clients - m))


def entry_score(
    x_l: np.ndarray,
    s: np.ndarray,
    h_i: np.ndarray,
    tau_i: np.ndarray,
    m_i: int,
    n_clients: int,
    popularity: str,
) -> float:
    """Score of one unit (natural parameters ``x_l``) against one existing atom."""
    total = 0.0
    for d in range(len(x_l)):
        total += (h_i[d] + x_l[d]) ** 2 / (tau_i[d] + s[d]) - h_i[d] ** 2 / tau_i[d]
    return total + popularity_term(m_i, n_clients, popularity)


def new_slot_score(
    x_l: np.ndarray,
    s: np.ndarray,
    prior_h: np.ndarray,
    p0: np.ndarray,
    k: int,
    gamma: float,
    n_clients: int,
) -> float:
    """Score of one unit opening the ``k``-th new atom (``k`` from 1)."""
    total = 0.0
    for d in range(len(x_l)):
        total += (prior_h[d] + x_l[d]) ** 2 / (p0[d] + s[d]) - prior_h[d] ** 2 / p0[d]
    return total + 2.0 * math.log(gamma / n_clients) - 2.0 * math.log(k)


def loop_scores(
    x: np.ndarray,
    s: np.ndarray,
    h: np.ndarray,
    tau: np.ndarray,
    counts: Sequence[int],
    prior_h: np.ndarray,
    p0: np.ndarray,
    *,
    n_clients: int,
    gamma: float,
    n_new: int,
    popularity: str,
) -> np.ndarray:
    """Score matrix by a loop over the client's units (the reference's structure)."""
    n_local, n_atoms = len(x), len(h)
    out = np.zeros((n_local, n_atoms + n_new))
    pop = np.array([popularity_term(m, n_clients, popularity) for m in counts])
    new_energy = (prior_h**2 / p0).sum()
    for u in range(n_local):
        if n_atoms:
            out[u, :n_atoms] = ((h + x[u]) ** 2 / (tau + s)).sum(1) - (h**2 / tau).sum(
                1
            )
            out[u, :n_atoms] += pop
        base = ((prior_h + x[u]) ** 2 / (p0 + s)).sum() - new_energy
        for k in range(1, n_new + 1):
            out[u, n_atoms + k - 1] = (
                base + 2.0 * math.log(gamma / n_clients) - 2.0 * math.log(k)
            )
    return out


def slots(n_local: int, n_global: int, max_new: MaxNew, max_atoms: int | None) -> int:
    """New-atom columns offered: the rule, the hard cap, and at least ``L_j - L``."""
    k = max_new(n_local, n_global)
    if max_atoms is not None:
        k = min(k, max_atoms - n_global)
    return max(k, n_local - n_global, 0)


class OracleState:
    """Global atoms as Python lists and 2-D arrays grown one row at a time."""

    def __init__(self, prior_h: np.ndarray, p0: np.ndarray, dim: int) -> None:
        self.prior_h = prior_h
        self.p0 = p0
        self.h = np.zeros((0, dim))
        self.tau = np.zeros((0, dim))
        self.counts: list[int] = []
        self.history: list[tuple[int, int]] = []

    def add_client(
        self,
        x: np.ndarray,
        s: np.ndarray,
        *,
        n_clients: int,
        gamma: float,
        popularity: str,
        max_new: MaxNew,
        max_atoms: int | None,
    ) -> list[int]:
        n_atoms = len(self.h)
        n_new = slots(len(x), n_atoms, max_new, max_atoms)
        score = loop_scores(
            x,
            s,
            self.h,
            self.tau,
            self.counts,
            self.prior_h,
            self.p0,
            n_clients=n_clients,
            gamma=gamma,
            n_new=n_new,
            popularity=popularity,
        )
        rows, cols = linear_sum_assignment(-score)
        assignment = []
        next_atom = n_atoms
        for u, i in zip(rows, cols, strict=True):
            if i < n_atoms:
                self.counts[i] += 1
                self.h[i] += x[u]
                self.tau[i] += s
                assignment.append(int(i))
            else:
                self.counts.append(1)
                self.h = np.vstack([self.h, self.prior_h + x[u]])
                self.tau = np.vstack([self.tau, self.p0 + s])
                assignment.append(next_atom)
                next_atom += 1
        self.history.append((n_atoms, next_atom - n_atoms))
        return assignment

    def remove_client(
        self, j: int, x: np.ndarray, s: np.ndarray, assignment: list[list[int]]
    ) -> None:
        doomed = []
        pairs = sorted(enumerate(assignment[j]), key=lambda p: -p[1])
        for u, i in pairs:
            self.counts[i] -= 1
            if self.counts[i] == 0:
                del self.counts[i]
                doomed.append(i)
                for other in range(len(assignment)):
                    if other == j:
                        continue
                    for idx in range(len(assignment[other])):
                        if assignment[other][idx] > i:
                            assignment[other][idx] -= 1
            else:
                self.h[i] -= x[u]
                self.tau[i] -= s
        self.h = np.delete(self.h, doomed, axis=0)
        self.tau = np.delete(self.tau, doomed, axis=0)


def oracle_match(
    neurons: Sequence[np.ndarray],
    precisions: Sequence[np.ndarray],
    prior_mean: np.ndarray,
    prior_precision: np.ndarray,
    *,
    gamma: float,
    iters: int,
    rng: np.random.Generator,
    popularity: str = "reference",
    max_new: MaxNew = reference_rule,
    max_atoms: int | None = None,
    init: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[int], list[list[int]], list[tuple[int, int]]]:
    """BBP-MAP by loops: (atoms, precisions, counts, assignments, history)."""
    n_clients = len(neurons)
    x = [v * s for v, s in zip(neurons, precisions, strict=True)]
    prior_h = prior_precision * prior_mean
    state = OracleState(prior_h, prior_precision, len(prior_mean))
    opts = {
        "n_clients": n_clients,
        "gamma": gamma,
        "popularity": popularity,
        "max_new": max_new,
        "max_atoms": max_atoms,
    }
    assignment: list[list[int]] = [[] for _ in range(n_clients)]
    if init is None:
        order = sorted(range(n_clients), key=lambda j: -len(neurons[j]))
        first = order[0]
        state.h = prior_h + x[first]
        state.tau = np.outer(
            np.ones(len(x[first])), prior_precision + precisions[first]
        )
        state.counts = [1] * len(x[first])
        assignment[first] = list(range(len(x[first])))
        for j in order[1:]:
            assignment[j] = state.add_client(x[j], precisions[j], **opts)
    else:
        width = 1 + max(max(a) for a in init)
        state.h = np.outer(np.ones(width), prior_h)
        state.tau = np.outer(np.ones(width), prior_precision)
        state.counts = [0] * width
        for j, a in enumerate(init):
            for u, i in enumerate(a):
                state.counts[i] += 1
                state.h[i] += x[j][u]
                state.tau[i] += precisions[j]
            assignment[j] = [int(i) for i in a]
        unused = [i for i in range(width) if state.counts[i] == 0]
        for i in reversed(unused):
            del state.counts[i]
            for a in assignment:
                for idx in range(len(a)):
                    if a[idx] > i:
                        a[idx] -= 1
        state.h = np.delete(state.h, unused, axis=0)
        state.tau = np.delete(state.tau, unused, axis=0)
    for _ in range(iters):
        for j in rng.permutation(n_clients):
            state.remove_client(int(j), x[j], precisions[j], assignment)
            assignment[j] = state.add_client(x[j], precisions[j], **opts)
    return state.h / state.tau, state.tau, state.counts, assignment, state.history


def oracle_pfnm_mlp(
    client_weights: Sequence[Sequence[np.ndarray]],
    class_counts: np.ndarray,
    *,
    sigma2: float = 1.0,
    sigma0_2: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    seed: int = 0,
    popularity: str = "reference",
    missing: str = "patch",
) -> tuple[list[np.ndarray], list[list[list[int]]]]:
    """Multilayer PFNM by loops: (global weights in torch layout, assignments)."""
    n_clients = len(client_weights)
    # the reference's layout: weights (in, out)
    nets = [[np.asarray(w, dtype=np.float64).T for w in net] for net in client_weights]
    n_layers = len(nets[0]) // 2  # hidden layers + 1
    n_in = nets[0][0].shape[0]
    counts = np.asarray(class_counts, dtype=np.float64)
    shares = [counts[j] / counts.sum(0) for j in range(n_clients)]
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = [np.zeros(0)] * len(nets[0])
    assignments: list[list[list[int]]] = [[] for _ in range(n_layers - 1)]
    next_width = 0
    for c in range(n_layers - 1, 0, -1):  # hidden layer c, from the top
        vectors, precisions = [], []
        for j in range(n_clients):
            bias = nets[j][2 * c - 1].reshape(-1, 1)
            outgoing = nets[j][2 * c]
            if c == n_layers - 1:
                out_prec = [y / sigma2 for y in shares[j]]
            else:
                patched = np.zeros((outgoing.shape[0], next_width))
                patched[:, assignments[c][j]] = outgoing
                outgoing = patched
                out_prec = [1.0 / sigma2] * next_width
                if missing == "zero_precision":
                    out_prec = [
                        1.0 / sigma2 if k in assignments[c][j] else 0.0
                        for k in range(next_width)
                    ]
            if c == 1:
                vec = np.hstack([nets[j][0].T, bias, outgoing])
                prec = [1.0 / sigma2] * (n_in + 1) + out_prec
            else:
                vec = np.hstack([bias, outgoing])
                prec = [1.0 / sigma2, *out_prec]
            vectors.append(vec)
            precisions.append(np.array(prec))
        width = vectors[0].shape[1]
        head = n_in if c == 1 else 0
        prior_mean = np.array([0.1 if d == head else 0.0 for d in range(width)])
        atoms, _, _, assign, _ = oracle_match(
            vectors,
            precisions,
            prior_mean,
            np.full(width, 1.0 / sigma0_2),
            gamma=gamma,
            iters=iters,
            rng=rng,
            popularity=popularity,
        )
        assignments[c - 1] = assign
        next_width = len(atoms)
        if c == 1:
            out[0] = atoms[:, :n_in]
        out[2 * c - 1] = atoms[:, head]
        out[2 * c] = atoms[:, head + 1 :].T
    bias_num = 0.1 / sigma0_2
    bias_den = 1.0 / sigma0_2
    for j in range(n_clients):
        bias_num = bias_num + shares[j] * nets[j][-1] / sigma2
        bias_den = bias_den + shares[j] / sigma2
    out[-1] = bias_num / bias_den
    return out, assignments
