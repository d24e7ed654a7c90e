"""Axis layouts: where each permutation group sits along every tensor axis.

A :class:`~fedsim.matching.permspec.PermutationSpec` says, per group, which
indices of which axis its units occupy (``offset``/``block``/``repeat``/
``stride``). Read together over all groups, an axis is a sequence of
*segments*: a copy of one group's units (``size * block`` contiguous indices)
or a free run of indices no group moves (input channels, kernel taps, classes,
a ``[z ; z ; dp]`` tail). A model rebuilt at other widths keeps the same
segments in the same order, only the group segments change length, which is
what lets fedsim move a client's tensors into a matched global model of
another width, and slice the global model back to a client, without knowing
the model class:

* :meth:`SpecLayout.resized` gives the layout at new group widths;
* :func:`scatter_state` moves a state dict into a target layout, sending unit
  ``u`` of group ``g`` to unit ``moves[g][u]`` (a client joining the global
  order), filling what the client lacks;
* :func:`gather_state` is its inverse (the global model sliced to a client).

Index-valued tensors (``values=True`` refs) are relabelled on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedsim.exceptions import AggregationError
from fedsim.matching.permspec import AxisRef, PermutationSpec

__all__ = [
    "AxisLayout",
    "Segment",
    "SpecLayout",
    "gather_state",
    "scatter_state",
]

I64 = np.ndarray


@dataclass(frozen=True)
class Segment:
    """A run of indices along one axis.

    Attributes
    ----------
    group : str or None
        The group whose units occupy the run; ``None`` for a free run.
    copy : int
        Which of the group's ``repeat`` copies this is.
    start : int
        First index.
    units : int
        Units of the group in the run (its length for a free run).
    block : int
        Indices per unit (1 for a free run).
    """

    group: str | None
    copy: int
    start: int
    units: int
    block: int = 1

    @property
    def length(self) -> int:
        """Indices in the run."""
        return self.units * self.block


@dataclass(frozen=True)
class AxisLayout:
    """The segments of one axis of one tensor, in index order, covering it."""

    tensor: str
    axis: int
    segments: tuple[Segment, ...]

    @property
    def length(self) -> int:
        """Length of the axis."""
        return sum(s.length for s in self.segments)

    def resized(self, widths: Mapping[str, int]) -> AxisLayout:
        """The same segments with groups of ``widths`` at those unit counts."""
        out, start = [], 0
        for s in self.segments:
            units = widths.get(s.group, s.units) if s.group is not None else s.units
            out.append(replace(s, start=start, units=int(units)))
            start += units * s.block
        return AxisLayout(self.tensor, self.axis, tuple(out))

    def owners(self) -> tuple[list[str | None], I64, I64]:
        """Per index: owning group (``None`` = free), unit, and offset in the run."""
        names: list[str | None] = []
        units = np.empty(self.length, dtype=np.int64)
        within = np.empty(self.length, dtype=np.int64)
        for s in self.segments:
            names += [s.group] * s.length
            idx = np.arange(s.length)
            units[s.start : s.start + s.length] = idx // s.block
            within[s.start : s.start + s.length] = idx % s.block
        return names, units, within

    def index_map(self, target: AxisLayout, moves: Mapping[str, I64]) -> I64:
        """Target index of every index of this axis.

        Unit ``u`` of a group named in ``moves`` goes to unit ``moves[g][u]`` of
        the same segment in ``target``; other groups and free runs keep their
        position within their segment.
        """
        out = np.empty(self.length, dtype=np.int64)
        for s, t in zip(self.segments, target.segments, strict=True):
            idx = np.arange(s.length)
            unit, b = idx // s.block, idx % s.block
            if s.group is not None and s.group in moves:
                unit = np.asarray(moves[s.group], dtype=np.int64)[unit]
            out[s.start : s.start + s.length] = t.start + unit * s.block + b
        return out


def _segments(
    tensor: str, axis: int, n: int, refs: list[tuple[str, int, AxisRef]]
) -> AxisLayout:
    """Sort the group copies along one axis and fill the gaps with free runs."""
    copies = []
    for name, size, ref in refs:
        stride = ref.stride or size * ref.block
        for r in range(ref.repeat):
            copies.append(Segment(name, r, ref.offset + r * stride, size, ref.block))
    copies.sort(key=lambda s: s.start)
    out: list[Segment] = []
    at = 0
    for s in copies:
        if s.start < at or s.start + s.length > n:
            raise AggregationError(
                f"group {s.group!r} occupies indices {s.start}..{s.start + s.length} "
                f"of axis {axis} of {tensor!r} (length {n}), overlapping another "
                "group or past the end; the spec does not fit this state."
            )
        if s.start > at:
            out.append(Segment(None, 0, at, s.start - at))
        out.append(s)
        at = s.start + s.length
    if at < n:
        out.append(Segment(None, 0, at, n - at))
    return AxisLayout(tensor, axis, tuple(out))


class SpecLayout:
    """Every grouped axis of one model state, read off its spec and shapes.

    Parameters
    ----------
    spec : PermutationSpec
        The model's spec (its group sizes must match ``shapes``).
    shapes : mapping of str to tuple of int
        The state dict's tensor shapes; refs to absent tensors are ignored.
    """

    def __init__(
        self, spec: PermutationSpec, shapes: Mapping[str, tuple[int, ...]]
    ) -> None:
        self.spec = spec
        self.shapes = {k: tuple(int(n) for n in v) for k, v in shapes.items()}
        self.sizes = spec.widths()
        found: dict[tuple[str, int], list[tuple[str, int, AxisRef]]] = {}
        self.values: list[tuple[str, AxisRef]] = []
        for g in spec:
            for ref in g.axes:
                if ref.tensor not in self.shapes:
                    continue
                if ref.values:
                    self.values.append((g.name, ref))
                    continue
                if not 0 <= ref.axis < len(self.shapes[ref.tensor]):
                    raise AggregationError(
                        f"group {g.name!r} permutes axis {ref.axis} of "
                        f"{ref.tensor!r}, which has shape {self.shapes[ref.tensor]}."
                    )
                found.setdefault((ref.tensor, ref.axis), []).append(
                    (g.name, g.size, ref)
                )
        self.axes = {
            key: _segments(key[0], key[1], self.shapes[key[0]][key[1]], refs)
            for key, refs in found.items()
        }
        self._value_starts = self._find_value_starts()

    def _find_value_starts(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(group, offset) of each values ref -> (axis key index, segment index)."""
        keys = list(self.axes)
        out: dict[tuple[str, int], tuple[int, int]] = {}
        for name, ref in self.values:
            for k, key in enumerate(keys):
                segs = self.axes[key].segments
                hit = [
                    i
                    for i, s in enumerate(segs)
                    if s.group == name and s.copy == 0 and s.start == ref.offset
                ]
                if hit:
                    out[(name, ref.offset)] = (k, hit[0])
                    break
            else:
                if ref.offset != 0:
                    raise AggregationError(
                        f"the unit indices in {ref.tensor!r} start at {ref.offset} but "
                        f"no axis has group {name!r} there; the spec is inconsistent."
                    )
        return out

    def value_start(self, group: str, offset: int) -> int:
        """Where the units that index values of ``group`` at ``offset`` start."""
        hit = self._value_starts.get((group, offset))
        if hit is None:
            return offset
        key = list(self.axes)[hit[0]]
        return self.axes[key].segments[hit[1]].start

    def groups_of(self, tensor: str) -> set[str]:
        """Groups that move some axis (or the values) of ``tensor``."""
        out = {
            s.group
            for (t, _), lay in self.axes.items()
            if t == tensor
            for s in lay.segments
            if s.group is not None
        }
        return out | {g for g, ref in self.values if ref.tensor == tensor}

    def resized(self, widths: Mapping[str, int]) -> SpecLayout:
        """This layout with the groups of ``widths`` at those unit counts."""
        out = object.__new__(SpecLayout)
        out.spec = self.spec
        out.sizes = {**self.sizes, **{k: int(v) for k, v in widths.items()}}
        out.axes = {k: lay.resized(widths) for k, lay in self.axes.items()}
        out.values = self.values
        out._value_starts = self._value_starts
        shapes = {}
        for key, shape in self.shapes.items():
            dims = list(shape)
            for axis in range(len(dims)):
                lay = out.axes.get((key, axis))
                if lay is not None:
                    dims[axis] = lay.length
            shapes[key] = tuple(dims)
        out.shapes = shapes
        return out

    def maps(
        self, tensor: str, target: SpecLayout, moves: Mapping[str, I64]
    ) -> list[I64]:
        """Per axis of ``tensor``, the target index of every index."""
        out = []
        for axis, n in enumerate(self.shapes[tensor]):
            lay = self.axes.get((tensor, axis))
            if lay is None:
                out.append(np.arange(n, dtype=np.int64))
            else:
                out.append(lay.index_map(target.axes[(tensor, axis)], moves))
        return out

    def relabel(
        self,
        tensor: str,
        values: np.ndarray,
        target: SpecLayout,
        moves: Mapping[str, I64],
    ) -> np.ndarray:
        """Unit indices stored in ``tensor`` rewritten for ``target``.

        A value pointing at unit ``u`` of a moved group becomes the target
        position of ``moves[g][u]``; values pointing at a group that keeps its
        order are shifted with its segment; others (``-1``) are kept.
        """
        out = values.copy()
        for name, ref in self.values:
            if ref.tensor != tensor:
                continue
            lo, size = self.value_start(name, ref.offset), self.sizes[name]
            inside = (values >= lo) & (values < lo + size)
            unit = values[inside] - lo
            if name in moves:
                unit = np.asarray(moves[name], dtype=np.int64)[unit]
            out[inside] = target.value_start(name, ref.offset) + unit
        return out


