"""NAS-Bench-101 cell networks (Ying et al. 2019). Paper: arxiv.org/abs/1902.09635.

The network is the benchmark's fixed skeleton around one searched cell: a
conv3x3-BN-ReLU stem, ``num_stacks`` stacks of ``cells_per_stack`` identical
cells (every stack after the first starts with a 2x2 max-pool and doubles the
channels), a global average pool and a dense head. The published CIFAR-10
configuration is 3 stacks x 3 cells, stem and first-stack width 128, on
3x32x32 images; the defaults here are a small version for 8x8 and 28x28 grey
images.

Inside a cell (see :mod:`fedsim.models._nasbench_graph` for the graph itself)
the output's channels are split over the vertices that feed it, each vertex
sums its inputs (predecessors truncated to its width, the cell input through a
1x1 conv-BN-ReLU projection) and applies its op, and the cell output is the
concatenation of the feeding vertices, plus a projection of the cell input if
the input feeds the output directly. BatchNorm uses the benchmark's decay 0.997
(torch momentum 0.003) and eps 1e-5; weights start as TensorFlow initialised
them (fan-in variance scaling for convs, Glorot uniform for the head).

Permutation symmetry: channels summed into one vertex share one permutation, so
the units are the classes of a union-find over sum-tied channel spaces; a class
whose spaces differ in width (a truncated predecessor) permutes only the
channels every consumer sees and keeps the last one in place; the cell output
permutation is the block-diagonal combination of its feeding vertices'
permutations. Vertex widths are fixed by the architecture; only the stem width
may change (the stem is read through 1x1 projections alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS
from fedsim.models._nasbench_graph import (
    AVAILABLE_OPS,
    CONV1X1,
    CONV3X3,
    INCEPTION_MATRIX,
    INCEPTION_OPS,
    MAXPOOL3X3,
    ModelSpec,
    graph_hash,
    sample_specs,
    spec_hash,
    vertex_channels,
)

__all__ = [
    "AVAILABLE_OPS",
    "INCEPTION_MATRIX",
    "INCEPTION_OPS",
    "Cell",
    "ModelSpec",
    "NASBenchNet",
    "graph_hash",
    "nasbench",
    "sample_specs",
    "spec_hash",
    "vertex_channels",
]

BN_MOMENTUM = 0.003
"""torch's momentum for TensorFlow's moving-average decay 0.997 (1 - 0.997)."""
BN_EPS = 1e-5
_KERNEL = {CONV3X3: 3, CONV1X1: 1}
_TRUNCATED_NORMAL_STD = 0.87962566103423978
"""Std of a unit normal truncated to [-2, 2]; TF divides by it to keep the variance."""


class _ConvBNReLU(nn.Module):
    """Same-padded conv (no bias), BatchNorm, ReLU: the benchmark's conv block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        # TF's variance_scaling_initializer(): fan-in, truncated normal, scale 1
        std = math.sqrt(1.0 / (in_channels * kernel_size**2)) / _TRUNCATED_NORMAL_STD
        nn.init.trunc_normal_(self.conv.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _unit_refs(prefix: str, offset: int = 0) -> list[AxisRef]:
    """Output-channel axes of a :class:`_ConvBNReLU` (conv rows, BN parameters)."""
    bn = ("weight", "bias", "running_mean", "running_var")
    return [
        AxisRef(f"{prefix}.conv.weight", 0, offset),
        *(AxisRef(f"{prefix}.bn.{key}", 0, offset) for key in bn),
    ]


@dataclass
class _Space:
    """A run of channels that one permutation moves, and the axes it touches."""

    size: int
    name: str | None
    producers: list[AxisRef] = field(default_factory=list)
    consumers: list[AxisRef] = field(default_factory=list)


class _Ties:
    """Union-find over channel spaces tied channel by channel from index 0.

    Tied spaces may differ in width (a predecessor truncated to a narrower
    vertex): their class permutes only the common prefix, the smallest width.
    """

    def __init__(self) -> None:
        self.spaces: list[_Space] = []
        self.parent: list[int] = []

    def new(self, size: int, name: str | None = None) -> int:
        self.spaces.append(_Space(size, name))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self, width_keys: dict[str, str]) -> tuple[PermGroup, ...]:
        """One group per class of two or more units, in creation (forward) order.

        A class is named after its first named space (a layer's own output), whose
        axes come first; every class has one, as every channel starts at a conv.
        """
        classes: dict[int, list[_Space]] = {}
        for i, space in enumerate(self.spaces):
            classes.setdefault(self.find(i), []).append(space)
        out = []
        for root in sorted(classes):
            members = classes[root]
            size = min(s.size for s in members)
            first = next(s for s in members if s.name is not None)
            name = str(first.name)
            members.remove(first)
            axes = [*first.producers, *(r for s in members for r in s.producers)]
            axes += [r for s in (first, *members) for r in s.consumers]
            if size >= 2:
                out.append(PermGroup(name, size, tuple(axes), width_keys.get(name)))
        return tuple(out)


