"""Selective-channel CNNs: a DenseNet and a pre-activation bottleneck ResNet
built from selective convolutions.

Jeong & Shin, "Training CNNs with Selective Allocation of Channels", ICML 2019.
Paper: proceedings.mlr.press/v97/jeong19c.html

Every conv after the stem is a :class:`SelectiveConv2d` (BN, ReLU, gates,
conv). The 1x1 convs (``top_k > 0``) keep their budget: channels they close are
reopened as shifted copies of their most important inputs. The 3x3 convs
(``top_k = 0``) only prune, which is where the compression comes from.

Federated training. Gates ``g`` and pointers ``p`` are server-owned
(:meth:`tensor_roles`): averaging would make gates fractional and pointers
meaningless, and a client that reallocated on its own would give a slot a
different meaning than its peers. The shifts ``b`` are averaged like any other
weight: clients train them by gradient (the paper trains them, with weight
decay 1e-5), and since every client shares the server's pointers a slot's
shift means the same thing on every client. When the server reallocates a slot
it writes the new shift into the global model, which is broadcast as usual.

The paper runs de-allocation then re-allocation after each epoch while
``epoch < 0.5 * epochs``; fedsim maps epochs to rounds, so
:meth:`server_update` runs them on the aggregated global model after round
``r`` (1-based) while ``r - 1 < 0.5 * num_rounds``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS, Role
from fedsim.models._selective_conv import SelectiveConv2d

__all__ = [
    "SelectiveDenseNet",
    "SelectiveResNet",
    "selective_densenet",
    "selective_resnet",
]


T = TypeVar("T", bound=nn.Module)


def _nested(rows: nn.ModuleList, kind: type[T]) -> list[list[T]]:
    """A ModuleList of ModuleLists of ``kind`` as typed lists."""
    return [[cast(T, m) for m in cast(nn.ModuleList, row)] for row in rows]


def _head_axes(width_offset: int) -> tuple[AxisRef, ...]:
    """The final BatchNorm and the classifier's input columns at one offset."""
    return (
        AxisRef("norm.weight", 0, width_offset),
        AxisRef("norm.bias", 0, width_offset),
        AxisRef("norm.running_mean", 0, width_offset),
        AxisRef("norm.running_var", 0, width_offset),
        AxisRef("fc.weight", 1, width_offset),
    )


def _positive(name: str, widths: Sequence[int]) -> list[int]:
    """The widths as ints, or a ConfigError naming the first non-positive one."""
    out = [int(w) for w in widths]
    if not out or min(out) < 1:
        raise ConfigError(
            f"{name} must be a non-empty list of positive widths, got {out}"
        )
    return out


def _pools(rows: int, h: int, w: int) -> list[bool]:
    """Whether a 2x2 average pool follows each of ``rows`` rows of blocks.

    Every row but the last is followed by one, unless the ``h x w`` map has
    already shrunk to one pixel wide.
    """
    pools: list[bool] = []
    for r in range(rows):
        pool = r < rows - 1 and min(h, w) >= 2
        pools.append(pool)
        if pool:
            h, w = h // 2, w // 2
    return pools


@dataclass(frozen=True)
class _Selection:
    """Selective-conv options shared by every layer of a network."""

    top_k: int
    gamma: float
    max_copies: int | None

    def conv(self, in_channels: int, out_channels: int, k: int) -> SelectiveConv2d:
        """A ``k x k`` selective conv: 1x1 convs reallocate, larger ones only prune."""
        return SelectiveConv2d(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=k,
            top_k=self.top_k if k == 1 else 0,
            gamma=self.gamma,
            max_copies=self.max_copies,
        )


