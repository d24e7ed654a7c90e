"""Permutation specs: which tensor axes each hidden-unit symmetry of a model moves.

A network's hidden units can often be reordered without changing the function
it computes. A :class:`PermutationSpec` names every such symmetry of a model as
a :class:`PermGroup`: a set of ``size`` units, together with every
``(tensor, axis)`` pair (an :class:`AxisRef`) that the reordering moves. One
group may touch many tensors (a conv's output rows, its BatchNorm's weight,
bias and running statistics, and the next layer's input columns); tensors that
must share one permutation (a residual stream, channels summed into one
NAS-Bench vertex) are simply listed in the same group.

Where a unit is more than one index of an axis, the :class:`AxisRef` says so:
unit ``u`` of a group occupies, along the referenced axis, the indices::

    offset + r * stride + u * block + b    for r < repeat, b < block

so ``block=g`` moves GroupSort groups of ``g`` rows as one unit, ``repeat=o``
with ``stride=c // o`` moves LegoNet input-channel bundles (one channel per
fragment), and ``offset`` addresses a slice of a concatenated axis (DenseNet).
An :class:`AxisRef` with ``values=True`` does not move entries: the tensor
holds unit indices (a selective-conv pointer, ``-1`` for none) that are
relabelled instead.

The convention for a permutation array ``perm`` of a group is ``new = old[perm]``:
new unit ``k`` is old unit ``perm[k]``.

This module is pure torch/numpy; the matcher, AOFP's physical pruning, the
weight-plasticity penalty and the registry-wide invariance test all read specs
through the functions here and never special-case a model class.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "AxisRef",
    "PermGroup",
    "PermutationSpec",
    "permute_state_dict",
    "random_permutations",
    "select_units",
    "unit_indices",
]


@dataclass(frozen=True)
class AxisRef:
    """One axis of one state-dict tensor that a :class:`PermGroup` moves.

    Attributes
    ----------
    tensor : str
        State-dict key of the parameter or buffer.
    axis : int
        The axis the group permutes (ignored when ``values`` is true).
    offset : int
        First index of the group's slice along ``axis``.
    block : int
        Contiguous indices per unit.
    repeat : int
        Number of copies of the group's layout along ``axis``.
    stride : int
        Distance between copies; ``0`` means ``size * block`` (copies back to back).
    values : bool
        The tensor stores unit indices (``-1`` = none) that are relabelled.
    """

    tensor: str
    axis: int = 0
    offset: int = 0
    block: int = 1
    repeat: int = 1
    stride: int = 0
    values: bool = False


@dataclass(frozen=True)
class PermGroup:
    """A set of interchangeable hidden units and every axis they move.

    Attributes
    ----------
    name : str
        Unique within the spec, e.g. ``"hidden.0"`` or ``"features.3"``.
    size : int
        Number of units.
    axes : tuple of AxisRef
        Every tensor axis the group moves.
    width_key : str or None
        Where the group's width lives in the model's build kwargs, as a dotted
        path (``"hidden.1"`` is ``kwargs["hidden"][1]``); ``None`` when the width
        is fixed by the architecture and matching may not grow it.
    width_scale : int
        The kwarg equals ``size * width_scale`` (e.g. the group size of a
        GroupSort layer, the fragment count of a LegoNet input).
    """

    name: str
    size: int
    axes: tuple[AxisRef, ...]
    width_key: str | None = None
    width_scale: int = 1


@dataclass(frozen=True)
class PermutationSpec:
    """All permutation symmetries of one model instance.

    Attributes
    ----------
    groups : tuple of PermGroup
        In forward order (input side first).
    """

    groups: tuple[PermGroup, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"permutation groups must have unique names: {names}")

    def __iter__(self) -> Iterator[PermGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def group(self, name: str) -> PermGroup:
        """The group called ``name``."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no permutation group {name!r}; groups: {self.names()}")

    def names(self) -> list[str]:
        """Group names in forward order."""
        return [g.name for g in self.groups]

    def tensors(self) -> set[str]:
        """Every state-dict key some group touches."""
        return {a.tensor for g in self.groups for a in g.axes}

    def widths(self) -> dict[str, int]:
        """Group sizes by name."""
        return {g.name: g.size for g in self.groups}


def unit_indices(
    ref: AxisRef, size: int, units: Iterable[int] | np.ndarray
) -> np.ndarray:
    """Indices along ``ref.axis`` occupied by ``units`` (in the order given).

    Parameters
    ----------
    ref : AxisRef
        The axis reference.
    size : int
        The group's number of units (needed for the default ``stride``).
    units : iterable of int
        Unit numbers.

    Returns
    -------
    numpy.ndarray
        For each unit in turn, its ``repeat * block`` indices, so that selecting
        these indices and reshaping to ``(len(units), repeat * block, ...)`` gives
        one row per unit.
    """
    u = np.asarray(list(units) if not isinstance(units, np.ndarray) else units)
    stride = ref.stride or size * ref.block
    r = np.arange(ref.repeat)[None, :, None] * stride
    b = np.arange(ref.block)[None, None, :]
    idx = ref.offset + r + u[:, None, None] * ref.block + b
    return idx.reshape(-1).astype(np.int64)


