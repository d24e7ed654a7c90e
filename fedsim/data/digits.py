"""scikit-learn's 8x8 handwritten digits (1,797 images, bundled, offline).

The images hold integers 0..16; they are divided by 16 and then standardised
by the mean and standard deviation of all 1,797 images' pixels after that
scaling, :data:`MEAN` and :data:`STD`. A seeded, stratified split holds out
``test_fraction`` of every class as the server's test set. With
``dequantize=true`` (for ``task=density``) the images come out dequantised
instead, ``(x + u) / 17 - 1/2`` for the :data:`LEVELS` grey levels ``x``
(see :mod:`fedsim.data._dequantize`).
"""

from __future__ import annotations

import functools

import numpy as np

from fedsim.data import DATASETS, DataSplits
from fedsim.data._dequantize import grey_level_splits

__all__ = ["LEVELS", "MEAN", "STD", "digits", "source_arrays"]

LEVELS = 17
"""Grey levels of the images (integers 0..16)."""

MEAN = 0.3053
"""Mean pixel value of ``load_digits().images / 16``."""
STD = 0.3760
"""Standard deviation of the pixel values of ``load_digits().images / 16``."""


@functools.cache
def source_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The sklearn digits as read-only (1797, 1, 8, 8) float32 values 0..16 and
    (1797,) int64 labels, read once per process.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@DATASETS.register("digits")
def digits(
    *,
    data_dir: str = "data",
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    dequantize: bool = False,
) -> DataSplits:
    """The sklearn digits as (1, 8, 8) images in 10 classes.

    Parameters
    ----------
    data_dir : str
        Unused: the data ships with scikit-learn.
    download : bool
        Unused, for the same reason.
    seed : int
        Seed of the stratified train/test split.
    test_fraction : float
        Share of every class held out for the server's test set, in (0, 1).
    dequantize : bool
        Hand out ``(x + u) / 17 - 1/2`` with ``u`` uniform on [0, 1), drawn once
        per pixel from ``seed``, instead of standardised pixels (density models).
    """
    images, labels = source_arrays()
    return grey_level_splits(
        "digits",
        images,
        labels,
        levels=LEVELS,
        mean=MEAN,
        std=STD,
        seed=seed,
        test_fraction=test_fraction,
        dequantize=dequantize,
    )
