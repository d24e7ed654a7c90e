"""Datasets: every dataset registered by name, loaded once per process.

``fedsim.data.load(name, **options)`` returns a :class:`DataSplits`: the
training examples that the clients partition (see :mod:`fedsim.data.partition`)
and the server's held-out test set, as in-memory tensors. Each dataset module
in this package registers one factory with :data:`DATASETS` at import time;
the module's file stem, the registry key and ``configs/dataset/<name>.yaml``
share one name.

Every factory is keyword-only and accepts at least ``data_dir`` (where files
live), ``download`` (opt-in network access; never needed by the bundled
datasets) and ``seed`` (used by datasets that split a single pool of examples).
Inputs come out scaled to [0, 1] and then standardised per channel by fixed,
documented constants of that dataset; labels are int64. Regression datasets
(``poisson``) carry float targets of shape (N, ...) instead of labels, and the
two-sample datasets of the ``wasserstein`` task (``gaussians``, ``digit_pair``)
label their examples 0 (distribution P) and 1 (distribution Q); each such
dataset documents its own scaling.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.exceptions import ConfigError, DataError
from fedsim.registry import Registry, check_kwargs

__all__ = ["DATASETS", "ArrayDataset", "DataSplits", "load", "names"]


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """In-memory examples.

    Equality is identity: two datasets are the same only if they are one object.

    Parameters
    ----------
    x : torch.Tensor
        Inputs, float32 of shape (N, C, H, W) for images.
    y : torch.Tensor
        Targets: int64 class labels of shape (N,), or float regression targets
        of shape (N,) or (N, ...) (a Poisson solution field per example).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise DataError(
                f"ArrayDataset needs torch tensors, got x of type "
                f"{type(self.x).__name__} and y of type {type(self.y).__name__}"
            )
        if self.y.ndim < 1 or self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"ArrayDataset needs x of shape (N, ...) and y of shape (N,) or "
                f"(N, ...), got x {tuple(self.x.shape)} and y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor) -> ArrayDataset:
        """The examples at ``indices`` (a 1-D integer array), in that order.

        Raises
        ------
        DataError
            If ``indices`` is not a 1-D integer array or points outside 0..N-1.
        """
        index = (
            indices
            if isinstance(indices, torch.Tensor)
            else torch.as_tensor(np.asarray(indices))
        )
        if index.ndim == 1 and index.numel() == 0:
            index = index.long()
        if index.ndim != 1 or index.dtype == torch.bool or index.is_floating_point():
            raise DataError(
                f"subset indices must be a 1-D integer array, got dtype "
                f"{index.dtype} and shape {tuple(index.shape)}"
            )
        index = index.long()
        n = len(self)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise DataError(
                f"subset indices must lie in 0..{n - 1}, got values from "
                f"{int(index.min())} to {int(index.max())}"
            )
        return ArrayDataset(x=self.x[index], y=self.y[index])


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A loaded dataset: the clients' pool and the server's test set.

    The tensors are shared by every caller of :func:`load` in the process;
    treat them as read-only.

    Parameters
    ----------
    name : str
        Registry name of the dataset.
    train : ArrayDataset
        The examples the clients partition.
    test : ArrayDataset
        The server's held-out test set.
    input_shape : tuple of int
        Shape of one input, (C, H, W) for images.
    num_classes : int
        The model's output size (it is passed to every model factory as
        ``num_classes``): the number of classes for classification (labels are
        0..num_classes-1), the number of target values per example for
        regression (``n * n`` for a Poisson field on an ``n x n`` grid), and 1
        for the scalar potential of the ``wasserstein`` task.
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    input_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        for split, data in (("train", self.train), ("test", self.test)):
            if tuple(data.x.shape[1:]) != tuple(self.input_shape):
                raise DataError(
                    f"dataset {self.name!r}: {split} inputs have shape "
                    f"{tuple(data.x.shape[1:])}, not the declared input_shape "
                    f"{tuple(self.input_shape)}"
                )
        if self.num_classes < 1:
            raise DataError(
                f"dataset {self.name!r}: num_classes must be at least 1, "
                f"got {self.num_classes}"
            )


DATASETS: Registry[DataSplits] = Registry("dataset")

_CACHE: dict[tuple[str, str], DataSplits] = {}
_CACHE_LOCK = threading.Lock()


@functools.cache
def _load_all() -> None:
    """Import every dataset module once, for its registrations."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "partition":
            importlib.import_module(f"{__name__}.{info.name}")


def _freeze(value: Any) -> Any:
    """A hashable, order-independent stand-in for an option value."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def load(name: str, **options: Any) -> DataSplits:
    """Build the dataset ``name``, once per process and set of options.

    The result is cached in-process, keyed by the name and the options with the
    factory's defaults filled in (so ``load("digits")`` and
    ``load("digits", seed=0)`` share one entry): a long-lived simulation worker
    reads the files once.

    Parameters
    ----------
    name : str
        A registered dataset (see :func:`names`).
    **options
        Keyword options of that dataset's factory.

    Returns
    -------
    DataSplits
        Shared between callers; do not modify its tensors in place.

    Raises
    ------
    fedsim.exceptions.ConfigError
        For an unknown dataset, an option it does not have, or a missing
        required option.
    fedsim.exceptions.DataError
        When the files cannot be found or read.
    """
    _load_all()
    factory = DATASETS.get(name)
    check_kwargs(factory, options, f"dataset {name!r}")
    signature = inspect.signature(factory)
    missing = [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty and p.name not in options
    ]
    if missing:
        raise ConfigError(f"dataset {name!r} needs the option {missing[0]!r}")
    bound = signature.bind(**options)
    bound.apply_defaults()
    key = (name, repr(_freeze(dict(bound.arguments))))
    with _CACHE_LOCK:
        if key not in _CACHE:
            splits = DATASETS.build(name, **options)
            if not isinstance(splits, DataSplits):
                raise TypeError(
                    f"dataset factory {name!r} returned {type(splits).__name__}, "
                    "not DataSplits"
                )
            _CACHE[key] = splits
        return _CACHE[key]


def names() -> list[str]:
    """Names of every registered dataset."""
    _load_all()
    return DATASETS.names()
