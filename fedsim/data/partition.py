"""Split a dataset's training examples among federated clients.

Every partitioner maps a label vector to one sorted int64 index array per
client; client i trains on ``splits.train.subset(parts[i])``. Each is seeded
and deterministic (the same seed gives the same parts in every process), and
no example goes to two clients. They are registered in :data:`PARTITIONS`
under the name used by ``configs/partition/<name>.yaml``:

``iid``
    A seeded shuffle, then flwr-datasets' ``IidPartitioner`` (contiguous,
    near-equal shards of the shuffled order; that partitioner never shuffles
    by itself). Uses every example.
``dirichlet``
    flwr-datasets' ``DirichletPartitioner``: each class is divided among the
    clients by proportions drawn from Dir(alpha), redrawn (at most 10 more
    times) until every client has ``min_partition_size`` examples. Uses every
    example.
``pathological``
    flwr-datasets' ``PathologicalPartitioner``: every client gets
    ``classes_per_client`` classes, and each class is divided evenly among the
    clients that got it. Examples of a class no client got are left out (a
    warning names those classes).
``shard``
    flwr-datasets' ``ShardPartitioner``: the examples sorted by label are cut
    into equal shards, dealt out at random. Examples beyond the last complete
    shard, and shards beyond those dealt, are left out.
``hetero_dir``
    PFNM/FedMA's "hetero-dir" scheme, written here since no flwr-datasets
    partitioner implements its balancing rule (see :func:`hetero_dir`). Uses
    every example.
"""

from __future__ import annotations

import inspect
import re
import warnings
from typing import Any

import numpy as np

from fedsim.data._hetero_dir import hetero_dir_draw
from fedsim.data._partition_checks import (
    as_int,
    check_alpha,
    check_common,
    check_labels,
    check_min_size,
)
from fedsim.exceptions import ConfigError, DataError
from fedsim.registry import Registry

__all__ = ["PARTITIONS", "label_counts", "partition"]

PARTITIONS: Registry[list[np.ndarray]] = Registry("partition")

_ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")
# flwr-datasets' PathologicalPartitioner error for a class spread too thin
_OVERUSED = re.compile(
    r"Label: (\S+) is needed to be assigned to more partitions \((\d+)\).*?"
    r"dataset \((\d+)\)",
    re.DOTALL,
)


def _run(
    partitioner: Any, labels: np.ndarray, order: np.ndarray | None = None
) -> list[np.ndarray]:
    """Apply a flwr-datasets partitioner; return each client's sorted indices.

    The partitioner sees a ``datasets.Dataset`` with the ``label`` column and
    an ``index`` column carrying each row's position in ``labels`` (rows in
    ``order`` if given), so the indices survive any reordering it does.
    """
    from datasets import Dataset

    positions = np.arange(len(labels)) if order is None else order
    partitioner.dataset = Dataset.from_dict(
        {"label": labels[positions], "index": positions.astype(np.int64)}
    )
    parts = []
    for client in range(partitioner.num_partitions):
        rows = partitioner.load_partition(client).with_format("numpy")["index"][:]
        parts.append(np.sort(np.asarray(rows, dtype=np.int64)))
    return parts


@PARTITIONS.register("iid")
def iid(labels: np.ndarray, *, num_clients: int, seed: int) -> list[np.ndarray]:
    """Near-equal random parts (sizes differ by at most one); uses every example.

    The examples are shuffled with ``seed`` first, then cut into contiguous
    shards by flwr-datasets' ``IidPartitioner``.
    """
    from flwr_datasets.partitioner import IidPartitioner

    array, clients, seed = check_common(labels, num_clients, seed, integer=False)
    order = np.random.default_rng(seed).permutation(len(array))
    return _run(IidPartitioner(num_partitions=clients), array, order)


