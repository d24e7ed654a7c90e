"""Transformation groups and their canonical coordinates for the ``etn`` model.

Equivariant Transformer Networks (Tai, Bailis & Valiant, ICML 2019,
arXiv:1901.11399) undo a continuous transformation of the input one group at a
time. For a group ``T_theta`` with generator ``v``, canonical coordinates
``rho = (rho_u, rho_v)`` solve ``v . grad rho_u = 1`` and ``v . grad rho_v = 0``,
so ``rho(T_theta p) = rho(p) + (theta, 0)``: in those coordinates the
transformation is a plain translation, which a convolutional pose predictor
can read off equivariantly.

Conventions used by every class here and by :mod:`fedsim.models.etn`:

- Points are ``(x, y)`` in the normalised frame of
  :func:`torch.nn.functional.grid_sample` (``x`` to the right, ``y`` downward,
  the canvas is ``[-1, 1]^2``); fedsim samples with ``align_corners=True``, so
  ``+-1`` are the centres of the border pixels and rotations act about the
  centre of the canvas.
- A transform is a batch of 3x3 homographies acting on points as
  ``p -> (H [p; 1])[:2] / (H [p; 1])[2]`` (:func:`apply_homography`).
- A canonical sampling grid has ``rho_u`` along its width and ``rho_v`` along its
  height. The predicted coordinates (those ``T_theta`` shifts) are the group's
  parameters, ``u`` first. Coordinates that one chart cannot cover (the sign of
  ``x`` under ``x -> e^s x``) live on ``sheets`` stacked along the height, the
  first sheet on top; sheets only occur where the height is not predicted.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = [
    "GROUPS",
    "Axis",
    "Group",
    "HyperbolicRotation",
    "Rotation",
    "RotationScale",
    "Scale",
    "ScaleX",
    "ScaleY",
    "ShearX",
    "ShearY",
    "Translation",
    "apply_homography",
    "homography",
]


@dataclass(frozen=True)
class Axis:
    """One canonical coordinate: its box, periodicity and whether it is predicted.

    Attributes
    ----------
    low, high : float
        The box the sampling grid covers along this coordinate.
    periodic : bool
        The coordinate is an angle: ``high - low`` is one full period and the grid
        leaves out ``high`` (it is ``low`` again).
    predicted : bool
        The group shifts this coordinate, so the pose predictor estimates it.
    """

    low: float
    high: float
    periodic: bool = False
    predicted: bool = False

    @property
    def half_range(self) -> float:
        """Half the box width: the scale from normalised to box units."""
        return (self.high - self.low) / 2.0

    def positions(
        self, n: int, *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Normalised positions of ``n`` grid samples, spanning ``[-1, 1]``.

        Periodic axes use ``-1 + 2 i / n`` (the last sample is one step short of
        ``+1``), the others ``-1 + 2 i / (n - 1)``.
        """
        i = torch.arange(n, dtype=dtype, device=device)
        if self.periodic:
            return -1.0 + 2.0 * i / n
        return -1.0 + 2.0 * i / max(n - 1, 1)

    def samples(
        self, n: int, *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Coordinate values of ``n`` grid samples covering the box."""
        centre = (self.low + self.high) / 2.0
        return centre + self.half_range * self.positions(n, dtype=dtype, device=device)


def homography(
    entries: Sequence[torch.Tensor | float], like: torch.Tensor
) -> torch.Tensor:
    """A batch of 3x3 matrices from nine row-major entries.

    Parameters
    ----------
    entries : sequence of Tensor or float
        Nine entries; tensors have shape ``(N,)``, floats are broadcast.
    like : Tensor
        Shape ``(N,)``; gives the batch size, dtype and device.

    Returns
    -------
    Tensor
        Shape ``(N, 3, 3)``. Built without in-place writes, so it runs under
        :mod:`torch.func`.
    """
    if len(entries) != 9:
        raise ValueError(f"a homography needs 9 entries, got {len(entries)}")
    cols = [
        e if isinstance(e, torch.Tensor) else torch.full_like(like, float(e))
        for e in entries
    ]
    return torch.stack(cols, dim=-1).reshape(like.shape[0], 3, 3)


def apply_homography(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points through a batch of homographies.

    Parameters
    ----------
    matrix : Tensor
        Shape ``(N, 3, 3)``.
    points : Tensor
        Shape ``(N, ..., 2)``.

    Returns
    -------
    Tensor
        Same shape as ``points``.
    """
    ones = torch.ones_like(points[..., :1])
    lifted = torch.cat([points, ones], dim=-1)
    flat = lifted.reshape(points.shape[0], -1, 3)
    mapped = torch.bmm(flat, matrix.transpose(1, 2)).reshape(lifted.shape)
    return mapped[..., :2] / mapped[..., 2:]


class Group(abc.ABC):
    """A transformation group acting on the canvas, with its canonical coordinates.

    Subclasses set ``name``, the two :class:`Axis` ``u`` (grid width) and ``v``
    (grid height), ``sheets``, and implement the coordinate maps and
    :meth:`matrix`.
    """

    name: ClassVar[str]
    u: ClassVar[Axis]
    v: ClassVar[Axis]
    sheets: ClassVar[int] = 1

    @property
    def axes(self) -> tuple[Axis, Axis]:
        """``(u, v)``: the width axis, then the height axis of the grid."""
        return (self.u, self.v)

    @property
    def num_params(self) -> int:
        """How many coordinates the group shifts (1 or 2)."""
        return int(self.u.predicted) + int(self.v.predicted)

    @abc.abstractmethod
    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        """``rho(p)``: points ``(..., 2)`` to canonical coordinates ``(..., 2)``."""

    @abc.abstractmethod
    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        """``rho^-1``: canonical coordinates ``(..., 2)`` on ``sheet`` to points."""

    def sheet(self, points: torch.Tensor) -> torch.Tensor:
        """Which sheet (``+1`` or ``-1``) each point lies on; ``+1`` for one chart."""
        return torch.ones_like(points[..., 0])

    @abc.abstractmethod
    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        """``T_theta`` as homographies ``(N, 3, 3)`` for params ``(N, num_params)``."""

    def grid(
        self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``rho^-1`` of a regular grid over the box: points of shape ``(H, W, 2)``.

        With two sheets the top ``ceil(H / 2)`` rows cover the box on sheet
        ``+1`` and the rest cover it again on sheet ``-1``.
        """
        h, w = (int(n) for n in size)
        us = self.u.samples(w, dtype=dtype, device=device)
        if self.sheets == 1:
            vs = self.v.samples(h, dtype=dtype, device=device)
            sheet = torch.ones(h, dtype=dtype, device=device)
        else:
            top, bottom = (h + 1) // 2, h // 2
            vs = torch.cat(
                [
                    self.v.samples(top, dtype=dtype, device=device),
                    self.v.samples(bottom, dtype=dtype, device=device),
                ]
            )
            sheet = torch.cat(
                [
                    torch.ones(top, dtype=dtype, device=device),
                    -torch.ones(bottom, dtype=dtype, device=device),
                ]
            )
        coords = torch.stack(torch.meshgrid(vs, us, indexing="ij")[::-1], dim=-1)
        return self.from_canonical(coords, sheet[:, None].expand(h, w))


def _angle(points: torch.Tensor) -> torch.Tensor:
    return torch.atan2(points[..., 1], points[..., 0])


def _radius(points: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(points, dim=-1)


class Translation(Group):
    """``p -> p + (t_x, t_y)``; canonical coordinates are ``(x, y)`` themselves."""

    name = "translation"
    u = Axis(-1.0, 1.0, predicted=True)
    v = Axis(-1.0, 1.0, predicted=True)

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        return points

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        return coords

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        tx, ty = params[:, 0], params[:, 1]
        return homography([1, 0, tx, 0, 1, ty, 0, 0, 1], tx)


class Rotation(Group):
    """``p -> R_theta p`` about the centre; polar coordinates ``(angle, r)``."""

    name = "rotation"
    u = Axis(-math.pi, math.pi, periodic=True, predicted=True)
    v = Axis(0.0, math.sqrt(2.0))

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        return torch.stack([_angle(points), _radius(points)], dim=-1)

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        a, r = coords[..., 0], coords[..., 1]
        return torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=-1)

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        c, s = torch.cos(params[:, 0]), torch.sin(params[:, 0])
        return homography([c, -s, 0, s, c, 0, 0, 0, 1], c)


class Scale(Group):
    """``p -> e^s p``; log-polar coordinates ``(log r, angle)``."""

    name = "scale"
    u = Axis(-math.log(10.0), math.log(2.0) / 2.0, predicted=True)
    v = Axis(-math.pi, math.pi, periodic=True)

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.log(_radius(points)), _angle(points)], dim=-1)

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        r, a = torch.exp(coords[..., 0]), coords[..., 1]
        return torch.stack([r * torch.cos(a), r * torch.sin(a)], dim=-1)

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        k = torch.exp(params[:, 0])
        return homography([k, 0, 0, 0, k, 0, 0, 0, 1], k)


class RotationScale(Scale):
    """``p -> e^s R_theta p``; log-polar coordinates, both predicted ``(s, theta)``."""

    name = "rotation_scale"
    v = Axis(-math.pi, math.pi, periodic=True, predicted=True)

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        k = torch.exp(params[:, 0])
        c, s = k * torch.cos(params[:, 1]), k * torch.sin(params[:, 1])
        return homography([c, -s, 0, s, c, 0, 0, 0, 1], c)


class ShearX(Group):
    """``(x, y) -> (x + s y, y)``; canonical coordinates ``(x / y, y)``."""

    name = "shear_x"
    u = Axis(-5.0, 5.0, predicted=True)
    v = Axis(-1.0, 1.0)

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        x, y = points[..., 0], points[..., 1]
        return torch.stack([x / y, y], dim=-1)

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        ratio, y = coords[..., 0], coords[..., 1]
        return torch.stack([ratio * y, y], dim=-1)

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        s = params[:, 0]
        return homography([1, s, 0, 0, 1, 0, 0, 0, 1], s)


class ShearY(Group):
    """``(x, y) -> (x, y + s x)``; canonical coordinates ``(y / x, x)``."""

    name = "shear_y"
    u = Axis(-5.0, 5.0, predicted=True)
    v = Axis(-1.0, 1.0)

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        x, y = points[..., 0], points[..., 1]
        return torch.stack([y / x, x], dim=-1)

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        ratio, x = coords[..., 0], coords[..., 1]
        return torch.stack([x, ratio * x], dim=-1)

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        s = params[:, 0]
        return homography([1, 0, 0, s, 1, 0, 0, 0, 1], s)


class ScaleX(Group):
    """``(x, y) -> (e^s x, y)``; ``(log|x|, y)`` on the sheets ``sign(x)``."""

    name = "scale_x"
    u = Axis(-math.log(10.0), 0.0, predicted=True)
    v = Axis(-1.0, 1.0)
    sheets = 2

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        x, y = points[..., 0], points[..., 1]
        return torch.stack([torch.log(x.abs()), y], dim=-1)

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        return torch.stack([sheet * torch.exp(coords[..., 0]), coords[..., 1]], dim=-1)

    def sheet(self, points: torch.Tensor) -> torch.Tensor:
        return torch.sign(points[..., 0])

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        k = torch.exp(params[:, 0])
        return homography([k, 0, 0, 0, 1, 0, 0, 0, 1], k)


class ScaleY(Group):
    """``(x, y) -> (x, e^s y)``; ``(log|y|, x)`` on the sheets ``sign(y)``."""

    name = "scale_y"
    u = Axis(-math.log(10.0), 0.0, predicted=True)
    v = Axis(-1.0, 1.0)
    sheets = 2

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        x, y = points[..., 0], points[..., 1]
        return torch.stack([torch.log(y.abs()), x], dim=-1)

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        return torch.stack([coords[..., 1], sheet * torch.exp(coords[..., 0])], dim=-1)

    def sheet(self, points: torch.Tensor) -> torch.Tensor:
        return torch.sign(points[..., 1])

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        k = torch.exp(params[:, 0])
        return homography([1, 0, 0, 0, k, 0, 0, 0, 1], k)


class HyperbolicRotation(Group):
    """``(x, y) -> (e^s x, e^-s y)``; ``(ln|x / y| / 2, sign(x) sqrt|xy|)``.

    The orbits are hyperbola branches; the sheet ``sign(xy)`` tells the branches
    through quadrants 1 and 3 from those through quadrants 2 and 4.
    """

    name = "hyperbolic_rotation"
    u = Axis(-math.log(6.0), math.log(6.0), predicted=True)
    v = Axis(-math.sqrt(0.5), math.sqrt(0.5))
    sheets = 2

    def to_canonical(self, points: torch.Tensor) -> torch.Tensor:
        x, y = points[..., 0], points[..., 1]
        ratio = 0.5 * torch.log((x / y).abs())
        return torch.stack([ratio, torch.sign(x) * (x * y).abs().sqrt()], dim=-1)

    def from_canonical(self, coords: torch.Tensor, sheet: torch.Tensor) -> torch.Tensor:
        k, m = torch.exp(coords[..., 0]), coords[..., 1]
        return torch.stack([m * k, sheet * m / k], dim=-1)

    def sheet(self, points: torch.Tensor) -> torch.Tensor:
        return torch.sign(points[..., 0] * points[..., 1])

    def matrix(self, params: torch.Tensor) -> torch.Tensor:
        k = torch.exp(params[:, 0])
        return homography([k, 0, 0, 0, 1 / k, 0, 0, 0, 1], k)


GROUPS: dict[str, Group] = {
    g.name: g
    for g in (
        Translation(),
        Rotation(),
        Scale(),
        RotationScale(),
        ShearX(),
        ShearY(),
        ScaleX(),
        ScaleY(),
        HyperbolicRotation(),
    )
}
"""Every group by name: the choices for the ``ets`` option of ``etn``."""
