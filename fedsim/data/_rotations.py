"""Rotating and scaling image batches about their centre (rotated-MNIST style data).

Pure torch functions, used to build the ``mnist5k_rot`` dataset (this module
registers nothing; the leading underscore keeps it out of dataset discovery):
every image is turned by an angle and magnified by a factor about the centre
of the canvas, with bilinear interpolation (``align_corners=True``, so ``+-1``
are the centres of the border pixels and a quarter turn of a square image
moves pixels exactly onto pixels) and zeros where the source lies outside the
canvas.

Angles are in radians; a positive angle turns the picture counterclockwise as
displayed (row 0 at the top), the sense of ``torch.rot90(x, 1, dims=(-2, -1))``.
In the ``(x right, y down)`` frame of :mod:`fedsim.models._etn_transforms` that
moves content by the rotation matrix of ``-angle``.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

__all__ = ["random_rotate_scale", "rotate_scale"]


def rotate_scale(
    x: torch.Tensor, *, angles: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Rotate image ``i`` by ``angles[i]`` and magnify it by ``scales[i]``.

    Parameters
    ----------
    x : Tensor
        Images ``(N, C, H, W)``, floating point.
    angles : Tensor
        ``(N,)`` radians, counterclockwise as displayed.
    scales : Tensor
        ``(N,)`` positive magnifications (``2`` doubles the size of the content).

    Returns
    -------
    Tensor
        ``(N, C, H, W)``: output pixel ``p`` reads the input at ``R p / scale``,
        where ``R`` rotates the ``(x, y-down)`` frame by ``angle``.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating-point (N, C, H, W) batch, got {x.dtype} "
            f"of shape {tuple(x.shape)}"
        )
    n = x.shape[0]
    if angles.shape != (n,) or scales.shape != (n,):
        raise ValueError(
            f"angles and scales must have shape ({n},), got {tuple(angles.shape)} "
            f"and {tuple(scales.shape)}"
        )
    if not bool((scales > 0).all()):
        raise ValueError(f"scales must be positive, got minimum {float(scales.min())}")
    a = angles.to(x.dtype)
    s = scales.to(x.dtype)
    c, d = torch.cos(a) / s, torch.sin(a) / s
    zero = torch.zeros_like(c)
    theta = torch.stack(
        [torch.stack([c, -d, zero], -1), torch.stack([d, c, zero], -1)], dim=1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(
        x, grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )


def random_rotate_scale(
    x: torch.Tensor,
    *,
    max_angle: float,
    log_scale_range: tuple[float, float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate and scale each image by a random angle and factor about its centre.

    Parameters
    ----------
    x : Tensor
        Images ``(N, C, H, W)``, floating point.
    max_angle : float
        Angles are uniform on ``[-max_angle, max_angle]`` radians (``math.pi`` for
        every orientation).
    log_scale_range : tuple of float
        ``(low, high)``: ``log(scale)`` is uniform on this interval (``(0, 0)``
        keeps the size).
    generator : torch.Generator
        The source of randomness.

    Returns
    -------
    tuple of Tensor
        The transformed images, the angles ``(N,)`` and the scales ``(N,)``
        (in the dtype of ``x``).
    """
    if not math.isfinite(max_angle) or max_angle < 0:
        raise ValueError(f"max_angle must be a finite angle >= 0, got {max_angle}")
    low, high = (float(v) for v in log_scale_range)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(
            f"log_scale_range must be finite (low, high) with low <= high, "
            f"got {tuple(log_scale_range)}"
        )
    n = x.shape[0] if x.ndim == 4 else 0
    u = torch.rand(2, n, generator=generator, dtype=torch.float64)
    angles = (2.0 * u[0] - 1.0) * max_angle
    scales = torch.exp(low + (high - low) * u[1])
    out = rotate_scale(x, angles=angles, scales=scales)
    return out, angles.to(x.dtype), scales.to(x.dtype)
