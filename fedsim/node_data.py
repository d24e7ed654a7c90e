"""A simulated client's data: its partition of the experiment's dataset.

A simulation worker is a long-lived process that serves many clients in turn,
so the dataset and its partition are built once per process (cached by their
config) and each client takes index views of them; nothing is copied per
client. :func:`node_data` is what :mod:`fedsim.node` trains and evaluates on.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim import data as datasets
from fedsim.config import ExperimentConfig
from fedsim.data.partition import partition
from fedsim.exceptions import ConfigError
from fedsim.train import derive_seed

__all__ = [
    "NodeData",
    "load_dataset",
    "node_data",
    "options_key",
    "partition_indices",
]


@dataclass(frozen=True)
class NodeData:
    """A client's local data (views into the process-wide dataset)."""

    partition_id: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def label_counts(self) -> list[int]:
        """Examples per class in the training split."""
        if self.y_train.is_floating_point():
            return []
        return np.bincount(self.y_train.numpy(), minlength=self.num_classes).tolist()


def options_key(options: Mapping[str, Any]) -> str:
    """A cache key for a mapping of options (JSON, keys sorted)."""
    return json.dumps(options, sort_keys=True, default=str)


def load_dataset(exp: ExperimentConfig) -> datasets.DataSplits:
    """The experiment's dataset (cached in-process by name and options)."""
    return datasets.load(exp.dataset.name, **{"seed": exp.seed, **exp.dataset.options})


@functools.lru_cache(maxsize=8)
def _partition_cached(
    dataset: str,
    dataset_options: str,
    name: str,
    options: str,
    num_clients: int,
    seed: int,
) -> tuple[np.ndarray, ...]:
    splits = datasets.load(dataset, **json.loads(dataset_options))
    labels = splits.train.y.numpy()
    if labels.ndim != 1:  # regression targets (fields): a single stratum
        labels = np.zeros(len(labels), dtype=np.int64)
    parts = partition(
        name, labels, num_clients=num_clients, seed=seed, **json.loads(options)
    )
    return tuple(parts)


def partition_indices(exp: ExperimentConfig) -> tuple[np.ndarray, ...]:
    """Every client's training-set indices (deterministic for the run seed)."""
    ds_opts = {"seed": exp.seed, **exp.dataset.options}
    return _partition_cached(
        exp.dataset.name,
        options_key(ds_opts),
        exp.partition.name,
        options_key(exp.partition.options),
        exp.num_clients,
        exp.seed,
    )


def _local_split(
    indices: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a client's indices into (train, held-out) with its own seed."""
    if fraction <= 0 or len(indices) < 2:
        return indices, indices[:0]
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    n_test = min(len(indices) - 1, max(1, math.floor(len(indices) * fraction)))
    return np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test])


def node_data(exp: ExperimentConfig, partition_id: int) -> NodeData:
    """Client ``partition_id``'s data in a simulation (one partition of the dataset).

    Cached per process: a simulation worker serves the same clients round after
    round, and a client's data never changes within a run.
    """
    if not 0 <= partition_id < exp.num_clients:
        raise ConfigError(
            f"partition-id={partition_id} is outside 0..{exp.num_clients - 1} "
            f"(num_clients={exp.num_clients})"
        )
    fraction = exp.evaluation.local_test_fraction if exp.evaluation.federated else 0.0
    key = options_key(
        {
            "dataset": [exp.dataset.name, exp.dataset.options],
            "partition": [exp.partition.name, exp.partition.options],
            "clients": exp.num_clients,
            "seed": exp.seed,
            "held_out": fraction,
        }
    )
    return _node_data_cached(exp, key, partition_id)


_NODE_CACHE: dict[tuple[str, int], NodeData] = {}


def _node_data_cached(exp: ExperimentConfig, key: str, partition_id: int) -> NodeData:
    found = _NODE_CACHE.get((key, partition_id))
    if found is None:
        found = _build_node_data(exp, partition_id)
        _NODE_CACHE[(key, partition_id)] = found
    return found


def _build_node_data(exp: ExperimentConfig, partition_id: int) -> NodeData:
    splits = load_dataset(exp)
    indices = partition_indices(exp)[partition_id]
    fraction = exp.evaluation.local_test_fraction if exp.evaluation.federated else 0.0
    train_idx, test_idx = _local_split(
        indices, fraction, derive_seed(exp.seed, 7, partition_id)
    )
    t_train = torch.as_tensor(train_idx, dtype=torch.long)
    t_test = torch.as_tensor(test_idx, dtype=torch.long)
    return NodeData(
        partition_id=partition_id,
        x_train=splits.train.x.index_select(0, t_train),
        y_train=splits.train.y.index_select(0, t_train),
        x_test=splits.train.x.index_select(0, t_test),
        y_test=splits.train.y.index_select(0, t_test),
        num_classes=splits.num_classes,
        input_shape=tuple(splits.input_shape),
    )
