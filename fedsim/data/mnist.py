"""MNIST from its four IDX files (60,000 train and 10,000 test 28x28 digits).

Files are read from ``<data_dir>/mnist/`` or torchvision's
``<data_dir>/MNIST/raw/``, plain or gzipped; ``download=True`` fetches the
four ``.gz`` files into ``<data_dir>/mnist/`` from the public mirrors in
:data:`SOURCE` (checked against their MD5). Pixels are divided by 255 and then
standardised by MNIST's training-set constants :data:`MEAN` and :data:`STD`.
The official train/test split is kept: the train set is what clients
partition, the t10k set is the server's test set.
"""

from __future__ import annotations

from fedsim.data import DATASETS, DataSplits
from fedsim.data._idx import IdxSource, idx_splits

__all__ = ["MEAN", "SOURCE", "STD", "mnist"]

MEAN = 0.1307
"""Mean pixel value of the 60,000 MNIST training images scaled to [0, 1]."""
STD = 0.3081
"""Standard deviation of the same pixel values."""

SOURCE = IdxSource(
    name="mnist",
    torchvision_name="MNIST",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    md5={
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
)


@DATASETS.register("mnist")
def mnist(
    *, data_dir: str = "data", download: bool = False, seed: int = 0
) -> DataSplits:
    """MNIST as (1, 28, 28) images in 10 classes.

    Parameters
    ----------
    data_dir : str
        Folder holding ``mnist/`` or ``MNIST/raw/``.
    download : bool
        Fetch missing files from the public mirrors (network access).
    seed : int
        Unused: the official split is kept.
    """
    return idx_splits(SOURCE, data_dir=data_dir, download=download, mean=MEAN, std=STD)
