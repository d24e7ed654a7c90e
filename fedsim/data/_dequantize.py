"""Uniform dequantisation of integer pixels, for density models (``task=density``).

A continuous density fitted to integer-valued pixels can grow without bound by
piling its mass onto the integers. Adding uniform noise, ``x + u`` with ``u``
uniform on [0, 1), turns each of the ``L`` grey levels into a unit-wide bin,
and a density ``p`` of the result bounds the discrete likelihood from below:
``E_u log p((x + u) / L - 1/2) - D log L <= log P(x)`` for ``D`` pixels (Theis,
van den Oord and Bethge, ICLR 2016). The datasets that accept
``dequantize=true`` (``digits``, ``mnist5k``) hand out
``(x + u) / L - 1/2``, in [-1/2, 1/2), instead of standardised pixels.

The noise is drawn once per pixel from the dataset seed, in the source order of
the images, so an image's noise does not depend on the train/test split and the
clients and the server see the same values. It is not redrawn per training
step: fedsim's training step receives the dataset's tensors as they are (see
:mod:`fedsim.tasks.density`). The leading underscore keeps the module out of
dataset discovery.
"""

from __future__ import annotations

import numpy as np

from fedsim.data import DataSplits
from fedsim.data._prepare import stratified_splits
from fedsim.exceptions import DataError

__all__ = [
    "DEQUANTIZE_MEAN",
    "DEQUANTIZE_STD",
    "dequantize_pixels",
    "grey_level_splits",
]

_NOISE_TAG = 0x4E4F4953  # "NOIS": the noise's seed differs from the split's

DEQUANTIZE_MEAN = (0.5,)
"""Shift that :func:`fedsim.data._prepare.make_splits` subtracts after dividing
``x + u`` by the number of levels: the inputs end up in [-1/2, 1/2)."""
DEQUANTIZE_STD = (1.0,)
"""No further scaling."""


def dequantize_pixels(pixels: np.ndarray, *, levels: int, seed: int) -> np.ndarray:
    """``pixels + u`` with ``u`` uniform on [0, 1), one draw per value from ``seed``.

    Parameters
    ----------
    pixels : numpy.ndarray
        Integer grey levels 0..levels-1 (any float or integer dtype).
    levels : int
        Number of grey levels, at least 2.
    seed : int
        The dataset seed; the same seed gives the same noise.

    Returns
    -------
    numpy.ndarray
        float32 values in [0, levels), of the shape of ``pixels``; divided by
        ``levels`` (``make_splits(scale=levels, mean=DEQUANTIZE_MEAN,
        std=DEQUANTIZE_STD)``) they become ``(x + u) / levels - 1/2``.

    Raises
    ------
    DataError
        If a value is not an integer in 0..levels-1.
    """
    if levels < 2:
        raise DataError(f"dequantize needs at least 2 grey levels, got {levels}")
    values = np.asarray(pixels, dtype=np.float32)
    bad = (values != np.round(values)) | (values < 0) | (values > levels - 1)
    if np.any(bad):
        raise DataError(
            f"dequantize needs integer grey levels 0..{levels - 1}, got "
            f"{values[bad].flat[0]!r}"
        )
    rng = np.random.default_rng([int(seed), _NOISE_TAG])
    noise = rng.random(values.shape, dtype=np.float32)
    # float32 rounding can lift (levels - 1) + u to levels itself: keep below it
    return np.minimum(values + noise, np.nextafter(np.float32(levels), 0))


def grey_level_splits(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    levels: int,
    mean: float,
    std: float,
    seed: int,
    test_fraction: float,
    dequantize: bool,
) -> DataSplits:
    """A pool of grey-level images in 10 classes, split and scaled for a factory.

    The pool is split by the seeded stratified split
    (:func:`fedsim.data._prepare.stratified_splits`). The pixels, integers
    0..levels-1, are divided by ``levels - 1`` and standardised by ``mean`` and
    ``std``; with ``dequantize`` they become ``(x + u) / levels - 1/2`` instead
    (:func:`dequantize_pixels`, noise from ``seed``).

    Parameters
    ----------
    name : str
        The dataset's name.
    images : numpy.ndarray
        (N, 1, H, W) grey levels 0..levels-1.
    labels : numpy.ndarray
        (N,) int64 labels 0..9.
    levels : int
        Number of grey levels.
    mean, std : float
        Standardisation constants of ``images / (levels - 1)``.
    seed : int
        Seed of the split and of the dequantisation noise.
    test_fraction : float
        Share of every class held out for the server's test set, in (0, 1).
    dequantize : bool
        Hand out dequantised instead of standardised pixels.
    """
    scale, means, stds = float(levels - 1), (mean,), (std,)
    if dequantize:
        images = dequantize_pixels(images, levels=levels, seed=seed)
        scale, means, stds = float(levels), DEQUANTIZE_MEAN, DEQUANTIZE_STD
    return stratified_splits(
        name,
        images,
        labels,
        seed=seed,
        test_fraction=test_fraction,
        scale=scale,
        mean=means,
        std=stds,
        num_classes=10,
    )
