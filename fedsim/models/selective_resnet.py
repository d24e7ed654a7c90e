"""Selective-channel ResNet: pre-activation bottlenecks of selective convolutions.

Jeong & Shin, "Training CNNs with Selective Allocation of Channels", ICML 2019.
Paper: proceedings.mlr.press/v97/jeong19c.html

Each bottleneck is ``SConv 1x1 (top_k) -> SConv 3x3 (prune only) -> SConv 1x1
(top_k)`` with a zero-padded shortcut. Selection, server-owned gates and
pointers, and the server's de/re-allocation schedule are shared with
``selective_densenet`` and live in :mod:`fedsim.models._selective_net`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

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

__all__ = ["SelectiveResNet", "selective_resnet"]


class _Bottleneck(nn.Module):
    """Pre-activation bottleneck: ``1x1 (top_k) -> 3x3 (prune) -> 1x1 (top_k)``.

    The shortcut is the input zero-padded with channels at the end to the
    output width, so a stage's new channels are appended to the stream.
    """

    def __init__(
        self, *, in_channels: int, out_channels: int, mid: list[int], sel: Selection
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


class SelectiveResNet(SelectiveNet):
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
        self.stem_width = positive_widths("stem", [stem])[0]
        self.added = positive_widths("added", added)
        self.bottleneck = [
            [
                positive_widths(f"bottleneck[{s}][{j}]", mid)
                for j, mid in enumerate(stage)
            ]
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
        sel = Selection(top_k=top_k, gamma=gamma, max_copies=max_copies)
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
            for s, stage in enumerate(nested(self.stages, _Bottleneck))
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
                    axes=(producer, *refs, *head_axes(offset)),
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
