"""Selective-channel DenseNet: dense layers of selective convolutions.

Jeong & Shin, "Training CNNs with Selective Allocation of Channels", ICML 2019.
Paper: proceedings.mlr.press/v97/jeong19c.html

Each dense layer is ``SConv 1x1 (top_k) -> SConv 3x3 (prune only)``, its output
appended to its input. Selection, server-owned gates and pointers, and the
server's de/re-allocation schedule are shared with ``selective_resnet`` and
live in :mod:`fedsim.models._selective_net`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS
from fedsim.models._selective_net import (
    Selection,
    SelectiveNet,
    head_axes,
    nested,
    positive_widths,
)

__all__ = ["SelectiveDenseNet", "selective_densenet"]


class _DenseLayer(nn.Module):
    """``SConv 1x1 (top_k) -> SConv 3x3 (prune only)``; output appended to input."""

    def __init__(
        self, *, in_channels: int, bottleneck: int, growth: int, sel: Selection
    ) -> None:
        super().__init__()
        self.conv1 = sel.conv(in_channels, bottleneck, 1)
        self.conv2 = sel.conv(bottleneck, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv2(self.conv1(x))], dim=1)


class SelectiveDenseNet(SelectiveNet):
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
        self.stem_width = positive_widths("stem", [stem])[0]
        self.growth = [positive_widths(f"growth[{i}]", g) for i, g in enumerate(growth)]
        self.bottleneck = [
            positive_widths(f"bottleneck[{i}]", m) for i, m in enumerate(bottleneck)
        ]
        if not self.growth or [len(g) for g in self.growth] != [
            len(m) for m in self.bottleneck
        ]:
            raise ConfigError(
                f"growth {self.growth} and bottleneck {self.bottleneck} must list "
                "the same number of layers in the same (non-empty) blocks"
            )
        self.realloc_seed = int(realloc_seed)
        sel = Selection(top_k=top_k, gamma=gamma, max_copies=max_copies)
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
            for b, block in enumerate(nested(self.blocks, _DenseLayer))
            for i, layer in enumerate(block)
        ]
        groups: list[PermGroup] = []

        def consumers(first: int, offset: int) -> tuple[AxisRef, ...]:
            refs: list[AxisRef] = []
            for prefix, layer, _, _ in layers[first:]:
                refs += layer.conv1.input_axes(f"{prefix}conv1.", offset)
            return (*refs, *head_axes(offset))

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
