"""The IDX file format of MNIST and Fashion-MNIST: locate, download, read, split.

An IDX file is a 4-byte big-endian magic number ``0x0000TTDD`` (TT the element
type, DD the number of dimensions), then DD big-endian uint32 sizes, then the
elements in C order, big-endian. MNIST-style datasets ship four such files::

    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte

each optionally gzipped (``.gz``). Private to :mod:`fedsim.data`.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.data import DataSplits
from fedsim.data._download import fetch
from fedsim.data._prepare import make_splits
from fedsim.exceptions import DataError

__all__ = ["IDX_FILES", "IdxSource", "idx_splits", "load_idx_source", "read_idx"]

# element type code -> big-endian numpy dtype
_TYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

IDX_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four files of an MNIST-style dataset (without ``.gz``)."""


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read one IDX file (plain, or gzipped when its name ends in ``.gz``).

    Parameters
    ----------
    path : pathlib.Path
        The file.
    ndim : int
        The number of dimensions the caller expects (3 for images, 1 for
        labels).

    Returns
    -------
    numpy.ndarray
        The elements in native byte order, shape as the header says.

    Raises
    ------
    DataError
        If the magic number, the dimension count or the size is wrong.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    expected = (
        f"0x0000TT{ndim:02x} with TT in {{{', '.join(f'{t:02x}' for t in _TYPES)}}}"
    )
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if (
        magic is None
        or magic >> 16 != 0
        or (magic >> 8) & 0xFF not in _TYPES
        or magic & 0xFF != ndim
    ):
        shown = "missing" if magic is None else f"0x{magic:08x}"
        raise DataError(
            f"{path} is not a {ndim}-D IDX file: its magic number is {shown}, "
            f"expected {expected}"
        )
    dtype = np.dtype(_TYPES[(magic >> 8) & 0xFF])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its {header}-byte IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != need:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data but its header "
            f"{dims} needs {need}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class IdxSource:
    """Where an MNIST-style dataset lives and how to fetch it.

    Attributes
    ----------
    name : str
        fedsim's name; files are looked up (and downloaded to)
        ``<data_dir>/<name>/``.
    torchvision_name : str
        Folder name of torchvision's layout, ``<data_dir>/<torchvision_name>/raw/``.
    mirrors : sequence of str
        Base URLs serving ``<file>.gz``, tried in order.
    md5 : dict of str to str
        MD5 of each ``<file>.gz``.
    """

    name: str
    torchvision_name: str
    mirrors: Sequence[str]
    md5: dict[str, str]

    def folders(self, data_dir: str) -> list[Path]:
        """The folders searched, in order."""
        root = Path(data_dir)
        return [root / self.name, root / self.torchvision_name / "raw"]


def _find(source: IdxSource, data_dir: str, stem: str) -> Path | None:
    for folder in source.folders(data_dir):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_idx_source(
    source: IdxSource, *, data_dir: str, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels of ``source``.

    Images come back as (N, H, W) and labels as (N,), as stored.

    Raises
    ------
    DataError
        If a file is missing and ``download`` is off, a download fails, or the
        files are malformed or inconsistent.
    """
    paths: list[Path] = []
    for stem in IDX_FILES:
        found = _find(source, data_dir, stem)
        if found is None:
            if not download:
                where = " or ".join(str(f) for f in source.folders(data_dir))
                raise DataError(
                    f"{source.name} file {stem} (or {stem}.gz) is not in {where}; "
                    f"put the four IDX files there, or load the dataset with "
                    f"download=True to fetch them"
                )
            found = Path(data_dir) / source.name / f"{stem}.gz"
            fetch(
                [f"{base}{stem}.gz" for base in source.mirrors],
                found,
                md5=source.md5[stem],
            )
        paths.append(found)
    arrays = [read_idx(path, ndim=3 if "images" in path.name else 1) for path in paths]
    for images, labels, split in (
        (arrays[0], arrays[1], "train"),
        (arrays[2], arrays[3], "t10k"),
    ):
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{source.name} {split} files disagree: {images.shape[0]} images "
                f"but {labels.shape[0]} labels"
            )
    if arrays[0].dtype != np.uint8 or arrays[2].dtype != np.uint8:
        raise DataError(
            f"{source.name} images must be unsigned bytes (IDX type 08), got "
            f"{arrays[0].dtype} and {arrays[2].dtype}"
        )
    if arrays[0].shape[1:] != arrays[2].shape[1:]:
        raise DataError(
            f"{source.name} train images are {arrays[0].shape[1:]} but test images "
            f"are {arrays[2].shape[1:]}"
        )
    return arrays[0], arrays[1], arrays[2], arrays[3]


def idx_splits(
    source: IdxSource, *, data_dir: str, download: bool, mean: float, std: float
) -> DataSplits:
    """The official train/test split of ``source`` as 10-class (1, H, W) images.

    The files are found or fetched by :func:`load_idx_source`; the 8-bit pixels
    are divided by 255 and standardised by ``mean`` and ``std``. The splits are
    named ``source.name``.
    """
    x_train, y_train, x_test, y_test = load_idx_source(
        source, data_dir=data_dir, download=download
    )
    return make_splits(
        source.name,
        x_train=x_train[:, None],
        y_train=y_train,
        x_test=x_test[:, None],
        y_test=y_test,
        scale=255.0,
        mean=(mean,),
        std=(std,),
        num_classes=10,
    )