Blocks = list[tuple[int, int]]
"""A concatenated channel axis as (space, offset) blocks of a :class:`_Ties`."""


class Cell(nn.Module):
    """One NAS-Bench-101 cell (module) from ``in_channels`` to ``channels``.

    Parameters
    ----------
    spec : ModelSpec
        The cell graph.
    in_channels : int
        Channels of the cell input.
    channels : int
        Channels of the cell output.

    Attributes
    ----------
    vertex_widths : list of int
        Output channels of every vertex (see :func:`vertex_channels`).
    """

    def __init__(self, *, spec: ModelSpec, in_channels: int, channels: int) -> None:
        super().__init__()
        self.spec = spec
        self.matrix = [list(row) for row in spec.matrix]
        self.vertex_widths = vertex_channels(in_channels, channels, self.matrix)
        n = spec.num_vertices
        # proj[t]: 1x1 projection of the cell input into vertex t (t = n-1: output)
        self.proj = nn.ModuleDict(
            {
                str(t): _ConvBNReLU(in_channels, self.vertex_widths[t], 1)
                for t in range(1, n)
                if self.matrix[0][t]
            }
        )
        self.ops = nn.ModuleDict(
            {
                str(t): _ConvBNReLU(
                    self.vertex_widths[t], self.vertex_widths[t], _KERNEL[op]
                )
                for t, op in enumerate(spec.ops)
                if op in _KERNEL
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.matrix)
        values = [x]
        feeding = []
        for t in range(1, n - 1):
            width = self.vertex_widths[t]
            terms = [values[s][:, :width] for s in range(1, t) if self.matrix[s][t]]
            if self.matrix[0][t]:
                terms.append(self.proj[str(t)](x))
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            if self.spec.ops[t] == MAXPOOL3X3:
                value = nn.functional.max_pool2d(total, 3, stride=1, padding=1)
            else:
                value = self.ops[str(t)](total)
            values.append(value)
            if self.matrix[t][n - 1]:
                feeding.append(value)
        if not feeding:
            return self.proj[str(n - 1)](x)
        out = feeding[0] if len(feeding) == 1 else torch.cat(feeding, dim=1)
        if self.matrix[0][n - 1]:
            out = out + self.proj[str(n - 1)](x)
        return out

    def declare(self, ties: _Ties, prefix: str, inputs: Blocks) -> Blocks:
        """Add this cell's channel spaces to ``ties``; return its output blocks.

        Parameters
        ----------
        ties : _Ties
            The network's union-find, holding the spaces of earlier layers.
        prefix : str
            State-dict prefix of this cell (``"cells.3"``).
        inputs : list of (space, offset)
            How the cell input's channel axis is made of earlier spaces.
        """
        m, width, n = self.matrix, self.vertex_widths, len(self.matrix)

        def read_input(t: int) -> None:
            for src, offset in inputs:
                ref = AxisRef(f"{prefix}.proj.{t}.conv.weight", 1, offset)
                ties.spaces[src].consumers.append(ref)

        def projection(t: int, name: str) -> int:
            read_input(t)
            space = ties.new(width[t], name)
            ties.spaces[space].producers += _unit_refs(f"{prefix}.proj.{t}")
            return space

        out: dict[int, int] = {}
        for t in range(1, n - 1):
            total = ties.new(width[t])
            if self.spec.ops[t] == MAXPOOL3X3:
                out[t] = total  # channel-wise: the output keeps the input's order
            else:
                ties.spaces[total].consumers.append(
                    AxisRef(f"{prefix}.ops.{t}.conv.weight", 1)
                )
                out[t] = ties.new(width[t], f"{prefix}.v{t}")
                ties.spaces[out[t]].producers += _unit_refs(f"{prefix}.ops.{t}")
            for src in range(1, t):
                if m[src][t]:
                    ties.union(out[src], total)
            if m[0][t]:
                ties.union(projection(t, f"{prefix}.v{t}.proj"), total)
        feeders = [t for t in range(1, n - 1) if m[t][n - 1]]
        if not feeders:
            return [(projection(n - 1, f"{prefix}.out.proj"), 0)]
        blocks: Blocks = []
        offset = 0
        for t in feeders:
            blocks.append((out[t], offset))
            offset += width[t]
        if m[0][n - 1]:
            # the projection is added to the concatenation, block by block
            read_input(n - 1)
            for space, start in blocks:
                refs = _unit_refs(f"{prefix}.proj.{n - 1}", start)
                ties.spaces[space].producers += refs
        return blocks


class NASBenchNet(nn.Module):
    """The NAS-Bench-101 skeleton around one cell.

    Parameters
    ----------
    spec : ModelSpec
        The cell, repeated in every stack.
    input_shape : sequence of int
        (C, H, W).
    num_classes : int
        Output size.
    stem_channels : int
        Width of the stem conv.
    channels : int
        Output width of the first stack's cells (doubled at each later stack).
    num_stacks : int
        Stacks of cells; every stack after the first starts with a 2x2 max-pool.
    cells_per_stack : int
        Cells in each stack.
    """

    def __init__(
        self,
        *,
        spec: ModelSpec,
        input_shape: Sequence[int],
        num_classes: int,
        stem_channels: int,
        channels: int,
        num_stacks: int,
        cells_per_stack: int,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {list(input_shape)}")
        sizes = {
            "stem_channels": stem_channels,
            "channels": channels,
            "num_stacks": num_stacks,
            "cells_per_stack": cells_per_stack,
            "num_classes": num_classes,
        }
        for key, value in sizes.items():
            if int(value) < 1:
                raise ValueError(f"nasbench needs {key} >= 1, got {value}")
        self.spec = spec
        self.stem_channels = int(stem_channels)
        self.stem = _ConvBNReLU(int(input_shape[0]), self.stem_channels, 3)
        self.cells = nn.ModuleList()
        self.pools: list[bool] = []
        width_in, width = self.stem_channels, int(channels)
        for stack in range(int(num_stacks)):
            if stack > 0:
                width *= 2
            for index in range(int(cells_per_stack)):
                self.cells.append(Cell(spec=spec, in_channels=width_in, channels=width))
                self.pools.append(stack > 0 and index == 0)
                width_in = width
        self.fc = nn.Linear(width, num_classes)
        nn.init.xavier_uniform_(self.fc.weight)  # TF's dense-layer default
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for cell, pool in zip(self.cells, self.pools, strict=True):
            if pool:  # TF's "same" 2x2/2 pool: odd sizes round up
                x = nn.functional.max_pool2d(x, 2, stride=2, ceil_mode=True)
            x = cell(x)
        return self.fc(x.mean(dim=(2, 3)))

    def permutation_spec(self) -> PermutationSpec:
        """Sum-tied vertex channels as groups; cell outputs as their blocks."""
        ties = _Ties()
        stem = ties.new(self.stem_channels, "stem")
        ties.spaces[stem].producers += _unit_refs("stem")
        blocks: Blocks = [(stem, 0)]
        for k, cell in enumerate(self.cells):
            blocks = cast(Cell, cell).declare(ties, f"cells.{k}", blocks)
        for space, offset in blocks:
            ties.spaces[space].consumers.append(AxisRef("fc.weight", 1, offset))
        return PermutationSpec(ties.groups({"stem": "stem_channels"}))


@MODELS.register("nasbench")
def nasbench(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    matrix: Sequence[Sequence[int]] = INCEPTION_MATRIX,
    ops: Sequence[str] = INCEPTION_OPS,
    stem_channels: int = 16,
    channels: int = 16,
    num_stacks: int = 3,
    cells_per_stack: int = 1,
    sample: int | None = None,
    sample_seed: int = 0,
    bn_momentum: float = BN_MOMENTUM,
) -> NASBenchNet:
    """Registered ``nasbench``: the cell as ``matrix`` (list of lists) and ``ops``.

    ``sample=i`` builds instead the ``i``-th of the random valid cells that
    :func:`sample_specs` draws with ``sample_seed`` (``matrix`` and ``ops`` are
    then ignored); the list is the same for any count, so cell ``i`` of a
    random search is one fixed cell. ``bn_momentum`` is torch's BatchNorm
    momentum of every layer; the benchmark's 0.003 (decay 0.997) needs
    thousands of steps before the running statistics fit the data, so short
    federated runs, evaluated with those statistics, want a larger value such
    as torch's default 0.1. The published CIFAR-10 network is
    ``stem_channels=128, channels=128, num_stacks=3, cells_per_stack=3`` on
    ``input_shape=(3, 32, 32)``.

    Raises
    ------
    fedsim.exceptions.ConfigError
        If ``sample`` is negative or ``bn_momentum`` is outside (0, 1].
    """
    if not 0.0 < bn_momentum <= 1.0:
        raise ConfigError(
            f"nasbench bn_momentum must lie in (0, 1], got {bn_momentum!r}"
        )
    if sample is None:
        spec = ModelSpec(matrix, ops)
    else:
        if isinstance(sample, bool) or int(sample) != sample or sample < 0:
            raise ConfigError(
                f"nasbench sample must be null or a cell index >= 0, got {sample!r}"
            )
        spec = sample_specs(int(sample) + 1, int(sample_seed))[int(sample)]
    net = NASBenchNet(
        spec=spec,
        input_shape=input_shape,
        num_classes=num_classes,
        stem_channels=stem_channels,
        channels=channels,
        num_stacks=num_stacks,
        cells_per_stack=cells_per_stack,
    )
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = float(bn_momentum)
    return net