class _SelectiveNet(nn.Module, ABC):
    """Selective-conv bookkeeping and the layout shared by both networks.

    ``stem (conv) -> row -> pool -> row ... -> BN -> ReLU -> global average
    pool -> Linear``. Subclasses set ``realloc_seed`` and ``stem``, hold their
    rows of blocks (each a ModuleList) in a ModuleList that :meth:`rows`
    returns, and call :meth:`_add_head` after them.
    """

    realloc_seed: int
    stem: nn.Conv2d
    pools: list[bool]
    norm: nn.BatchNorm2d
    fc: nn.Linear

    @abstractmethod
    def rows(self) -> nn.ModuleList:
        """The rows of blocks (dense blocks or residual stages), in order."""

    def _add_head(
        self, *, input_hw: tuple[int, int], width: int, num_classes: int
    ) -> None:
        """The pools between the rows, the final BatchNorm and the classifier."""
        self.pools = _pools(len(self.rows()), *input_hw)
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for row, pool in zip(self.rows(), self.pools, strict=True):
            for block in cast(nn.ModuleList, row):
                x = block(x)
            if pool:
                x = F.avg_pool2d(x, 2)
        x = F.relu(self.norm(x)).mean(dim=(2, 3))
        return self.fc(x)

    def selective_layers(self) -> list[tuple[str, SelectiveConv2d]]:
        """Every selective conv with its module path, in forward order."""
        return [
            (name, m)
            for name, m in self.named_modules()
            if isinstance(m, SelectiveConv2d)
        ]

    def effective_weights(self) -> int:
        """Conv weights in use over all selective convs (closed slots excluded)."""
        return sum(layer.effective_weights() for _, layer in self.selective_layers())

    def deallocate(self) -> None:
        """Close each selective conv's least important channels."""
        for _, layer in self.selective_layers():
            layer.deallocate()

    def reallocate(self, generator: torch.Generator) -> None:
        """Reopen the closed slots of every selective conv with ``top_k > 0``."""
        for _, layer in self.selective_layers():
            layer.reallocate(generator)

    def tensor_roles(self) -> dict[str, Role]:
        """Gates and pointers are owned by the server; everything else is averaged."""
        roles: dict[str, Role] = {}
        for name, layer in self.selective_layers():
            roles[f"{name}.g"] = "server"
            if layer.p is not None:
                roles[f"{name}.p"] = "server"
        return roles

    def server_update(self, server_round: int, num_rounds: int) -> None:
        """De-allocate then re-allocate after aggregation, in the first half.

        Runs while ``server_round - 1 < 0.5 * num_rounds`` (the paper's
        ``epoch < 0.5 * epochs`` with rounds counted from 1); later rounds leave
        the model alone. The random draws come from ``realloc_seed`` and the
        round, so a resumed run reallocates exactly as the original did.

        Raises
        ------
        ValueError
            For a round outside ``1..num_rounds``, or gates and pointers that
            are not a valid selection (e.g. they were averaged).
        """
        if num_rounds < 1 or not 1 <= server_round <= num_rounds:
            raise ValueError(
                f"server_round must be in 1..num_rounds, got {server_round} of "
                f"{num_rounds}"
            )
        if 2 * (server_round - 1) >= num_rounds:
            return
        for _, layer in self.selective_layers():
            layer.check_selection()
        seed = np.random.SeedSequence([self.realloc_seed, server_round])
        generator = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
        self.deallocate()
        self.reallocate(generator)


class _DenseLayer(nn.Module):
    """``SConv 1x1 (top_k) -> SConv 3x3 (prune only)``; output appended to input."""

    def __init__(
        self, *, in_channels: int, bottleneck: int, growth: int, sel: _Selection
    ) -> None:
        super().__init__()
        self.conv1 = sel.conv(in_channels, bottleneck, 1)
        self.conv2 = sel.conv(bottleneck, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv2(self.conv1(x))], dim=1)


