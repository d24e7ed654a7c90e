"""One equivariant transformer (ET) layer of the ``etn`` model.

Equivariant Transformer Networks (Tai, Bailis & Valiant, ICML 2019,
arXiv:1901.11399) undo a transformation group one layer at a time. An ET layer,
given the transform ``T_prev`` composed by the layers before it, samples the
input at ``T_prev(rho^-1(grid))`` on its group's canonical grid
(:func:`resample`), where the group acts by translation; a
translation-equivariant :class:`PosePredictor` reads the group parameter
``theta`` off that sample (softmax heatmaps and their centroids, wrapping around
periodic axes through :func:`pad` and :func:`circular_mean`); the layer returns
``T_prev . T_theta`` (:class:`EquivariantTransformer`). The groups, their
canonical coordinates and the homographies live in
:mod:`fedsim.models._etn_transforms`; the network that stacks these layers in
front of a classifier is :mod:`fedsim.models.etn`. The leading underscore keeps
this module out of model discovery.

Every ``grid_sample`` uses ``align_corners=True`` and zero padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.models._etn_transforms import Axis, Group, apply_homography

__all__ = [
    "EquivariantTransformer",
    "PosePredictor",
    "circular_mean",
    "pad",
    "resample",
]


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