def _relabel(values: torch.Tensor, ref: AxisRef, perm: np.ndarray) -> torch.Tensor:
    """Relabel a tensor of unit indices after ``new = old[perm]``."""
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm))
    lookup = torch.as_tensor(inverse, dtype=values.dtype, device=values.device)
    local = values - ref.offset
    inside = (values >= ref.offset) & (local < len(perm))
    mapped = lookup[local.clamp(0, len(perm) - 1)] + ref.offset
    return torch.where(inside, mapped, values)


def permute_state_dict(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, np.ndarray],
) -> dict[str, torch.Tensor]:
    """Apply one permutation per group to a state dict.

    Parameters
    ----------
    state : mapping of str to Tensor
        A model's state dict (or any dict with the same keys and shapes, such as
        a diagonal Fisher estimate).
    spec : PermutationSpec
        The model's spec.
    perms : mapping of group name to numpy.ndarray
        ``perms[g][k]`` is the old unit that becomes unit ``k``; groups missing
        from the mapping are left alone.

    Returns
    -------
    dict
        A new state dict; untouched tensors are shared, not copied.
    """
    out = dict(state)
    for group in spec:
        if group.name not in perms:
            continue
        perm = np.asarray(perms[group.name], dtype=np.int64)
        if sorted(perm.tolist()) != list(range(group.size)):
            raise ValueError(
                f"permutation for group {group.name!r} must reorder "
                f"0..{group.size - 1}, got {perm.tolist()[:8]}..."
            )
        for ref in group.axes:
            if ref.tensor not in out:
                continue
            t = out[ref.tensor]
            if ref.values:
                out[ref.tensor] = _relabel(t, ref, perm)
                continue
            src = unit_indices(ref, group.size, perm)
            dst = unit_indices(ref, group.size, np.arange(group.size))
            moved = t.clone()
            index = torch.as_tensor(dst, device=t.device)
            moved.index_copy_(
                ref.axis, index, t.index_select(ref.axis, torch.as_tensor(src))
            )
            out[ref.tensor] = moved
    return out


def select_units(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    group: str,
    keep: Iterable[int] | np.ndarray,
) -> dict[str, torch.Tensor]:
    """Keep only units ``keep`` of one group, in that order (physical pruning).

    Every axis the group moves shrinks; slices at other offsets of the same axis
    are kept. Index-valued tensors (``values=True``) pointing at removed units
    become ``-1``; the others are renumbered. Tensors of the group missing from
    ``state`` are skipped (as :func:`permute_state_dict` does), so a partial
    state dict (a Fisher estimate without BatchNorm statistics) shrinks too.
    """
    g = spec.group(group)
    keep_arr = np.asarray(list(keep) if not isinstance(keep, np.ndarray) else keep)
    out = dict(state)
    for ref in g.axes:
        if ref.tensor not in out:
            continue
        t = out[ref.tensor]
        if ref.values:
            new_id = np.full(g.size, -1, dtype=np.int64)
            new_id[keep_arr] = np.arange(len(keep_arr))
            lookup = torch.as_tensor(new_id, dtype=t.dtype, device=t.device)
            local = t - ref.offset
            inside = (t >= ref.offset) & (local < g.size)
            mapped = lookup[local.clamp(0, g.size - 1)]
            mapped = torch.where(mapped >= 0, mapped + ref.offset, mapped)
            out[ref.tensor] = torch.where(inside, mapped, t)
            continue
        n = t.shape[ref.axis]
        all_group = set(unit_indices(ref, g.size, np.arange(g.size)).tolist())
        kept = unit_indices(ref, g.size, keep_arr)
        # the layout of kept units must stay valid for the new, smaller group:
        # remaining copies keep their relative order, so rebuild in new layout
        outside = [i for i in range(n) if i not in all_group]
        new_size = len(keep_arr)
        new_ref_len = ref.repeat * ref.block * new_size
        stride_new = (ref.stride - (g.size - new_size) * ref.block) if ref.stride else 0
        new_layout = unit_indices(
            AxisRef(
                ref.tensor, ref.axis, ref.offset, ref.block, ref.repeat, stride_new
            ),
            new_size,
            np.arange(new_size),
        )
        order = np.empty(n - len(all_group) + new_ref_len, dtype=np.int64)
        taken = np.zeros(len(order), dtype=bool)
        taken[new_layout] = True
        order[new_layout] = kept
        order[~taken] = np.asarray(outside, dtype=np.int64)
        out[ref.tensor] = t.index_select(ref.axis, torch.as_tensor(order)).clone()
    return out


def random_permutations(
    spec: PermutationSpec, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One uniformly random permutation per group."""
    return {g.name: rng.permutation(g.size) for g in spec}
