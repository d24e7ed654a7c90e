"""CIFAR-10 from its "python version" pickle batches (50,000 train and 10,000
test 32x32 RGB images in 10 classes).

The batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` are read
from ``<data_dir>/cifar-10-batches-py/`` (the layout torchvision uses too).
Each is a pickled dict with ``b"data"``, a uint8 array of shape (N, 3072)
holding the red, green and blue 32x32 planes of each image in turn, and
``b"labels"``, N integers 0..9. They are unpickled with an allow-list that
admits only numpy arrays, so a tampered file cannot run code. ``download=True``
fetches the official archive (checked against its MD5) into ``data_dir`` and
extracts it there. Pixels are divided by 255 and then standardised per channel
by the CIFAR-10 training-set constants :data:`MEAN` and :data:`STD`. The
official train/test split is kept.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data import DATASETS, DataSplits
from fedsim.data._download import fetch
from fedsim.data._prepare import make_splits
from fedsim.exceptions import DataError

__all__ = ["ARCHIVE_MD5", "ARCHIVE_URL", "FOLDER", "MEAN", "STD", "cifar10"]

MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel (R, G, B) mean of the 50,000 training images scaled to [0, 1]."""
STD = (0.2470, 0.2435, 0.2616)
"""Per-channel standard deviation of the same pixel values."""

FOLDER = "cifar-10-batches-py"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"

# what a CIFAR batch may reference: numpy array reconstruction, nothing else
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one batch file."""
    try:
        with path.open("rb") as handle:
            batch = _BatchUnpickler(handle, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(
            f"CIFAR-10 batch {path} is not a dict with b'data' and b'labels'"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"CIFAR-10 batch {path} has b'data' of dtype {data.dtype} and shape "
            f"{data.shape}, expected uint8 of shape (N, 3072)"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR-10 batch {path} has {labels.shape[0] if labels.ndim else 0} "
            f"labels for {data.shape[0]} images"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"CIFAR-10 batch {path} has non-integer labels")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _download(root: Path) -> None:
    archive = root / "cifar-10-python.tar.gz"
    fetch([ARCHIVE_URL], archive, md5=ARCHIVE_MD5)
    with tarfile.open(archive, "r:gz") as tar:
        _extract(tar, root, archive)


def _extract(tar: tarfile.TarFile, root: Path, archive: Path) -> None:
    """Extract ``tar`` under ``root``: regular files and folders only, none
    outside ``root``. Python 3.11.4+ has tarfile's ``data`` filter for this;
    earlier 3.11 releases get the same check here."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(root, filter="data")
        return
    base = root.resolve()
    members = tar.getmembers()
    for member in members:
        inside = (base / member.name).resolve().is_relative_to(base)
        if not inside or not (member.isfile() or member.isdir()):
            raise DataError(
                f"{archive} has member {member.name!r}, which is not a file or "
                f"folder under {root}; refusing to extract it"
            )
    tar.extractall(root, members=members)  # every member checked above


@DATASETS.register("cifar10")
def cifar10(
    *, data_dir: str = "data", download: bool = False, seed: int = 0
) -> DataSplits:
    """CIFAR-10 as (3, 32, 32) images in 10 classes.

    Parameters
    ----------
    data_dir : str
        Folder holding ``cifar-10-batches-py/``.
    download : bool
        Fetch and extract the official archive if a batch is missing (network
        access, about 170 MB).
    seed : int
        Unused: the official split is kept.
    """
    root = Path(data_dir)
    folder = root / FOLDER
    names = (*_TRAIN_BATCHES, _TEST_BATCH)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and download:
        _download(root)
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 batch {missing[0]} is not in {folder}; extract the "
            f"official python-version archive ({ARCHIVE_URL}) into {root}, or load "
            f"the dataset with download=True to fetch it"
        )
    train = [_read_batch(folder / n) for n in _TRAIN_BATCHES]
    x_test, y_test = _read_batch(folder / _TEST_BATCH)
    return make_splits(
        "cifar10",
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        scale=255.0,
        mean=MEAN,
        std=STD,
        num_classes=10,
    )
