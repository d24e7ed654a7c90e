"""Poisson problems on the unit square: a finite-difference solver and a generator.

The steady-state heat equation ``-Laplace(u) = f`` on ``[0, 1]^2`` with
``u = 0`` on the boundary, discretised on the ``n x n`` interior nodes of a
uniform grid of spacing ``h = 1 / (n + 1)``: entry ``[i, j]`` of a field is its
value at ``x = (j + 1) h``, ``y = (i + 1) h`` (rows are y). The 5-point stencil
makes the error of the discrete solution O(h^2) for smooth solutions.

These are the regression problems of Graph Element Networks (``fedsim.models.gen``):
a source field in, the solution field out. The functions are pure; the dataset
wrapper registers them.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

__all__ = ["generate_poisson", "solve_poisson"]


def solve_poisson(source: np.ndarray, *, h: float | None = None) -> np.ndarray:
    """Solve ``-Laplace(u) = source`` with zero Dirichlet boundary values.

    Parameters
    ----------
    source : numpy.ndarray
        (n, n) right-hand side at the interior grid nodes.
    h : float, optional
        Grid spacing; defaults to ``1 / (n + 1)``, the unit square.

    Returns
    -------
    numpy.ndarray
        (n, n) float64 solution at the same nodes.
    """
    f = np.asarray(source, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] != f.shape[1] or f.shape[0] < 1:
        raise ValueError(f"source must be a square (n, n) array, got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("source contains NaN or Inf values")
    n = f.shape[0]
    step = 1.0 / (n + 1) if h is None else float(h)
    if not step > 0:
        raise ValueError(f"grid spacing h must be positive, got {h}")
    second_difference = sparse.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))
    eye = sparse.identity(n)
    laplacian = (
        sparse.kron(eye, second_difference) + sparse.kron(second_difference, eye)
    ) / step**2
    u = spsolve(laplacian.tocsc(), f.reshape(-1))
    return np.asarray(u, dtype=np.float64).reshape(n, n)


def _random_source(grid: int, rng: np.random.Generator) -> np.ndarray:
    """One source field: 1-3 Gaussian bumps plus 0-2 rectangular heaters."""
    coords = np.arange(1, grid + 1) / (grid + 1)
    x, y = np.meshgrid(coords, coords)  # x varies along columns, y along rows
    f = np.zeros((grid, grid))
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0.15, 0.85, size=2)
        width = rng.uniform(0.05, 0.15)
        amplitude = rng.uniform(-1.0, 1.0) * 200.0
        f += amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width**2))
    for _ in range(rng.integers(0, 3)):
        x0, y0 = rng.uniform(0.0, 0.7, size=2)
        w, h = rng.uniform(0.1, 0.3, size=2)
        heat = rng.uniform(10.0, 50.0)
        f += heat * ((x >= x0) & (x <= x0 + w) & (y >= y0) & (y <= y0 + h))
    return f


def generate_poisson(
    num_problems: int, *, grid: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random source fields and their solutions on a ``grid x grid`` interior grid.

    Each source is a sum of 1-3 Gaussian bumps (centres uniform in
    ``[0.15, 0.85]^2``, widths uniform in ``[0.05, 0.15]``, amplitudes uniform in
    ``[-200, 200]``) and 0-2 axis-aligned rectangular heaters (corner uniform in
    ``[0, 0.7]^2``, sides uniform in ``[0.1, 0.3]``, heat uniform in
    ``[10, 50]``). These amplitudes make the solutions of order one.

    Parameters
    ----------
    num_problems : int
        Number of problems (>= 1).
    grid : int
        Interior nodes per side (>= 2).
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    sources : numpy.ndarray
        (num_problems, 1, grid, grid) float32: one-channel images for a model.
    solutions : numpy.ndarray
        (num_problems, grid * grid) float32, each the row-major flattened field.
    """
    if num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}")
    if grid < 2:
        raise ValueError(f"grid must be >= 2 nodes per side, got {grid}")
    sources = np.stack([_random_source(grid, rng) for _ in range(num_problems)])
    solutions = np.stack([solve_poisson(f).reshape(-1) for f in sources])
    return sources[:, None].astype(np.float32), solutions.astype(np.float32)