class SelectiveDenseNet(_SelectiveNet):
    """DenseNet of selective convs, with average-pool transitions.

    ``stem (3x3 conv) -> block -> pool -> block ... -> BN -> ReLU -> global
    average pool -> Linear``. Each dense layer appends ``growth[b][l]`` channels
    to the running concatenation through a ``bottleneck[b][l]``-wide 1x1
    selective conv. Transitions are 2x2 average pools (the non-compressing
    DenseNet-40/100 layout), skipped once the map is one pixel wide.

    Parameters
    ----------
    input_shape : sequence of int
        (C, H, W).
    num_classes : int
        Output size.
    stem : int
        Channels of the first conv.
    growth : sequence of sequence of int
        New channels per dense layer, one list per block.
    bottleneck : sequence of sequence of int
        Width of each dense layer's 1x1 conv, shaped like ``growth``.
    top_k, gamma, max_copies
        Passed to every :class:`SelectiveConv2d` (``top_k`` to the 1x1 convs).
    realloc_seed : int
        Seed of the server's reallocation draws.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        stem: int,
        growth: Sequence[Sequence[int]],
        bottleneck: Sequence[Sequence[int]],
        top_k: int,
        gamma: float,
        max_copies: int | None,
        realloc_seed: int,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        self.stem_width = _positive("stem", [stem])[0]
        self.growth = [_positive(f"growth[{i}]", g) for i, g in enumerate(growth)]
        self.bottleneck = [
            _positive(f"bottleneck[{i}]", m) for i, m in enumerate(bottleneck)
        ]
        if not self.growth or [len(g) for g in self.growth] != [
            len(m) for m in self.bottleneck
        ]:
            raise ConfigError(
                f"growth {self.growth} and bottleneck {self.bottleneck} must list "
                "the same number of layers in the same (non-empty) blocks"
            )
        self.realloc_seed = int(realloc_seed)
        sel = _Selection(top_k=top_k, gamma=gamma, max_copies=max_copies)
        self.stem = nn.Conv2d(c, self.stem_width, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList()
        width = self.stem_width
        for grows, mids in zip(self.growth, self.bottleneck, strict=True):
            block = nn.ModuleList()
            for grow, mid in zip(grows, mids, strict=True):
                block.append(
                    _DenseLayer(in_channels=width, bottleneck=mid, growth=grow, sel=sel)
                )
                width += grow
            self.blocks.append(block)
        self._add_head(input_hw=(h, w), width=width, num_classes=num_classes)

    def rows(self) -> nn.ModuleList:
        """The dense blocks."""
        return self.blocks

    def permutation_spec(self) -> PermutationSpec:
        """Stem and per-layer new channels are slices of every later input.

        Groups: ``stem``; per dense layer ``bottleneck.b.l`` (the 1x1 conv's
        outputs, consumed by the 3x3 conv) and ``growth.b.l`` (the 3x3 conv's
        outputs, a slice at a fixed offset of every later layer's input, of the
        final BatchNorm and of the classifier's columns).
        """
        layers = [
            (f"blocks.{b}.{i}.", layer, b, i)
            for b, block in enumerate(_nested(self.blocks, _DenseLayer))
            for i, layer in enumerate(block)
        ]
        groups: list[PermGroup] = []

        def consumers(first: int, offset: int) -> tuple[AxisRef, ...]:
            refs: list[AxisRef] = []
            for prefix, layer, _, _ in layers[first:]:
                refs += layer.conv1.input_axes(f"{prefix}conv1.", offset)
            return (*refs, *_head_axes(offset))

        groups.append(
            PermGroup(
                name="stem",
                size=self.stem_width,
                axes=(AxisRef("stem.weight", 0), *consumers(0, 0)),
                width_key="stem",
            )
        )
        offset = self.stem_width
        for t, (prefix, layer, b, i) in enumerate(layers):
            groups.append(
                PermGroup(
                    name=f"bottleneck.{b}.{i}",
                    size=self.bottleneck[b][i],
                    axes=(
                        layer.conv1.output_axis(f"{prefix}conv1."),
                        *layer.conv2.input_axes(f"{prefix}conv2."),
                    ),
                    width_key=f"bottleneck.{b}.{i}",
                )
            )
            groups.append(
                PermGroup(
                    name=f"growth.{b}.{i}",
                    size=self.growth[b][i],
                    axes=(
                        layer.conv2.output_axis(f"{prefix}conv2."),
                        *consumers(t + 1, offset),
                    ),
                    width_key=f"growth.{b}.{i}",
                )
            )
            offset += self.growth[b][i]
        return PermutationSpec(tuple(groups))


class _Bottleneck(nn.Module):
    """Pre-activation bottleneck: ``1x1 (top_k) -> 3x3 (prune) -> 1x1 (top_k)``.

    The shortcut is the input zero-padded with channels at the end to the
    output width, so a stage's new channels are appended to the stream.
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, mid: list[int], sel: _Selection
    ) -> None:
        super().__init__()
        self.pad = out_channels - in_channels
        self.conv1 = sel.conv(in_channels, mid[0], 1)
        self.conv2 = sel.conv(mid[0], mid[1], 3)
        self.conv3 = sel.conv(mid[1], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv3(self.conv2(self.conv1(x)))
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x + branch


class SelectiveResNet(_SelectiveNet):
    """Pre-activation bottleneck ResNet of selective convs, zero-padded shortcuts.

    ``stem (3x3 conv) -> stage -> pool -> stage ... -> BN -> ReLU -> global
    average pool -> Linear``. Stage ``s`` widens the residual stream by
    ``added[s]`` channels: its first block's shortcut zero-pads the input, so
    the stream of stage ``s`` is ``stem + sum(added[:s + 1])`` wide and the
    earlier channels keep their positions. Transitions are 2x2 average pools,
    skipped once the map is one pixel wide.

    Parameters
    ----------
    input_shape : sequence of int
        (C, H, W).
    num_classes : int
        Output size.
    stem : int
        Channels of the first conv (the first slice of the stream).
    added : sequence of int
        Channels each stage appends to the stream.
    bottleneck : sequence of sequence of (int, int)
        Per stage, per block: the widths of the 1x1 and 3x3 convs' outputs.
    top_k, gamma, max_copies
        Passed to every :class:`SelectiveConv2d` (``top_k`` to the 1x1 convs).
    realloc_seed : int
        Seed of the server's reallocation draws.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        stem: int,
        added: Sequence[int],
        bottleneck: Sequence[Sequence[Sequence[int]]],
        top_k: int,
        gamma: float,
        max_copies: int | None,
        realloc_seed: int,
    ) -> None:
        super().__init__()
        c, h, w = (int(v) for v in input_shape)
        self.stem_width = _positive("stem", [stem])[0]
        self.added = _positive("added", added)
        self.bottleneck = [
            [_positive(f"bottleneck[{s}][{j}]", mid) for j, mid in enumerate(stage)]
            for s, stage in enumerate(bottleneck)
        ]
        shapes = [[len(mid) for mid in stage] for stage in self.bottleneck]
        if len(shapes) != len(self.added) or any(
            not stage or set(stage) != {2} for stage in shapes
        ):
            raise ConfigError(
                f"bottleneck {self.bottleneck} must hold, for each of the "
                f"{len(self.added)} stages in added, a non-empty list of "
                "[1x1 width, 3x3 width] pairs"
            )
        self.realloc_seed = int(realloc_seed)
        sel = _Selection(top_k=top_k, gamma=gamma, max_copies=max_copies)
        self.stem = nn.Conv2d(c, self.stem_width, 3, padding=1, bias=False)
        self.stages = nn.ModuleList()
        width = self.stem_width
        for extra, mids in zip(self.added, self.bottleneck, strict=True):
            stage = nn.ModuleList()
            for j, mid in enumerate(mids):
                stage.append(
                    _Bottleneck(
                        in_channels=width if j == 0 else width + extra,
                        out_channels=width + extra,
                        mid=mid,
                        sel=sel,
                    )
                )
            width += extra
            self.stages.append(stage)
        self._add_head(input_hw=(h, w), width=width, num_classes=num_classes)

    def rows(self) -> nn.ModuleList:
        """The residual stages."""
        return self.stages

    def permutation_spec(self) -> PermutationSpec:
        """One group per stream slice, two per bottleneck.

        ``stem`` and ``stage.s`` are slices of the residual stream: each moves
        its offset in every later block (the 1x1 input conv's BN, gates, shifts,
        pointers and weight columns, the output conv's rows), the final
        BatchNorm and the classifier's columns. The zero-padded shortcut keeps
        earlier slices in place, which is what ties them across stages.
        ``stages.s.j.mid1``/``mid2`` are the hidden channels of each bottleneck.
        """
        blocks = [
            (s, j, f"stages.{s}.{j}.", block)
            for s, stage in enumerate(_nested(self.stages, _Bottleneck))
            for j, block in enumerate(stage)
        ]
        stream: list[PermGroup] = []
        offset = 0
        for s in range(-1, len(self.added)):
            size = self.stem_width if s < 0 else self.added[s]
            producer = AxisRef("stem.weight", 0)
            refs: list[AxisRef] = []
            for t, j, prefix, block in blocks:
                if t < s:
                    continue
                rows = block.conv3.output_axis(f"{prefix}conv3.", offset)
                if t == s and j == 0:
                    # the stage's first block creates the slice: its input lacks it
                    producer = rows
                    continue
                refs += block.conv1.input_axes(f"{prefix}conv1.", offset)
                refs.append(rows)
            stream.append(
                PermGroup(
                    name="stem" if s < 0 else f"stage.{s}",
                    size=size,
                    axes=(producer, *refs, *_head_axes(offset)),
                    width_key="stem" if s < 0 else f"added.{s}",
                )
            )
            offset += size
        # forward order: each stage's slice right after the block that creates it
        groups = [stream[0]]
        for s, j, prefix, block in blocks:
            for k, (conv, following) in enumerate(
                ((block.conv1, block.conv2), (block.conv2, block.conv3)), start=1
            ):
                groups.append(
                    PermGroup(
                        name=f"stages.{s}.{j}.mid{k}",
                        size=self.bottleneck[s][j][k - 1],
                        axes=(
                            conv.output_axis(f"{prefix}conv{k}."),
                            *following.input_axes(f"{prefix}conv{k + 1}."),
                        ),
                        width_key=f"bottleneck.{s}.{j}.{k - 1}",
                    )
                )
            if j == 0:
                groups.append(stream[s + 1])
        return PermutationSpec(tuple(groups))


@MODELS.register("selective_densenet")
def selective_densenet(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    stem: int = 16,
    growth: Sequence[Sequence[int]] = ((8, 8, 8), (8, 8, 8)),
    bottleneck: Sequence[Sequence[int]] = ((32, 32, 32), (32, 32, 32)),
    top_k: int = 3,
    gamma: float = 1e-3,
    max_copies: int | None = None,
    realloc_seed: int = 0,
) -> SelectiveDenseNet:
    """Registered ``selective_densenet``; defaults suit 8x8 grey images."""
    return SelectiveDenseNet(
        input_shape=input_shape,
        num_classes=num_classes,
        stem=stem,
        growth=growth,
        bottleneck=bottleneck,
        top_k=top_k,
        gamma=gamma,
        max_copies=max_copies,
        realloc_seed=realloc_seed,
    )


@MODELS.register("selective_resnet")
def selective_resnet(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    stem: int = 16,
    added: Sequence[int] = (16, 32),
    bottleneck: Sequence[Sequence[Sequence[int]]] = (
        ((8, 8), (8, 8)),
        ((16, 16), (16, 16)),
    ),
    top_k: int = 3,
    gamma: float = 1e-3,
    max_copies: int | None = None,
    realloc_seed: int = 0,
) -> SelectiveResNet:
    """Registered ``selective_resnet``; defaults suit 8x8 grey images."""
    return SelectiveResNet(
        input_shape=input_shape,
        num_classes=num_classes,
        stem=stem,
        added=added,
        bottleneck=bottleneck,
        top_k=top_k,
        gamma=gamma,
        max_copies=max_copies,
        realloc_seed=realloc_seed,
    )
