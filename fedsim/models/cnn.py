"""Small VGG-style CNN: conv3x3 + BatchNorm + ReLU + max-pool blocks, then an MLP."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS

__all__ = ["CNN", "cnn"]


class CNN(nn.Module):
    """Conv blocks of widths ``channels``, then Linear layers of widths ``hidden``.

    Each block is ``conv3x3 (no bias) -> BatchNorm -> ReLU -> max-pool 2x2``;
    the pool is skipped once the feature map is a single pixel wide. The head
    flattens channel-major, so the first Linear layer's input columns come in
    blocks of ``h * w`` per channel.

    Parameters
    ----------
    input_shape : sequence of int
        (C, H, W).
    channels : sequence of int
        Conv widths, input side first (at least one).
    hidden : sequence of int
        Widths of the hidden Linear layers of the head.
    num_classes : int
        Output size.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        channels: Sequence[int],
        hidden: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("a cnn needs at least one conv width in channels")
        c, h, w = (int(v) for v in input_shape)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.pools: list[bool] = []
        for width in channels:
            self.convs.append(nn.Conv2d(c, int(width), 3, padding=1, bias=False))
            self.bns.append(nn.BatchNorm2d(int(width)))
            pool = min(h, w) >= 2
            self.pools.append(pool)
            if pool:
                h, w = h // 2, w // 2
            c = int(width)
        self.spatial = h * w
        self.channels = [int(v) for v in channels]
        self.hidden = [int(v) for v in hidden]
        sizes = [c * self.spatial, *[int(v) for v in hidden], num_classes]
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn, pool in zip(self.convs, self.bns, self.pools, strict=True):
            x = torch.relu(bn(conv(x)))
            if pool:
                x = nn.functional.max_pool2d(x, 2)
        x = x.flatten(1)
        for fc in self.fcs[:-1]:
            x = torch.relu(fc(x))
        return self.fcs[-1](x)

    def permutation_spec(self) -> PermutationSpec:
        """One group per conv (with its BatchNorm) and one per hidden Linear layer."""
        groups = []
        last = len(self.channels) - 1
        for i, width in enumerate(self.channels):
            bn = f"bns.{i}"
            following = (
                AxisRef(f"convs.{i + 1}.weight", 1)
                if i < last
                else AxisRef("fcs.0.weight", 1, block=self.spatial)
            )
            groups.append(
                PermGroup(
                    name=f"conv.{i}",
                    size=width,
                    axes=(
                        AxisRef(f"convs.{i}.weight", 0),
                        AxisRef(f"{bn}.weight", 0),
                        AxisRef(f"{bn}.bias", 0),
                        AxisRef(f"{bn}.running_mean", 0),
                        AxisRef(f"{bn}.running_var", 0),
                        following,
                    ),
                    width_key=f"channels.{i}",
                )
            )
        for i, width in enumerate(self.hidden):
            groups.append(
                PermGroup(
                    name=f"hidden.{i}",
                    size=width,
                    axes=(
                        AxisRef(f"fcs.{i}.weight", 0),
                        AxisRef(f"fcs.{i}.bias", 0),
                        AxisRef(f"fcs.{i + 1}.weight", 1),
                    ),
                    width_key=f"hidden.{i}",
                )
            )
        return PermutationSpec(tuple(groups))


@MODELS.register("cnn")
def cnn(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    hidden: Sequence[int] = (128,),
) -> CNN:
    """Registered ``cnn``: conv widths and head widths as lists."""
    return CNN(
        input_shape=input_shape,
        channels=list(channels),
        hidden=list(hidden),
        num_classes=num_classes,
    )