def _fill_value(layout: SpecLayout, key: str, dtype: torch.dtype) -> float | int:
    """What a target entry that no source entry reaches holds."""
    if dtype.is_floating_point:
        return 0.0
    if any(ref.tensor == key for _, ref in layout.values):
        return -1  # no unit
    return 0


def scatter_state(
    state: Mapping[str, torch.Tensor],
    source: SpecLayout,
    target: SpecLayout,
    moves: Mapping[str, I64],
) -> dict[str, torch.Tensor]:
    """``state`` moved into ``target``: unit ``u`` of group ``g`` -> ``moves[g][u]``.

    Groups not in ``moves`` keep their order (and must keep their width).
    Target entries no source entry reaches are 0 (``-1`` in index tensors).

    Parameters
    ----------
    state : mapping of str to Tensor
        A state dict at the shapes of ``source``.
    source, target : SpecLayout
        Layouts of the same architecture; ``target`` usually ``source.resized``.
    moves : mapping of group name to int array
        Injective unit maps, one entry per source unit.

    Returns
    -------
    dict
        A new state dict at the shapes of ``target``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if key not in source.shapes or not source.groups_of(key):
            out[key] = t
            continue
        arr = t.detach().cpu().numpy()
        if not t.is_floating_point():
            arr = source.relabel(key, arr, target, moves)
        full = np.full(
            target.shapes[key], _fill_value(source, key, t.dtype), dtype=arr.dtype
        )
        full[np.ix_(*source.maps(key, target, moves))] = arr
        out[key] = torch.from_numpy(full).to(t.device)
    return out


def gather_state(
    state: Mapping[str, torch.Tensor],
    source: SpecLayout,
    target: SpecLayout,
    moves: Mapping[str, I64],
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`scatter_state`: read ``target``'s entries out of a
    state at ``source``'s shapes, where ``moves`` maps *target* units to source
    units (a client's assignment into the global model).

    Unit indices (``values=True``) pointing at a source unit the target lacks
    become ``-1``.
    """
    out: dict[str, torch.Tensor] = {}
    inverse = {}
    for name, move in moves.items():
        inv = np.full(source.sizes[name], -1, dtype=np.int64)
        inv[np.asarray(move, dtype=np.int64)] = np.arange(len(move))
        inverse[name] = inv
    for key, t in state.items():
        if key not in source.shapes or not target.groups_of(key):
            out[key] = t
            continue
        arr = t.detach().cpu().numpy()
        picked = arr[np.ix_(*target.maps(key, source, moves))]
        if not t.is_floating_point():
            picked = _relabel_back(source, target, key, picked, inverse)
        out[key] = torch.from_numpy(np.ascontiguousarray(picked)).to(t.device)
    return out


def _relabel_back(
    source: SpecLayout,
    target: SpecLayout,
    key: str,
    values: np.ndarray,
    inverse: Mapping[str, I64],
) -> np.ndarray:
    out = values.copy()
    for name, ref in source.values:
        if ref.tensor != key:
            continue
        lo = source.value_start(name, ref.offset)
        inside = (values >= lo) & (values < lo + source.sizes[name])
        unit = values[inside] - lo
        if name in inverse:
            unit = inverse[name][unit]
        out[inside] = np.where(
            unit >= 0, target.value_start(name, ref.offset) + unit, -1
        )
    return out
