"""Any Hugging Face image-classification dataset, from disk or (opt-in) the Hub.

``path`` is a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk`` (looked up as given, then under ``data_dir``), or,
with ``download=True`` only, a Hub id such as ``"ylecun/mnist"`` (cached under
``<data_dir>/huggingface/``).

Splits: a ``DatasetDict`` with several splits must hold ``train_split`` and
``test_split``. A single ``Dataset``, or a ``DatasetDict`` with one split only,
is split by a seeded, stratified split that holds out ``test_fraction`` of
every class.

Images: the ``image_key`` column holds PIL images (an ``Image`` feature; each
is converted to greyscale "L" or, when it has colour or a palette, to "RGB")
or nested lists/arrays: (H, W) for grey, (H, W, C) or (C, H, W) with C in
{1, 3}. Integer pixels are read as 0..255 and divided by 255; float pixels
must already lie in [0, 1]. Labels (``label_key``) are a ``ClassLabel``
(``num_classes`` from its names) or non-negative integers (``num_classes`` =
largest label + 1).

Standardisation: by ``mean``/``std`` when given (one value, or one per
channel), else by the per-channel mean and standard deviation of the training
split's [0, 1] pixels (fixed once computed, and applied to both splits).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data import DATASETS, DataSplits
from fedsim.data._prepare import check_test_fraction, make_splits, stratified_split
from fedsim.exceptions import DataError

__all__ = ["hf"]

_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _open(path: str, data_dir: str, download: bool) -> Any:
    """The ``Dataset`` or ``DatasetDict`` that ``path`` names."""
    import datasets

    if not path or path == "???":  # "???" is Hydra's unset mandatory value
        raise DataError(
            "dataset hf needs path (dataset.path=...): a save_to_disk folder or a "
            "Hub id"
        )
    candidates = [Path(path), Path(data_dir) / path]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is not None:
        try:
            return datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(
                f"{folder} is not a folder written by Dataset.save_to_disk or "
                f"DatasetDict.save_to_disk ({exc})"
            ) from exc
    if not download:
        raise DataError(
            f"Hugging Face dataset {path!r} is not a save_to_disk folder (looked in "
            f"{candidates[0]} and {candidates[1]}); load it with download=True to "
            f"fetch it from the Hub"
        )
    try:
        return datasets.load_dataset(
            path, cache_dir=str(Path(data_dir) / "huggingface")
        )
    except Exception as exc:  # the Hub client raises many unrelated types
        raise DataError(
            f"cannot load {path!r} from the Hugging Face Hub: {exc}"
        ) from exc


def _pick_splits(
    loaded: Any, train_split: str, test_split: str
) -> tuple[Any, Any | None]:
    """(train, test) datasets; test is None when the data has one split only."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded, None
    available = list(loaded.keys())
    if len(available) == 1:
        return loaded[available[0]], None
    for wanted in (train_split, test_split):
        if wanted not in loaded:
            raise DataError(
                f"split {wanted!r} is not in the dataset; its splits are: "
                f"{', '.join(available)}"
            )
    return loaded[train_split], loaded[test_split]


def _check_columns(ds: Any, *keys: str) -> None:
    for key in keys:
        if key not in ds.column_names:
            raise DataError(
                f"column {key!r} is not in the dataset; its columns are: "
                f"{', '.join(ds.column_names)}"
            )


def _pil_images(ds: Any, key: str) -> np.ndarray:
    """PIL images as a uint8 array (N, H, W) or (N, H, W, 3)."""
    images = list(ds[key])
    if not images:
        raise DataError(f"column {key!r} holds no images")
    colour = any(getattr(img, "mode", None) in _COLOUR_MODES for img in images)
    mode = "RGB" if colour else "L"
    arrays = []
    for img in images:
        if not hasattr(img, "convert"):
            raise DataError(
                f"column {key!r} holds {type(img).__name__}, not decoded PIL images"
            )
        arrays.append(np.asarray(img.convert(mode)))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(
            f"images in column {key!r} differ in size ({sorted(shapes)[:2]}); "
            "resize them to one size first"
        )
    return np.stack(arrays)


