"""Two Gaussians with a known Wasserstein-1 distance (task ``wasserstein``).

P is ``N(0, std^2 I)`` and Q is ``N(distance * u, std^2 I)`` in ``dim``
dimensions, where ``u`` is a unit vector drawn from the seed. Q is P shifted by
``distance * u``, so ``W1(P, Q) = ||mu_P - mu_Q|| = distance`` exactly (the
shift is an optimal coupling, and no coupling costs less than the distance of
the means, by Jensen's inequality), and a linear potential ``f(x) = -u . x``
attains it. Examples are labelled 0 (P) and 1 (Q); inputs are the raw
coordinates (no standardisation, which would change the distance), shape
``(dim,)``; ``num_classes`` is 1, the potential's output size. Both splits
hold as many samples of P as of Q, interleaved ``P, Q, P, Q, ...``, so every
evaluation batch of even size holds both halves equally.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedsim.data import DATASETS, ArrayDataset, DataSplits
from fedsim.exceptions import ConfigError

__all__ = ["gaussians", "interleave", "mean_shift"]

_TAG = 0x47415553  # "GAUS"


def interleave(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``p`` and ``q`` (equally many) as ``p0, q0, p1, q1, ...``, with
    labels 0 and 1."""
    x = np.empty((2 * len(p), *p.shape[1:]), dtype=p.dtype)
    x[0::2], x[1::2] = p, q
    y = np.tile(np.array([0, 1], dtype=np.int64), len(p))
    return x, y


def mean_shift(*, seed: int, dim: int, distance: float) -> np.ndarray:
    """``mu_Q - mu_P = distance * u`` for the unit vector ``u`` drawn from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG, 0]))
    direction = rng.standard_normal(dim)
    return distance * direction / np.linalg.norm(direction)


@DATASETS.register("gaussians")
def gaussians(
    *,
    data_dir: str = "data",
    download: bool = False,
    seed: int = 0,
    dim: int = 2,
    distance: float = 1.0,
    std: float = 1.0,
    train_samples: int = 2000,
    test_samples: int = 500,
) -> DataSplits:
    """Samples of ``N(0, std^2 I)`` (label 0) and ``N(distance u, std^2 I)`` (label 1).

    Parameters
    ----------
    data_dir : str
        Unused: the samples are generated.
    download : bool
        Unused, for the same reason.
    seed : int
        Seed of the direction ``u`` and of the samples.
    dim : int
        Dimension (>= 1).
    distance : float
        ``||mu_P - mu_Q||``, the exact ``W1(P, Q)`` (>= 0).
    std : float
        Standard deviation of every coordinate, shared by P and Q (> 0).
    train_samples, test_samples : int
        Samples of each distribution in the clients' pool and in the server's
        test set (>= 1 each).
    """
    for what, value in (
        ("dim", dim),
        ("train_samples", train_samples),
        ("test_samples", test_samples),
    ):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ConfigError(
                f"gaussians {what} must be an integer >= 1, got {value!r}"
            )
    if not (math.isfinite(distance) and distance >= 0):
        raise ConfigError(
            f"gaussians distance must be finite and >= 0, got {distance!r}"
        )
    if not (math.isfinite(std) and std > 0):
        raise ConfigError(f"gaussians std must be finite and positive, got {std!r}")
    shift = mean_shift(seed=seed, dim=int(dim), distance=float(distance))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG, 1]))

    def split(n: int) -> ArrayDataset:
        p = std * rng.standard_normal((n, int(dim)))
        q = shift + std * rng.standard_normal((n, int(dim)))
        x, y = interleave(p.astype(np.float32), q.astype(np.float32))
        return ArrayDataset(x=torch.from_numpy(x), y=torch.from_numpy(y))

    train = split(int(train_samples))
    test = split(int(test_samples))
    return DataSplits(
        name="gaussians", train=train, test=test, input_shape=(int(dim),), num_classes=1
    )
