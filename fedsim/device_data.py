"""A device's own data: what a SuperNode started with ``data-path`` trains on.

In a deployment each device (SuperNode) holds its own examples. Started with
``--node-config 'data-path="/home/pi/data"'``, its ClientApp loads them with the
experiment's own dataset loader pointed at that path, so the files are read,
checked and standardised exactly as the server reads its copy of the dataset:

``mnist``, ``fashion_mnist``
    IDX files. ``data-path`` is the loader's ``data_dir`` (the folder holding
    ``mnist/`` or torchvision's ``MNIST/raw/``), or that ``mnist/`` (``MNIST/raw``)
    folder itself, or one of its files.
``cifar10``
    Python-version pickle batches: the folder holding ``cifar-10-batches-py/``,
    that folder itself, or one of its files.
``hf``
    A ``save_to_disk`` folder (or a file in it), passed as the loader's ``path``.

The device's whole train split is its training data (no partitioning); its
test split is its held-out set for federated evaluation
(``evaluation.federated=true``). Every other dataset option of the experiment
is kept; ``download`` is forced off, so a device never fetches data.

Identity: the server orders nodes by the ``partition-id`` each one reports.
A device with ``partition-id`` in its node config reports that; otherwise it
reports :func:`data_identity`, a 31-bit number derived from its training data,
which is stable across restarts and differs between devices holding different
data. Two devices with identical data must be given distinct ``partition-id``s.

This module imports no Flower code; only what the device's dataset needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from fedsim.config import Component, ExperimentConfig
from fedsim.data import ArrayDataset
from fedsim.exceptions import ConfigError, DataError
from fedsim.node import NodeData, load_dataset

__all__ = [
    "DEVICE_DATASETS",
    "data_identity",
    "device_dataset",
    "device_experiment",
    "device_node_data",
]

DEVICE_DATASETS: dict[str, tuple[tuple[str, ...], ...]] = {
    "mnist": (("mnist",), ("MNIST", "raw")),
    "fashion_mnist": (("fashion_mnist",), ("FashionMNIST", "raw")),
    "cifar10": (("cifar-10-batches-py",),),
    "hf": (),
}
"""Datasets a device can read from its own files, with the layout folders
(relative to the loader's ``data_dir``) that ``data-path`` may also name."""


def device_dataset(dataset: Component, data_path: str) -> Component:
    """The experiment's dataset component pointed at the device's files.

    Parameters
    ----------
    dataset : Component
        The experiment's dataset (name and options).
    data_path : str
        The device's ``data-path`` node config: a folder or a file in it.

    Returns
    -------
    Component
        The same dataset with ``data_dir`` (``path`` for ``hf``) set to the
        device's folder and ``download`` off.

    Raises
    ------
    ConfigError
        If the dataset is not read from files (bundled datasets such as
        ``digits``).
    DataError
        If ``data_path`` does not exist.
    """
    if dataset.name not in DEVICE_DATASETS:
        raise ConfigError(
            f"dataset {dataset.name!r} is not read from files, so a device cannot "
            f"bring its own copy with data-path; use one of: "
            f"{', '.join(DEVICE_DATASETS)} (or partition-id/num-partitions)"
        )
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(
            f"data-path={data_path!r} does not exist on this device; give the "
            "absolute path of the folder holding its data"
        )
    path = path.resolve()
    if path.is_file():
        path = path.parent
    options = {**dataset.options, "download": False}
    if dataset.name == "hf":
        return Component(dataset.name, {**options, "path": str(path)})
    data_dir = path
    for layout in DEVICE_DATASETS[dataset.name]:
        if path.parts[-len(layout) :] == layout:
            data_dir = path.parents[len(layout) - 1]
            break
    return Component(dataset.name, {**options, "data_dir": str(data_dir)})


def device_experiment(exp: ExperimentConfig, data_path: str) -> ExperimentConfig:
    """``exp`` with its dataset read from the device's ``data_path``."""
    return dataclasses.replace(exp, dataset=device_dataset(exp.dataset, data_path))


def data_identity(train: ArrayDataset) -> int:
    """A stable 31-bit number identifying a device by its training data.

    The SHA-256 digest of the inputs' and targets' shapes, dtypes and bytes,
    truncated to its first 31 bits: the same data always gives the same number,
    and different data collide with probability about 2**-31 per pair.
    """
    digest = hashlib.sha256()
    for tensor in (train.x, train.y):
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data.cast("B"))
    return int.from_bytes(digest.digest()[:4], "big") & 0x7FFFFFFF


def device_node_data(
    exp: ExperimentConfig, data_path: str, *, partition_id: int | None = None
) -> tuple[ExperimentConfig, NodeData]:
    """The device's experiment (dataset pointed at its files) and its data.

    Parameters
    ----------
    exp : ExperimentConfig
        The experiment the server runs.
    data_path : str
        The device's ``data-path`` node config.
    partition_id : int, optional
        The device's ``partition-id`` node config; by default
        :func:`data_identity` of its training data.

    Returns
    -------
    (ExperimentConfig, NodeData)
        The experiment to train with on this device (its dataset reads the
        device's files, so the model is built for their shape) and the data.

    Raises
    ------
    ConfigError
        For a negative ``partition_id`` or a dataset not read from files.
    DataError
        If the device's files are missing or malformed (the loader's message).
    """
    if partition_id is not None and partition_id < 0:
        raise ConfigError(f"partition-id must be >= 0, got {partition_id}")
    local = device_experiment(exp, data_path)
    splits = load_dataset(local)
    train = splits.train
    test = (
        splits.test
        if exp.evaluation.federated
        else splits.test.subset(torch.zeros(0, dtype=torch.long))
    )
    node = NodeData(
        partition_id=data_identity(train) if partition_id is None else partition_id,
        x_train=train.x,
        y_train=train.y,
        x_test=test.x,
        y_test=test.y,
        num_classes=splits.num_classes,
        input_shape=tuple(splits.input_shape),
    )
    return local, node
