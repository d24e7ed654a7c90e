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

from fedsim.exceptions import DataError

__all__ = ["DEQUANTIZE_MEAN", "DEQUANTIZE_STD", "dequantize_pixels"]

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
