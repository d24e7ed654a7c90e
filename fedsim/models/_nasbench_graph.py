"""NAS-Bench-101 cell graphs: validation, pruning, the isomorphism hash, sampling.

A NAS-Bench-101 cell (Ying et al. 2019, arxiv.org/abs/1902.09635) is a directed
acyclic graph of at most 7 vertices and 9 edges, given as an upper-triangular
0/1 adjacency matrix and one op label per vertex: vertex 0 is the cell input,
the last vertex the cell output, and every vertex in between applies one of
:data:`AVAILABLE_OPS`. This module is pure Python (no torch): the network built
from a cell lives in :mod:`fedsim.models.nasbench`.

The graph hash is the benchmark's own fingerprint, so fedsim's cells can be
looked up in the published NAS-Bench-101 tables by it. Isomorphic cells (the
same graph with interior vertices numbered differently) hash identically; their
networks compute the same function but order their tensors differently, so
federated averaging must still compare the vertex order, not only the hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AVAILABLE_OPS",
    "CONV1X1",
    "CONV3X3",
    "INCEPTION_MATRIX",
    "INCEPTION_OPS",
    "INPUT",
    "MAXPOOL3X3",
    "MAX_EDGES",
    "MAX_VERTICES",
    "OUTPUT",
    "ModelSpec",
    "graph_hash",
    "sample_specs",
    "spec_hash",
    "vertex_channels",
]

INPUT = "input"
OUTPUT = "output"
CONV3X3 = "conv3x3-bn-relu"
CONV1X1 = "conv1x1-bn-relu"
MAXPOOL3X3 = "maxpool3x3"
AVAILABLE_OPS: tuple[str, ...] = (CONV3X3, CONV1X1, MAXPOOL3X3)
"""Interior ops in the benchmark's canonical order: an op's hash label is its index."""
MAX_VERTICES = 7
MAX_EDGES = 9

INCEPTION_MATRIX: tuple[tuple[int, ...], ...] = (
    (0, 1, 1, 1, 0, 1, 0),  # input
    (0, 0, 0, 0, 0, 0, 1),  # 1x1 conv
    (0, 0, 0, 0, 0, 0, 1),  # 3x3 conv
    (0, 0, 0, 0, 1, 0, 0),  # first 3x3 of the 5x5 replacement
    (0, 0, 0, 0, 0, 0, 1),  # second 3x3 of the 5x5 replacement
    (0, 0, 0, 0, 0, 0, 1),  # 3x3 max-pool
    (0, 0, 0, 0, 0, 0, 0),  # output
)
"""The benchmark README's Inception-like cell (a 5x5 conv as two 3x3 convs)."""
INCEPTION_OPS: tuple[str, ...] = (
    INPUT,
    CONV1X1,
    CONV3X3,
    CONV3X3,
    CONV3X3,
    MAXPOOL3X3,
    OUTPUT,
)

_INPUT_LABEL = -1
_OUTPUT_LABEL = -2


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _as_matrix(matrix: Iterable[Iterable[Any]]) -> list[list[int]]:
    """A square 0/1 matrix as nested lists of Python ints (never numpy scalars)."""
    rows = [[int(v) for v in row] for row in matrix]
    n = len(rows)
    if n == 0 or any(len(row) != n for row in rows):
        shape = [len(row) for row in rows]
        raise ValueError(
            f"a cell matrix must be square and non-empty, got rows {shape}"
        )
    if any(v not in (0, 1) for row in rows for v in row):
        raise ValueError("a cell matrix must hold only 0 and 1 entries")
    return rows