@PARTITIONS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    *,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    min_partition_size: int = 10,
    self_balancing: bool = False,
) -> list[np.ndarray]:
    """Label skew by Dir(``alpha``) class proportions; uses every example.

    Parameters
    ----------
    alpha : float
        Concentration (> 0); small values give few classes per client.
    min_partition_size : int
        Fewest examples a client may get; the draw is repeated (up to 10 more
        times) until it holds.
    self_balancing : bool
        Give no more examples to a client that already holds more than N/J.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    array, clients, seed = check_common(labels, num_clients, seed)
    concentration = check_alpha(alpha)
    minimum = check_min_size(
        min_partition_size, "min_partition_size", len(array), clients
    )
    partitioner = DirichletPartitioner(
        num_partitions=clients,
        partition_by="label",
        alpha=concentration,
        min_partition_size=minimum,
        self_balancing=bool(self_balancing),
        shuffle=False,
        seed=seed,
    )
    with warnings.catch_warnings():
        # it warns on every failed draw; failure after the last is raised below
        warnings.simplefilter("ignore", UserWarning)
        try:
            return _run(partitioner, array)
        except ValueError as exc:
            if "max number of attempts" not in str(exc):
                raise
            raise DataError(
                f"dirichlet partition gave some client fewer than "
                f"min_partition_size={minimum} examples in all 11 draws with "
                f"alpha={concentration} over {clients} clients; raise alpha or "
                f"lower min_partition_size"
            ) from None


@PARTITIONS.register("pathological")
def pathological(
    labels: np.ndarray,
    *,
    num_clients: int,
    seed: int,
    classes_per_client: int = 2,
    class_assignment_mode: str = "random",
) -> list[np.ndarray]:
    """Each client sees only ``classes_per_client`` classes.

    Parameters
    ----------
    classes_per_client : int
        Classes per client, 1..number of classes present in ``labels``.
    class_assignment_mode : str
        ``"random"`` (distinct classes drawn per client), ``"deterministic"``
        (client i gets classes i, i+1, ... modulo K) or
        ``"first-deterministic"`` (class i mod K first, the rest at random, so
        every class is used when J >= K).
    """
    from flwr_datasets.partitioner import PathologicalPartitioner

    array, clients, seed = check_common(labels, num_clients, seed)
    classes = np.unique(array)
    per_client = as_int(classes_per_client, "classes_per_client")
    if not 1 <= per_client <= len(classes):
        raise ConfigError(
            f"classes_per_client must lie in 1..{len(classes)} (the classes present), "
            f"got {per_client}"
        )
    if class_assignment_mode not in _ASSIGNMENT_MODES:
        raise ConfigError(
            f"class_assignment_mode must be one of {', '.join(_ASSIGNMENT_MODES)}, "
            f"got {class_assignment_mode!r}"
        )
    partitioner = PathologicalPartitioner(
        num_partitions=clients,
        partition_by="label",
        num_classes_per_partition=per_client,
        class_assignment_mode=class_assignment_mode,
        shuffle=False,
        seed=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            parts = _run(partitioner, array)
        except ValueError as exc:
            found = _OVERUSED.search(str(exc))
            if found is None:
                raise
            label, wanted, have = found.groups()
            raise DataError(
                f"pathological partition puts class {label} on {wanted} clients but "
                f"it has only {have} examples; lower num_clients or "
                f"classes_per_client, or use class_assignment_mode='deterministic'"
            ) from None
    used = np.unique(array[np.concatenate(parts)])
    unused = np.setdiff1d(classes, used)
    if unused.size:
        warnings.warn(
            f"pathological partition leaves out classes {unused.tolist()} (no client "
            f"drew them); class_assignment_mode='first-deterministic' uses every "
            f"class when num_clients >= the number of classes",
            UserWarning,
            stacklevel=4,  # the caller of partition()
        )
    return parts


@PARTITIONS.register("shard")
def shard(
    labels: np.ndarray,
    *,
    num_clients: int,
    seed: int,
    shards_per_client: int | None = 2,
    shard_size: int | None = None,
) -> list[np.ndarray]:
    """Label-sorted shards dealt out at random (McMahan et al.'s non-IID split).

    Parameters
    ----------
    shards_per_client : int, optional
        Shards per client. Without ``shard_size`` the shard size is
        floor(N / (J * shards_per_client)).
    shard_size : int, optional
        Examples per shard. Without ``shards_per_client``, all
        floor(N / shard_size) shards are dealt out, the first clients getting
        one more when they do not divide evenly.
    """
    from flwr_datasets.partitioner import ShardPartitioner

    array, clients, seed = check_common(labels, num_clients, seed)
    n = len(array)
    per_client = (
        None
        if shards_per_client is None
        else as_int(shards_per_client, "shards_per_client")
    )
    size = None if shard_size is None else as_int(shard_size, "shard_size")
    if per_client is None and size is None:
        raise ConfigError("shard partition needs shards_per_client or shard_size")
    for what, value in (("shards_per_client", per_client), ("shard_size", size)):
        if value is not None and value < 1:
            raise ConfigError(f"{what} must be at least 1, got {value}")
    if per_client is not None and size is not None and clients * per_client * size > n:
        raise DataError(
            f"shard partition needs num_clients*shards_per_client*shard_size = "
            f"{clients * per_client * size} examples but there are {n}"
        )
    if per_client is not None and size is None and clients * per_client > n:
        raise DataError(
            f"shard partition needs num_clients*shards_per_client = "
            f"{clients * per_client} shards of at least one example but there are "
            f"{n} examples"
        )
    if per_client is None and size is not None and n // size < clients:
        raise DataError(
            f"shard_size={size} gives {n // size} shards of {n} examples, fewer than "
            f"num_clients={clients}; lower shard_size to at most {n // clients}"
        )
    partitioner = ShardPartitioner(
        num_partitions=clients,
        partition_by="label",
        num_shards_per_partition=per_client,
        shard_size=size,
        keep_incomplete_shard=False,
        shuffle=False,
        seed=seed,
    )
    with warnings.catch_warnings():
        # pyarrow deprecation inside datasets' sort; nothing the user can act on
        warnings.simplefilter("ignore", FutureWarning)
        return _run(partitioner, array)


@PARTITIONS.register("hetero_dir")
def hetero_dir(
    labels: np.ndarray,
    *,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 10,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """PFNM/FedMA's balanced Dirichlet label skew; uses every example.

    For each class a Dir_J(``alpha``) draw divides its examples among the
    clients, except that clients already holding at least N/J examples get
    none (the others' proportions are renormalised). Everything is redrawn
    until every client has ``min_size`` examples.

    Parameters
    ----------
    alpha : float
        Concentration (> 0); PFNM and FedMA use 0.5.
    min_size : int
        Fewest examples a client may get (PFNM and FedMA use 10).
    max_attempts : int
        Full redraws tried before giving up with a :class:`DataError`.
    """
    array, clients, seed = check_common(labels, num_clients, seed)
    concentration = check_alpha(alpha)
    minimum = check_min_size(min_size, "min_size", len(array), clients)
    attempts = as_int(max_attempts, "max_attempts")
    if attempts < 1:
        raise ConfigError(f"max_attempts must be at least 1, got {attempts}")
    parts = hetero_dir_draw(
        array,
        num_clients=clients,
        alpha=concentration,
        min_size=minimum,
        max_attempts=attempts,
        rng=np.random.default_rng(seed),
    )
    if parts is None:
        raise DataError(
            f"hetero_dir partition gave some client fewer than min_size={minimum} "
            f"examples in all {attempts} draws with alpha={concentration} over "
            f"{clients} clients; raise alpha or lower min_size"
        )
    return parts


def partition(
    name: str, labels: np.ndarray, *, num_clients: int, seed: int, **options: Any
) -> list[np.ndarray]:
    """Split ``labels``' indices among ``num_clients`` clients with ``name``.

    Parameters
    ----------
    name : str
        A registered partitioner (``PARTITIONS.names()``).
    labels : numpy.ndarray
        The training labels, shape (N,).
    num_clients : int
        Number of clients J, 1..N.
    seed : int
        Seed; the same seed gives the same parts.
    **options
        That partitioner's own options (see ``configs/partition/<name>.yaml``).

    Returns
    -------
    list of numpy.ndarray
        Client i's sorted int64 indices into ``labels``; pairwise disjoint.

    Raises
    ------
    fedsim.exceptions.ConfigError
        For an unknown partitioner, an unknown option or a value out of range.
    fedsim.exceptions.DataError
        When the labels cannot be split as asked.
    """
    factory = PARTITIONS.get(name)
    accepted = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.name not in ("num_clients", "seed")
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"partition {name!r} has no option {unknown[0]!r}; its options are: "
            f"{', '.join(accepted) or '(none)'}"
        )
    check_common(labels, num_clients, seed, integer=False)
    return PARTITIONS.build(
        name, labels=labels, num_clients=num_clients, seed=seed, **options
    )


def label_counts(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """How many examples of each class each client holds.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels in 0..num_classes-1, shape (N,).
    parts : list of numpy.ndarray
        Each client's indices into ``labels``.
    num_classes : int
        Number of classes K.

    Returns
    -------
    numpy.ndarray
        Shape (J, K), int64: entry (j, k) counts client j's examples of class k.
    """
    array = check_labels(labels)
    classes = as_int(num_classes, "num_classes")
    if classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {classes}")
    if array.min() < 0 or array.max() >= classes:
        raise DataError(
            f"labels must lie in 0..{classes - 1}, got values from {array.min()} "
            f"to {array.max()}"
        )
    counts = np.zeros((len(parts), classes), dtype=np.int64)
    for client, indices in enumerate(parts):
        counts[client] = np.bincount(
            array[np.asarray(indices, dtype=np.int64)], minlength=classes
        )
    return counts
