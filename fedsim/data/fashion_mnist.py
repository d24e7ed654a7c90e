"""Fashion-MNIST from its four IDX files (60,000 train and 10,000 test 28x28
greyscale clothing images in 10 classes).

Files are read from ``<data_dir>/fashion_mnist/`` or torchvision's
``<data_dir>/FashionMNIST/raw/``, plain or gzipped; ``download=True`` fetches
the four ``.gz`` files into ``<data_dir>/fashion_mnist/`` from the public
mirrors in :data:`SOURCE` (checked against their MD5). Pixels are divided by
255 and then standardised by Fashion-MNIST's training-set constants
:data:`MEAN` and :data:`STD`. The official train/test split is kept.
"""

from __future__ import annotations

from fedsim.data import DATASETS, DataSplits
from fedsim.data._idx import IdxSource, idx_splits

__all__ = ["MEAN", "SOURCE", "STD", "fashion_mnist"]

MEAN = 0.2860
"""Mean pixel value of the 60,000 Fashion-MNIST training images scaled to [0, 1]."""
STD = 0.3530
"""Standard deviation of the same pixel values."""

SOURCE = IdxSource(
    name="fashion_mnist",
    torchvision_name="FashionMNIST",
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    md5={
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
)


@DATASETS.register("fashion_mnist")
def fashion_mnist(
    *, data_dir: str = "data", download: bool = False, seed: int = 0
) -> DataSplits:
    """Fashion-MNIST as (1, 28, 28) images in 10 classes.

    Parameters
    ----------
    data_dir : str
        Folder holding ``fashion_mnist/`` or ``FashionMNIST/raw/``.
    download : bool
        Fetch missing files from the public mirrors (network access).
    seed : int
        Unused: the official split is kept.
    """
    return idx_splits(SOURCE, data_dir=data_dir, download=download, mean=MEAN, std=STD)