def graph_hash(matrix: Iterable[Iterable[Any]], labels: Iterable[Any]) -> str:
    """Isomorphism-invariant MD5 fingerprint of a vertex-labelled directed graph.

    The NAS-Bench-101 algorithm: each vertex starts from the MD5 of the string
    form of ``(out_degree, in_degree, label)``; then, as many times as there are
    vertices, each vertex's hash becomes the MD5 of its sorted in-neighbour
    hashes joined, ``"|"``, its sorted out-neighbour hashes joined, ``"|"``, and
    its own hash; the fingerprint is the MD5 of the string form of the sorted
    list of vertex hashes. Degrees and labels enter as Python ints: the string
    form of a numpy integer (``np.int64(2)`` under numpy 2) would change every
    hash.

    Parameters
    ----------
    matrix : square 0/1 nested sequence or array
        ``matrix[i][j] == 1`` for an edge i -> j (any directed graph).
    labels : sequence of int
        One label per vertex (NAS-Bench uses -1 input, -2 output, else the
        op's index in :data:`AVAILABLE_OPS`).

    Returns
    -------
    str
        32 hexadecimal digits.
    """
    adj = _as_matrix(matrix)
    n = len(adj)
    lab = [int(v) for v in labels]
    if len(lab) != n:
        raise ValueError(
            f"graph_hash needs {n} labels for a {n}x{n} matrix, got {len(lab)}"
        )
    in_degree = [sum(adj[src][dst] for src in range(n)) for dst in range(n)]
    out_degree = [sum(row) for row in adj]
    hashes = [_md5(str((out_degree[v], in_degree[v], lab[v]))) for v in range(n)]
    for _ in range(n):
        hashes = [
            _md5(
                "".join(sorted(hashes[w] for w in range(n) if adj[w][v]))
                + "|"
                + "".join(sorted(hashes[w] for w in range(n) if adj[v][w]))
                + "|"
                + hashes[v]
            )
            for v in range(n)
        ]
    return _md5(str(sorted(hashes)))


def _reachable(adj: list[list[int]], start: int, forward: bool) -> set[int]:
    """Vertices reachable from ``start`` along (or against) the edges."""
    n = len(adj)
    seen = {start}
    frontier = [start]
    while frontier:
        v = frontier.pop()
        for w in range(n):
            edge = adj[v][w] if forward else adj[w][v]
            if edge and w not in seen:
                seen.add(w)
                frontier.append(w)
    return seen


@dataclass(frozen=True)
class ModelSpec:
    """A valid NAS-Bench-101 cell, pruned to the vertices that matter.

    Construction deletes every vertex that is not on a path from the input to
    the output (the benchmark's pruning), then checks the pruned cell against
    the search space: at most :data:`MAX_VERTICES` vertices and
    :data:`MAX_EDGES` edges, ``"input"`` first, ``"output"`` last and only
    :data:`AVAILABLE_OPS` in between. The stored ``matrix`` and ``ops`` are the
    pruned ones, as tuples, so two cells that prune to the same graph compare
    (and hash as dict keys) equal.

    Parameters
    ----------
    matrix : square 0/1 nested sequence or array
        Upper-triangular adjacency matrix (``matrix[i][j] == 1``: edge i -> j).
    ops : sequence of str
        One op per vertex, matching the matrix order.

    Raises
    ------
    ValueError
        For a non-square, non-0/1 or not strictly upper-triangular matrix, a
        wrong number of ops, an input that cannot reach the output, or a
        pruned cell outside the search space.
    """

    matrix: Sequence[Sequence[int]]
    ops: Sequence[str]

    def __post_init__(self) -> None:
        adj = _as_matrix(self.matrix)
        ops = [str(op) for op in self.ops]
        n = len(adj)
        if len(ops) != n:
            raise ValueError(f"a {n}x{n} cell matrix needs {n} ops, got {len(ops)}")
        below = [(i, j) for i in range(n) for j in range(i + 1) if adj[i][j]]
        if below:
            raise ValueError(
                f"a cell matrix must be strictly upper triangular, but entry "
                f"{below[0]} is 1"
            )
        keep = sorted(_reachable(adj, 0, True) & _reachable(adj, n - 1, False))
        if n < 2 or 0 not in keep or n - 1 not in keep:
            raise ValueError("the cell's input vertex has no path to its output vertex")
        pruned = tuple(tuple(adj[i][j] for j in keep) for i in keep)
        kept_ops = tuple(ops[i] for i in keep)
        edges = sum(map(sum, pruned))
        if len(keep) > MAX_VERTICES:
            raise ValueError(
                f"a cell may have at most {MAX_VERTICES} vertices after pruning, "
                f"got {len(keep)}"
            )
        if edges > MAX_EDGES:
            raise ValueError(
                f"a cell may have at most {MAX_EDGES} edges after pruning, got {edges}"
            )
        if kept_ops[0] != INPUT or kept_ops[-1] != OUTPUT:
            raise ValueError(
                f"a cell's first op must be {INPUT!r} and its last {OUTPUT!r}, got "
                f"{kept_ops[0]!r} and {kept_ops[-1]!r}"
            )
        for op in kept_ops[1:-1]:
            if op not in AVAILABLE_OPS:
                raise ValueError(
                    f"unknown cell op {op!r}; choose one of: {', '.join(AVAILABLE_OPS)}"
                )
        object.__setattr__(self, "matrix", pruned)
        object.__setattr__(self, "ops", kept_ops)

    @property
    def num_vertices(self) -> int:
        """Vertices after pruning, input and output included."""
        return len(self.ops)

    @property
    def num_edges(self) -> int:
        """Edges after pruning."""
        return sum(map(sum, self.matrix))

    def labels(self) -> list[int]:
        """Hash labels: -1 input, -2 output, else the op's index in AVAILABLE_OPS."""
        interior = [AVAILABLE_OPS.index(op) for op in self.ops[1:-1]]
        return [_INPUT_LABEL, *interior, _OUTPUT_LABEL]

    def hash(self) -> str:
        """The benchmark's graph hash of the pruned cell (see :func:`graph_hash`)."""
        return graph_hash(self.matrix, self.labels())


