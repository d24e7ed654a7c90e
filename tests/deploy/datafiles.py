"""Small MNIST-layout IDX folders cut from scikit-learn's 8x8 digits.

A deployment test needs every device to hold its own files in a format fedsim
reads. The digits (values 0..16) are scaled to bytes 0..240 and written as the
four IDX files of an MNIST folder: 8x8 images instead of 28x28, which the
``mnist`` loader accepts as long as train and test images agree.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (big-endian header, C-order bytes)."""
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(
            f"expected uint8 of 1 or 3 dims, got {array.dtype} {array.ndim}"
        )
    magic = IDX_IMAGES if array.ndim == 3 else IDX_LABELS
    header = magic.to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + np.ascontiguousarray(array).tobytes())


@functools.cache
def digit_bytes() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, 8, 8) uint8 images 0..240 and (N,) uint8 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images) * 15).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.uint8)


def write_mnist_folder(
    data_dir: Path, train: np.ndarray, test: np.ndarray, *, layout: str = "mnist"
) -> Path:
    """Write digits ``train``/``test`` (index arrays) as ``<data_dir>/<layout>/``.

    Returns the folder holding the four IDX files.
    """
    images, labels = digit_bytes()
    folder = data_dir / layout
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images[train])
    write_idx(folder / "train-labels-idx1-ubyte", labels[train])
    write_idx(folder / "t10k-images-idx3-ubyte", images[test])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[test])
    return folder


def device_folders(root: Path, num_devices: int) -> tuple[Path, list[Path]]:
    """A server data_dir and one data_dir per device, with disjoint digits.

    The first 300 digits are the server's test set (and a token train set);
    the rest is dealt round-robin to the devices, each keeping 60 of its share
    as its own held-out set.
    """
    n = digit_bytes()[1].shape[0]
    order = np.arange(n)
    server = root / "server-data"
    write_mnist_folder(server, order[300:400], order[:300])
    devices = []
    for i in range(num_devices):
        share = order[300 + i :: num_devices]
        folder = root / f"device-{i}-data"
        write_mnist_folder(folder, share[60:], share[:60])
        devices.append(folder)
    return server, devices
