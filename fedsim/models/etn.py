"""Equivariant Transformer Network: pose-canonicalising layers in front of a CNN.

Tai, Bailis & Valiant, "Equivariant Transformer Networks", ICML 2019,
arXiv:1901.11399. Each equivariant transformer (ET) layer samples the input
through the transform composed so far onto the canonical coordinates of its
group (:mod:`fedsim.models._etn_transforms`), where the group acts by
translation; a convolutional pose predictor, equivariant to those translations,
estimates the group parameter ``theta`` and the layer composes
``T = T_prev . T_theta``. The input is then sampled once through the final
transform onto the classifier grid and classified by a small CNN, so
transforming the input by a group element leaves the classifier's input
(nearly) unchanged.

Code: this module registers ``etn`` and holds the network and its classifier;
the ET layer (canonical-grid sampling, pose predictor, composition) is in
:mod:`fedsim.models._etn_layer` and re-exported here.

Every ``grid_sample`` uses ``align_corners=True`` and zero padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS
from fedsim.models._etn_layer import (
    EquivariantTransformer,
    PosePredictor,
    pad,
    resample,
)

# names etn.py defined or imported before the ET layer moved out stay importable
from fedsim.models._etn_layer import circular_mean as circular_mean
from fedsim.models._etn_transforms import GROUPS, Axis

__all__ = [
    "ETN",
    "CanonicalCNN",
    "EquivariantTransformer",
    "PosePredictor",
    "etn",
    "resample",
]

CLASSIFIER_GRIDS = {"identity": "translation", "polar": "rotation", "logpolar": "scale"}
"""Classifier grid names and the group whose canonical coordinates they use."""


class CanonicalCNN(nn.Module):
    """Small CNN for images on a canonical grid, wrapping around periodic axes.

    Blocks ``conv3x3 (no bias) -> BN -> ReLU -> avg-pool 2x2`` (no pool once a
    side is 1), then a global average pool and a Linear head.

    Parameters
    ----------
    axes : tuple of Axis
        ``(u, v)`` of the grid (only their periodicity is used).
    in_channels : int
        Input channels.
    grid_size : sequence of int
        ``(H, W)`` of the input.
    channels : sequence of int
        Conv widths.
    num_classes : int
        Output size.
    """

    def __init__(
        self,
        *,
        axes: tuple[Axis, Axis],
        in_channels: int,
        grid_size: Sequence[int],
        channels: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.periodic = (axes[0].periodic, axes[1].periodic)
        self.channels = [int(c) for c in channels]
        h, w = (int(n) for n in grid_size)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.pools: list[bool] = []
        c = in_channels
        for width in self.channels:
            self.convs.append(nn.Conv2d(c, width, 3, bias=False))
            self.bns.append(nn.BatchNorm2d(width))
            self.pools.append(min(h, w) >= 2)
            h, w = (h // 2, w // 2) if self.pools[-1] else (h, w)
            c = width
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn, pool in zip(self.convs, self.bns, self.pools, strict=True):
            x = pad(pad(x, 3, 1, self.periodic[0]), 2, 1, self.periodic[1])
            x = torch.relu(bn(conv(x)))
            if pool:
                x = F.avg_pool2d(x, 2)
        return self.head(x.mean(dim=(2, 3)))


class ETN(nn.Module):
    """ET layers composed in order, then one resampling and a CNN classifier.

    Parameters
    ----------
    input_shape : sequence of int
        (C, H, W).
    num_classes : int
        Output size.
    ets : sequence of str
        Group names, applied in this order (see ``GROUPS``).
    nf : sequence of sequence of int
        One ``[conv1, conv2]`` width pair per ET for its pose predictor.
    strides : sequence of int
        The pose predictors' two conv strides.
    grid_size : sequence of int
        ``(H, W)`` of the ETs' canonical grids.
    classifier_grid : str
        ``identity``, ``polar`` or ``logpolar``.
    classifier_grid_size : sequence of int
        ``(H, W)`` of the classifier grid.
    classifier_channels : sequence of int
        Conv widths of the classifier.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        ets: Sequence[str],
        nf: Sequence[Sequence[int]],
        strides: Sequence[int],
        grid_size: Sequence[int],
        classifier_grid: str,
        classifier_grid_size: Sequence[int],
        classifier_channels: Sequence[int],
    ) -> None:
        super().__init__()
        channels = int(input_shape[0])
        self.nf = [[int(w) for w in pair] for pair in nf]
        self.groups = [GROUPS[name] for name in ets]
        self.ets = nn.ModuleList(
            EquivariantTransformer(
                group=group,
                in_channels=channels,
                grid_size=grid_size,
                widths=widths,
                strides=strides,
            )
            for group, widths in zip(self.groups, self.nf, strict=True)
        )
        self.classifier_group = GROUPS[CLASSIFIER_GRIDS[classifier_grid]]
        self.classifier_grid_size = tuple(int(n) for n in classifier_grid_size)
        self.classifier = CanonicalCNN(
            axes=self.classifier_group.axes,
            in_channels=channels,
            grid_size=self.classifier_grid_size,
            channels=classifier_channels,
            num_classes=num_classes,
        )

    def pose(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final transform ``(N, 3, 3)`` and every ET's parameters, in order."""
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        transform = eye.expand(x.shape[0], 3, 3)
        thetas = []
        for layer in self.ets:
            transform, theta = layer(x, transform)
            thetas.append(theta)
        return transform, thetas

    def canonicalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` sampled through the final transform onto the classifier grid."""
        transform, _ = self.pose(x)
        return resample(x, transform, self.classifier_group, self.classifier_grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.canonicalize(x))

    def permutation_spec(self) -> PermutationSpec:
        """Pose-predictor channels of every ET, then the classifier's conv channels.

        Spatial, heatmap and offset axes are not permutable.
        """
        groups = []
        for i, (group, (c1, c2)) in enumerate(zip(self.groups, self.nf, strict=True)):
            p = f"ets.{i}.predictor"
            heads = [
                AxisRef(f"{p}.heads.{k}.weight", 1) for k in range(group.num_params)
            ]
            groups += [
                _conv_group(
                    f"ets.{i}.conv1",
                    c1,
                    (f"{p}.conv1.weight", f"{p}.bn1"),
                    [AxisRef(f"{p}.conv2.weight", 1)],
                    f"nf.{i}.0",
                ),
                _conv_group(
                    f"ets.{i}.conv2",
                    c2,
                    (f"{p}.conv2.weight", f"{p}.bn2"),
                    heads,
                    f"nf.{i}.1",
                ),
            ]
        last = len(self.classifier.channels) - 1
        for i, width in enumerate(self.classifier.channels):
            after = "head" if i == last else f"convs.{i + 1}"
            groups.append(
                _conv_group(
                    f"classifier.{i}",
                    width,
                    (f"classifier.convs.{i}.weight", f"classifier.bns.{i}"),
                    [AxisRef(f"classifier.{after}.weight", 1)],
                    f"classifier_channels.{i}",
                )
            )
        return PermutationSpec(tuple(groups))


def _conv_group(
    name: str,
    size: int,
    producer: tuple[str, str],
    consumers: list[AxisRef],
    width_key: str,
) -> PermGroup:
    """A conv's output channels: its weight rows, its BatchNorm and the consumers.

    ``producer`` is ``(conv weight key, BatchNorm prefix)``.
    """
    weight, bn = producer
    stats = ("weight", "bias", "running_mean", "running_var")
    return PermGroup(
        name=name,
        size=size,
        axes=(
            AxisRef(weight, 0),
            *(AxisRef(f"{bn}.{t}", 0) for t in stats),
            *consumers,
        ),
        width_key=width_key,
    )


def _pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    """Validate an ``(H, W)`` or two-stride option."""
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ConfigError(f"{name} must be two positive integers, got {list(value)}")
    return pair[0], pair[1]


@MODELS.register("etn")
def etn(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    ets: Sequence[str] = ("translation", "shear_x", "hyperbolic_rotation"),
    nf: Sequence[Sequence[int]] = ((16, 16), (16, 16), (16, 16)),
    strides: Sequence[int] = (2, 1),
    grid_size: Sequence[int] | None = None,
    classifier_grid: str = "logpolar",
    classifier_grid_size: Sequence[int] | None = None,
    classifier_channels: Sequence[int] = (16, 32, 32),
) -> ETN:
    """Registered ``etn``; grid sizes default to the input's ``(H, W)``.

    The defaults follow the paper's small-image setting (28x28 grey: translation,
    shear and hyperbolic-rotation ETs, log-polar classifier grid). For a pure
    rotation model on 8x8 digits use ``ets=[rotation]``, ``nf=[[8, 8]]``,
    ``grid_size=[16, 16]`` and ``classifier_grid=identity``.
    """
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {list(input_shape)}")
    unknown = [name for name in ets if name not in GROUPS]
    if unknown:
        raise ConfigError(
            f"unknown ET {unknown[0]!r}; choose from: {', '.join(GROUPS)}"
        )
    if len(nf) != len(ets) or any(len(p) != 2 or min(p) < 1 for p in nf):
        raise ConfigError(
            f"nf must hold one [conv1, conv2] pair of positive widths per ET "
            f"({len(ets)} ETs: {list(ets)}), got {[list(p) for p in nf]}"
        )
    if classifier_grid not in CLASSIFIER_GRIDS:
        raise ConfigError(
            f"unknown classifier_grid {classifier_grid!r}; choose from: "
            f"{', '.join(CLASSIFIER_GRIDS)}"
        )
    if not classifier_channels or min(classifier_channels) < 1:
        raise ConfigError(
            "classifier_channels must be one or more positive widths, got "
            f"{list(classifier_channels)}"
        )
    image = (int(input_shape[1]), int(input_shape[2]))
    return ETN(
        input_shape=input_shape,
        num_classes=num_classes,
        ets=list(ets),
        nf=[list(p) for p in nf],
        strides=_pair("strides", strides),
        grid_size=_pair("grid_size", image if grid_size is None else grid_size),
        classifier_grid=classifier_grid,
        classifier_grid_size=_pair(
            "classifier_grid_size",
            image if classifier_grid_size is None else classifier_grid_size,
        ),
        classifier_channels=list(classifier_channels),
    )