def spec_hash(matrix: Iterable[Iterable[Any]], ops: Sequence[str]) -> str:
    """NAS-Bench-101 hash of a cell: prune and validate it, then :func:`graph_hash`.

    This is the key under which the benchmark stores the cell's metrics.

    Raises
    ------
    ValueError
        If the cell is not valid (see :class:`ModelSpec`).
    """
    return ModelSpec(_as_matrix(matrix), list(ops)).hash()


def vertex_channels(
    in_channels: int, out_channels: int, matrix: Sequence[Sequence[int]]
) -> list[int]:
    """Output channels of every vertex of a (pruned) cell.

    The output's channels are split over the ``d`` interior vertices that feed
    it: ``out_channels // d`` each, the first ``out_channels % d`` of them (in
    vertex order) one more. Every other interior vertex gets the largest count
    among its interior successors, assigned from the back, so counts never
    increase along an edge and a wider predecessor is truncated by at most one
    channel.

    Raises
    ------
    ValueError
        If ``out_channels`` is smaller than ``d`` (a vertex would get no channel).
    """
    n = len(matrix)
    channels = [0] * n
    channels[0] = in_channels
    channels[n - 1] = out_channels
    if n == 2:
        return channels
    feeders = [v for v in range(1, n - 1) if matrix[v][n - 1]]
    if out_channels < len(feeders):
        raise ValueError(
            f"a cell with {len(feeders)} vertices feeding its output needs at least "
            f"{len(feeders)} channels, got {out_channels}"
        )
    share, extra = divmod(out_channels, len(feeders))
    for rank, v in enumerate(feeders):
        channels[v] = share + (1 if rank < extra else 0)
    for v in range(n - 3, 0, -1):
        if not matrix[v][n - 1]:
            channels[v] = max(channels[w] for w in range(v + 1, n - 1) if matrix[v][w])
    return channels


def sample_specs(
    n: int, seed: int, *, max_attempts_per_spec: int = 1000
) -> list[ModelSpec]:
    """``n`` random valid cells with pairwise different hashes (non-isomorphic).

    Each draw is the benchmark's random cell: every upper-triangular edge of a
    7x7 matrix present with probability 1/2, every interior op uniform over
    :data:`AVAILABLE_OPS`; invalid cells (too many edges after pruning, input
    cut off from output) and cells isomorphic to one already drawn are
    discarded. The same ``n`` and ``seed`` always give the same list, in the
    same order.

    Parameters
    ----------
    n : int
        How many cells (at least 0).
    seed : int
        Seed of the numpy generator that draws the cells.
    max_attempts_per_spec : int
        Draws allowed per requested cell before giving up.

    Raises
    ------
    ValueError
        If ``n`` is negative, or ``n`` distinct cells were not found within
        ``n * max_attempts_per_spec`` draws.
    """
    if n < 0:
        raise ValueError(f"sample_specs needs n >= 0 cells, got {n}")
    rng = np.random.default_rng(seed)
    found: dict[str, ModelSpec] = {}
    interior = MAX_VERTICES - 2
    for _ in range(n * max_attempts_per_spec):
        if len(found) == n:
            break
        matrix = np.triu(rng.integers(0, 2, size=(MAX_VERTICES, MAX_VERTICES)), 1)
        picks = rng.integers(0, len(AVAILABLE_OPS), size=interior).tolist()
        ops = [INPUT, *(AVAILABLE_OPS[i] for i in picks), OUTPUT]
        try:
            spec = ModelSpec(matrix.tolist(), ops)
        except ValueError:
            continue
        found.setdefault(spec.hash(), spec)
    if len(found) < n:
        raise ValueError(
            f"found only {len(found)} distinct valid cells of the {n} asked for in "
            f"{n * max_attempts_per_spec} draws"
        )
    return list(found.values())
