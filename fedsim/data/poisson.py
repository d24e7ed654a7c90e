"""Poisson problems on the unit square: a finite-difference solver and a generator.

The steady-state heat equation ``-Laplace(u) = f`` on ``[0, 1]^2`` with
``u = 0`` on the boundary, discretised on the ``n x n`` interior nodes of a
uniform grid of spacing ``h = 1 / (n + 1)``: entry ``[i, j]`` of a field is its
value at ``x = (j + 1) h``, ``y = (i + 1) h`` (rows are y). The 5-point stencil
makes the error of the discrete solution O(h^2) for smooth solutions.

These are the regression problems of Graph Element Networks (``fedsim.models.gen``):
a source field in, the solution field out. :func:`solve_poisson` and
:func:`generate_poisson` are pure; the dataset ``poisson`` (task
``regression``) draws ``num_problems`` of them from its seed and holds out a
seeded ``test_fraction`` for the server. Its inputs are the source fields
divided by :data:`SOURCE_SCALE` (standard deviation about 0.7), shape
(N, 1, n, n); its targets are the solutions as they are (order one), shape
(N, n * n) in the row-major order of ``gen``'s field head, so
``num_classes = n * n``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import spsolve

from fedsim.data import DATASETS, ArrayDataset, DataSplits
from fedsim.data._prepare import check_test_fraction
from fedsim.exceptions import ConfigError, DataError

__all__ = ["SOURCE_SCALE", "generate_poisson", "poisson", "solve_poisson"]

SOURCE_SCALE = 50.0
"""The dataset's inputs are the source fields divided by this constant."""
_PROBLEMS_TAG = 0x504F4953  # "POIS": the problems' seed differs from the split's


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


@DATASETS.register("poisson")
def poisson(
    *,
    data_dir: str = "data",
    download: bool = False,
    seed: int = 0,
    num_problems: int = 1000,
    grid: int = 8,
    test_fraction: float = 0.2,
) -> DataSplits:
    """``num_problems`` seeded Poisson problems on a ``grid x grid`` interior grid.

    Parameters
    ----------
    data_dir : str
        Unused: the problems are generated.
    download : bool
        Unused, for the same reason.
    seed : int
        Seed of the problems (see :func:`generate_poisson`) and of the split.
    num_problems : int
        Problems in all, train and test together (>= 2).
    grid : int
        Interior nodes per side (>= 2).
    test_fraction : float
        Share of the problems held out as the server's test set, in (0, 1).

    Returns
    -------
    DataSplits
        Inputs ``source / SOURCE_SCALE`` (N, 1, grid, grid), float32 targets
        ``solve_poisson(source)`` flattened row-major to (N, grid * grid),
        ``num_classes = grid * grid``.
    """
    fraction = check_test_fraction(test_fraction)
    if isinstance(num_problems, bool) or int(num_problems) != num_problems:
        raise ConfigError(
            f"poisson num_problems must be an integer, got {num_problems!r}"
        )
    if num_problems < 2:
        raise ConfigError(f"poisson num_problems must be >= 2, got {num_problems}")
    if isinstance(grid, bool) or int(grid) != grid or grid < 2:
        raise ConfigError(f"poisson grid must be an integer >= 2, got {grid!r}")
    entropy = np.random.SeedSequence([int(seed), _PROBLEMS_TAG])
    sources, solutions = generate_poisson(
        int(num_problems), grid=int(grid), rng=np.random.default_rng(entropy)
    )
    n_test = int(np.floor(num_problems * fraction + 0.5))
    if not 0 < n_test < num_problems:
        raise DataError(
            f"test_fraction={fraction} leaves an empty "
            f"{'test' if n_test == 0 else 'train'} set for {num_problems} problems; "
            "choose a value nearer 0.5"
        )
    order = np.random.default_rng(int(seed)).permutation(int(num_problems))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    x = torch.from_numpy(sources / np.float32(SOURCE_SCALE))
    y = torch.from_numpy(solutions)
    t_train, t_test = torch.from_numpy(train), torch.from_numpy(test)
    return DataSplits(
        name="poisson",
        train=ArrayDataset(x=x[t_train], y=y[t_train]),
        test=ArrayDataset(x=x[t_test], y=y[t_test]),
        input_shape=(1, int(grid), int(grid)),
        num_classes=int(grid) ** 2,
    )
