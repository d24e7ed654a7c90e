"""The global state dict of a matching, assembled from the clients' evidence.

Given every matched group's assignments (:class:`~fedsim.matching.neurons.Done`),
each client's tensors are scattered into the global layout
(:mod:`fedsim.matching.layout`) and combined per entry, by the treatment
:class:`~fedsim.matching.neurons.ClientStates` chose for the tensor:

* parameters: the posterior mean ``(p0 mu0 + sum_j s_j x_j) / (p0 + sum_j s_j)``
  over the clients that observe the entry (the output layer's rows weighted by
  class shares). A client observes an entry when it has the entry, or, with
  ``missing="patch"``, when it has the unit of the group matched last among
  the entry's axes (it then observes a zero for the units it lacks);
* buffers and float server-owned tensors moved by a matched group: the
  example-weighted mean over the units that land on each global unit;
* integer tensors: the first client's entry, unit indices relabelled;
* server-owned and local tensors no matched group moves: the first client's.

Reading the atoms off the matcher would give the same parameters for the
entries in neuron vectors; assembling from the clients' entries also covers
entries in no vector (a group's own axis seen twice, groups aligned by
identity) and buffers with the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from fedsim.exceptions import AggregationError
from fedsim.matching.layout import SpecLayout
from fedsim.matching.neurons import ClientStates, Done, Kind, Missing

__all__ = ["assemble", "moved_groups"]

I64 = NDArray[np.int64]


def moved_groups(done: Mapping[str, Done]) -> set[str]:
    """Groups whose global order or width differs from some client's."""
    out = set()
    for name, d in done.items():
        for a in d.assignments:
            if len(a) != d.width or not np.array_equal(a, np.arange(d.width)):
                out.add(name)
                break
    return out


def assemble(
    data: ClientStates, done: Mapping[str, Done], keys: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """The global tensors ``keys`` (default all) under the assignments ``done``.

    Every group that moves a requested tensor must be in ``done``.
    """
    widths = {name: d.width for name, d in done.items()}
    target = data.layouts[0].resized(widths)
    moved = moved_groups(done)
    rank = {name: i for i, name in enumerate(done)}  # the matching order
    moves = [
        {name: d.assignments[j] for name, d in done.items()}
        for j in range(data.n_clients)
    ]
    out: dict[str, torch.Tensor] = {}
    for key in data.keys if keys is None else keys:
        groups = data.layouts[0].groups_of(key)
        missing = groups - set(done)
        if missing:
            raise AggregationError(
                f"tensor {key!r} needs group {sorted(missing)[0]!r} matched first."
            )
        kind = data.kinds[key]
        if kind != "posterior" and data.roles.get(key, "average") != "average":
            if not groups & moved:
                kind = "pass"
        value = _assemble_one(data, key, kind, target, moves, rank)
        out[key] = torch.from_numpy(np.array(value, order="C")).to(data.dtypes[key])
    return out


def _assemble_one(
    data: ClientStates,
    key: str,
    kind: Kind,
    target: SpecLayout,
    moves: list[dict[str, I64]],
    order: Mapping[str, int],
) -> np.ndarray:
    if kind == "pass":
        return data.arrays[0][key]
    shape = target.shapes[key]
    maps = [
        np.ix_(*lay.maps(key, target, mv)) if shape else ()
        for lay, mv in zip(data.layouts, moves, strict=True)
    ]
    if kind == "first":
        out = np.full(
            shape, -1 if _indexes(data, key) else 0, data.arrays[0][key].dtype
        )
        seen = np.zeros(shape, dtype=bool)
        for lay, mv, ix, arrs in zip(
            data.layouts, moves, maps, data.arrays, strict=True
        ):
            x = lay.relabel(key, arrs[key], target, mv)
            out[ix] = np.where(seen[ix], out[ix], x)
            seen[ix] = True
        return out
    if kind == "mean":
        num, den = np.zeros(shape), np.zeros(shape)
        for w, ix, arrs in zip(data.weights, maps, data.arrays, strict=True):
            num[ix] += w * arrs[key]
            den[ix] += w
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    num = np.full(shape, data.p0 * data.prior_mean(key))
    den = np.full(shape, data.p0)
    ranks = _ranks(key, target, order)
    for j, (lay, mv, arrs) in enumerate(
        zip(data.layouts, moves, data.arrays, strict=True)
    ):
        index = lay.maps(key, target, mv)
        x = np.zeros(shape)
        x[np.ix_(*index)] = arrs[key]
        s = data.s * _observed(data.missing, index, ranks, shape)
        if key in data.head and data.shares is not None:
            s = s * data.shares[j].reshape(-1, *([1] * (len(shape) - 1)))
        num += s * x
        den += s
    return num / den


def _ranks(key: str, target: SpecLayout, order: Mapping[str, int]) -> list[I64]:
    """Per axis of ``key``: when each global position's group was matched
    (-1 for free positions)."""
    out = []
    for axis, n in enumerate(target.shapes[key]):
        rank = np.full(n, -1, dtype=np.int64)
        lay = target.axes.get((key, axis))
        for seg in lay.segments if lay is not None else ():
            if seg.group is not None:
                rank[seg.start : seg.start + seg.length] = order[seg.group]
        out.append(rank)
    return out


def _observed(
    missing: Missing, index: list[I64], ranks: list[I64], shape: tuple[int, ...]
) -> np.ndarray:
    """Which global entries a client observes.

    An entry is observed when the client has it; with ``missing="patch"``
    also when the client has the unit of the last-matched group among the
    entry's axes (it then observes a zero for units it lacks elsewhere).
    """
    ndim = len(shape)
    has = []
    for axis, (idx, n) in enumerate(zip(index, shape, strict=True)):
        h = np.zeros(n, dtype=bool)
        h[idx] = True
        has.append(h.reshape([n if a == axis else 1 for a in range(ndim)]))
    if not has:
        return np.ones(shape, dtype=bool)
    if missing == "zero_precision":
        return np.logical_and.reduce(np.broadcast_arrays(*has))
    rank = [
        r.reshape([len(r) if a == axis else 1 for a in range(ndim)])
        for axis, r in enumerate(ranks)
    ]
    last = np.maximum.reduce(np.broadcast_arrays(*rank))
    parts = [h | (r < last) for h, r in zip(has, rank, strict=True)]
    return np.logical_and.reduce(np.broadcast_arrays(*parts))


def _indexes(data: ClientStates, key: str) -> bool:
    return any(ref.tensor == key for _, ref in data.layouts[0].values)
