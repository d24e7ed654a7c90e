"""Shared steps of the dataset factories: seeded stratified split, standardisation.

Private to :mod:`fedsim.data`; the leading underscore keeps the module out of
dataset discovery.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedsim.data import ArrayDataset, DataSplits
from fedsim.exceptions import ConfigError, DataError

__all__ = [
    "check_test_fraction",
    "make_splits",
    "standardise",
    "stratified_split",
    "stratified_splits",
]


def check_test_fraction(test_fraction: float) -> float:
    """``test_fraction`` as a float, if it lies strictly between 0 and 1."""
    value = float(test_fraction)
    if not 0.0 < value < 1.0:
        raise ConfigError(
            f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}"
        )
    return value


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and test, class by class.

    For every class c (in ascending order) with n_c examples, a seeded random
    ``round(n_c * test_fraction)`` of them (halves rounded up) go to the test
    set and the rest to the train set, so both sets keep the class
    proportions.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels, shape (N,).
    test_fraction : float
        Share of every class held out for testing, in (0, 1).
    seed : int
        Seed of the shuffle; the same seed gives the same split.

    Returns
    -------
    train, test : numpy.ndarray
        Sorted int64 indices into ``labels``; disjoint, together all of them.

    Raises
    ------
    DataError
        If either side would be empty.
    """
    fraction = check_test_fraction(test_fraction)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(np.floor(len(members) * fraction + 0.5))
        test.append(members[:n_test])
        train.append(members[n_test:])
    train_idx = np.sort(np.concatenate(train)).astype(np.int64)
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise DataError(
            f"test_fraction={fraction} leaves an empty "
            f"{'train' if len(train_idx) == 0 else 'test'} set for "
            f"{len(labels)} examples; choose a value nearer 0.5"
        )
    return train_idx, test_idx


def standardise(
    raw: np.ndarray, *, scale: float, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``(raw / scale - mean) / std`` per channel, as a float32 tensor.

    Computed in float32 with a single working copy, so that a large uint8
    image array needs only its float32 result in extra memory.

    Parameters
    ----------
    raw : numpy.ndarray
        Inputs of shape (N, C, H, W) whose values lie in [0, scale].
    scale : float
        The largest possible raw value (255 for 8-bit images): ``raw / scale``
        lies in [0, 1].
    mean, std : sequence of float
        Standardisation constants of the [0, 1] values: one per channel, or one
        for all channels.
    """
    channels = raw.shape[1]
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(-1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(-1)
    for what, arr in (("mean", mean_arr), ("std", std_arr)):
        if arr.size not in (1, channels):
            raise ConfigError(
                f"{what} must have 1 or {channels} values (one per channel), "
                f"got {arr.size}"
            )
    if np.any(std_arr <= 0):
        raise ConfigError(f"std must be positive, got {std_arr.tolist()}")
    shape = (1, -1) + (1,) * (raw.ndim - 2)
    out = np.array(raw, dtype=np.float32, order="C")
    out /= np.float32(scale)
    out -= mean_arr.reshape(shape)
    out /= std_arr.reshape(shape)
    return torch.from_numpy(out)


def make_splits(
    name: str,
    *,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
) -> DataSplits:
    """Scale inputs to [0, 1], standardise them, and pair them with int64 labels.

    ``x_train``/``x_test`` are (N, C, H, W) arrays with values in [0, scale];
    see :func:`standardise`. Labels must lie in 0..num_classes-1.
    """
    for split, y in (("train", y_train), ("test", y_test)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(
                f"dataset {name!r}: {split} labels must lie in 0..{num_classes - 1}, "
                f"got values from {y.min()} to {y.max()}"
            )
    train = ArrayDataset(
        x=standardise(x_train, scale=scale, mean=mean, std=std),
        y=torch.from_numpy(np.asarray(y_train, dtype=np.int64).copy()),
    )
    test = ArrayDataset(
        x=standardise(x_test, scale=scale, mean=mean, std=std),
        y=torch.from_numpy(np.asarray(y_test, dtype=np.int64).copy()),
    )
    return DataSplits(
        name=name,
        train=train,
        test=test,
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        num_classes=int(num_classes),
    )


def stratified_splits(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int,
    test_fraction: float,
    scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
) -> DataSplits:
    """One pool of examples split by :func:`stratified_split`, then :func:`make_splits`.

    Parameters
    ----------
    name : str
        The dataset's name.
    images : numpy.ndarray
        Inputs of the whole pool, (N, C, H, W) with values in [0, scale].
    labels : numpy.ndarray
        Integer labels of the pool, shape (N,).
    seed, test_fraction
        Passed to :func:`stratified_split`.
    scale, mean, std, num_classes
        Passed to :func:`make_splits`.
    """
    train, test = stratified_split(labels, test_fraction=test_fraction, seed=seed)
    return make_splits(
        name,
        x_train=images[train],
        y_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        scale=scale,
        mean=mean,
        std=std,
        num_classes=num_classes,
    )