def _to_nchw(array: np.ndarray, key: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, C) or (N, C, H, W) -> (N, C, H, W)."""
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4:
        first, last = array.shape[1], array.shape[3]
        if last in (1, 3) and first not in (1, 3):
            return array.transpose(0, 3, 1, 2)
        if first in (1, 3):
            return array
    raise DataError(
        f"column {key!r} holds items of shape {array.shape[1:]}; expected (H, W), "
        "(H, W, C) or (C, H, W) with C 1 or 3"
    )


def _images(ds: Any, key: str) -> tuple[np.ndarray, float]:
    """Images as (N, C, H, W) and the scale that maps them to [0, 1]."""
    import datasets

    if isinstance(ds.features[key], datasets.Image):
        return _to_nchw(_pil_images(ds, key), key), 255.0
    array = np.asarray(ds.with_format("numpy")[key][:])
    if array.dtype == object:
        raise DataError(
            f"items in column {key!r} differ in shape; give every image one shape"
        )
    array = _to_nchw(array, key)
    if np.issubdtype(array.dtype, np.bool_):
        return array, 1.0
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(
                f"integer pixels in column {key!r} must lie in 0..255, got "
                f"{array.min()}..{array.max()}"
            )
        return array, 255.0
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0 or array.max() > 1):
            raise DataError(
                f"float pixels in column {key!r} must lie in [0, 1], got "
                f"{array.min():.4g}..{array.max():.4g}; scale them or store uint8"
            )
        return array, 1.0
    raise DataError(f"column {key!r} holds {array.dtype} values, not pixels")


def _labels(ds: Any, key: str) -> np.ndarray:
    labels = np.asarray(ds.with_format("numpy")[key][:])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"column {key!r} must hold one integer class label per example, got "
            f"{labels.dtype} of shape {labels.shape}"
        )
    if labels.size and labels.min() < 0:
        raise DataError(f"labels in column {key!r} must be >= 0, got {labels.min()}")
    return labels.astype(np.int64)


def _channel_stats(raw: np.ndarray, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``raw / scale`` (a zero std becomes 1)."""
    mean = [
        float(raw[:, c].mean(dtype=np.float64)) / scale for c in range(raw.shape[1])
    ]
    std = [float(raw[:, c].std(dtype=np.float64)) / scale for c in range(raw.shape[1])]
    return mean, [s if s > 0 else 1.0 for s in std]


@DATASETS.register("hf")
def hf(
    *,
    path: str,
    data_dir: str = "data",
    download: bool = False,
    seed: int = 0,
    train_split: str = "train",
    test_split: str = "test",
    test_fraction: float = 0.2,
    image_key: str = "image",
    label_key: str = "label",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> DataSplits:
    """A Hugging Face dataset as (C, H, W) images with integer labels.

    Parameters
    ----------
    path : str
        A ``save_to_disk`` folder (as given, or under ``data_dir``), or a Hub
        id when ``download`` is on.
    data_dir : str
        Second place to look for ``path``; Hub downloads are cached under
        ``<data_dir>/huggingface/``.
    download : bool
        Allow fetching ``path`` from the Hugging Face Hub (network access).
    seed : int
        Seed of the stratified split when the data has one split only.
    train_split, test_split : str
        Split names used when the data has several splits.
    test_fraction : float
        Share of every class held out when the data has one split only.
    image_key, label_key : str
        Column names of the images and the labels.
    mean, std : sequence of float, optional
        Standardisation constants of the [0, 1] pixels (one value, or one per
        channel); by default the training split's own per-channel statistics.
    """
    check_test_fraction(test_fraction)
    train, test = _pick_splits(_open(path, data_dir, download), train_split, test_split)
    _check_columns(train, image_key, label_key)
    x_train, scale = _images(train, image_key)
    y_train = _labels(train, label_key)
    if test is None:
        tr, te = stratified_split(y_train, test_fraction=test_fraction, seed=seed)
        x_train, x_test, y_train, y_test = (
            x_train[tr],
            x_train[te],
            y_train[tr],
            y_train[te],
        )
    else:
        _check_columns(test, image_key, label_key)
        x_test, test_scale = _images(test, image_key)
        y_test = _labels(test, label_key)
        if x_test.shape[1:] != x_train.shape[1:] or test_scale != scale:
            raise DataError(
                f"test images {x_test.shape[1:]} ({x_test.dtype}) do not match "
                f"train images {x_train.shape[1:]} ({x_train.dtype})"
            )
    feature = train.features[label_key]
    num_classes = getattr(feature, "num_classes", None)
    if num_classes is None:
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    if mean is None or std is None:
        own_mean, own_std = _channel_stats(x_train, scale)
        mean = own_mean if mean is None else mean
        std = own_std if std is None else std
    return make_splits(
        "hf",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        scale=scale,
        mean=list(mean),
        std=list(std),
        num_classes=num_classes,
    )
