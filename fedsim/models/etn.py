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
from fedsim.models._etn_transforms import GROUPS, Axis, Group, apply_homography

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


def pad(x: torch.Tensor, dim: int, amount: int, periodic: bool) -> torch.Tensor:
    """Pad ``amount`` samples on both sides of ``dim``: wrapped if periodic, else 0."""
    if amount == 0:
        return x
    n = x.shape[dim]
    if periodic:
        return torch.cat(
            [x.narrow(dim, n - amount, amount), x, x.narrow(dim, 0, amount)], dim=dim
        )
    shape = list(x.shape)
    shape[dim] = amount
    zeros = x.new_zeros(shape)
    return torch.cat([zeros, x, zeros], dim=dim)


def resample(
    x: torch.Tensor, transform: torch.Tensor, group: Group, size: Sequence[int]
) -> torch.Tensor:
    """Images ``x`` sampled at ``transform(rho^-1(grid))`` on ``group``'s grid.

    Bilinear, zero outside the canvas, ``align_corners=True``; the output has
    the grid's ``(H, W) = size``.
    """
    grid = group.grid(size, dtype=x.dtype, device=x.device)
    points = apply_homography(transform, grid.expand(x.shape[0], -1, -1, -1))
    return F.grid_sample(
        x, points, mode="bilinear", padding_mode="zeros", align_corners=True
    )


def circular_mean(weights: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Weighted mean of angles ``pi * positions``, divided by ``pi``; in ``(-1, 1]``."""
    angles = torch.pi * positions
    sin = (weights * torch.sin(angles)).sum(-1)
    cos = (weights * torch.cos(angles)).sum(-1)
    return torch.atan2(sin, cos) / torch.pi


class PosePredictor(nn.Module):
    """Translation-equivariant estimate of the predicted canonical coordinates.

    ``conv3x3 -> BN -> LeakyReLU(0.1)`` twice (strides ``strides``); then, for
    each predicted axis, a max-pool over the other axis, a 1-D ``conv3`` to one
    channel, a softmax heatmap over positions, and its centroid (a circular
    mean on periodic axes) plus a learnt offset ``tanh(offset)``. Heatmap entry
    ``j`` sits on input sample ``j * stride1 * stride2``, whose normalised
    position (:meth:`Axis.positions`) it carries. Padding wraps
    around periodic axes, so shifting the input by a multiple of the total
    stride along a periodic axis shifts the heatmap exactly.

    Parameters
    ----------
    axes : tuple of Axis
        ``(u, v)`` of the canonical grid (width, height).
    in_channels : int
        Input channels.
    widths : sequence of int
        The two conv widths.
    strides : sequence of int
        The two conv strides.
    """

    def __init__(
        self,
        *,
        axes: tuple[Axis, Axis],
        in_channels: int,
        widths: Sequence[int],
        strides: Sequence[int],
    ) -> None:
        super().__init__()
        c1, c2 = (int(w) for w in widths)
        self.axes = axes
        self.strides = tuple(int(s) for s in strides)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=self.strides[0], bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=self.strides[1], bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.predicted = [i for i, a in enumerate(axes) if a.predicted]
        self.heads = nn.ModuleList(
            nn.Conv1d(c2, 1, 3, bias=False) for _ in self.predicted
        )
        self.offset = nn.Parameter(torch.zeros(len(self.predicted)))

    def _conv(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        # dims 3 (width, axis u) and 2 (height, axis v)
        x = pad(x, 3, 1, self.axes[0].periodic)
        return conv(pad(x, 2, 1, self.axes[1].periodic))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised coordinates ``(N, num_predicted)`` and the heatmaps.

        A coordinate of ``c`` means ``c * half_range`` in the axis' own units.
        """
        size = (x.shape[3], x.shape[2])
        h = F.leaky_relu(self.bn1(self._conv(x, self.conv1)), 0.1)
        h = F.leaky_relu(self.bn2(self._conv(h, self.conv2)), 0.1)
        step = self.strides[0] * self.strides[1]
        coords, maps = [], []
        for k, (i, head) in enumerate(zip(self.predicted, self.heads, strict=True)):
            axis = self.axes[i]
            # pool over the other axis: u (i=0) keeps width, v (i=1) keeps height
            profile = h.amax(dim=2 if i == 0 else 3)
            logits = head(pad(profile, 2, 1, axis.periodic)).squeeze(1)
            heat = torch.softmax(logits, dim=-1)
            full = axis.positions(size[i], dtype=x.dtype, device=x.device)
            positions = full[::step]
            if axis.periodic:
                centre = circular_mean(heat, positions)
            else:
                centre = (heat * positions).sum(-1)
            coords.append(centre + torch.tanh(self.offset[k]))
            maps.append(heat)
        return torch.stack(coords, dim=-1), maps


class EquivariantTransformer(nn.Module):
    """One ET layer: sample on the group's canonical grid, predict, compose.

    Parameters
    ----------
    group : Group
        The transformation group this layer undoes.
    in_channels : int
        Input channels.
    grid_size : sequence of int
        ``(H, W)`` of the canonical grid the predictor sees.
    widths, strides : sequence of int
        The pose predictor's two conv widths and strides.
    """

    def __init__(
        self,
        *,
        group: Group,
        in_channels: int,
        grid_size: Sequence[int],
        widths: Sequence[int],
        strides: Sequence[int],
    ) -> None:
        super().__init__()
        self.group = group
        self.grid_size = tuple(int(n) for n in grid_size)
        self.predictor = PosePredictor(
            axes=group.axes, in_channels=in_channels, widths=widths, strides=strides
        )

    def sample(self, x: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
        """``x`` sampled at ``transform(rho^-1(grid))``: the predictor's input."""
        return resample(x, transform, self.group, self.grid_size)

    def params(self, canonical: torch.Tensor) -> torch.Tensor:
        """Group parameters ``(N, num_params)`` predicted from a canonical sample."""
        coords, _ = self.predictor(canonical)
        scale = [a.half_range for a in self.group.axes if a.predicted]
        return coords * torch.tensor(scale, dtype=coords.dtype, device=coords.device)

    def forward(
        self, x: torch.Tensor, transform: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The composed transform ``T_prev . T_theta`` and ``theta``."""
        theta = self.params(self.sample(x, transform))
        return torch.bmm(transform, self.group.matrix(theta)), theta


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
