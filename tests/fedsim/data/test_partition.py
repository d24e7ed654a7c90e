"""Partitioners: exact parts against independent re-implementations, and pinned counts.

Each ``_ref_*`` function below re-derives a partitioner from its published
description (flwr-datasets 0.6.1's algorithms, PFNM's ``partition_data``),
drawing from ``np.random.default_rng(seed)`` in the same order, and must give
the very same index sets. The ``PINNED_*`` label-count tables were computed
once in another process and fix the result across processes and versions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedsim.data.partition import PARTITIONS, label_counts, partition
from fedsim.exceptions import ConfigError, DataError

# 40 examples, 4 classes of sizes 10, 15, 8, 7, in a fixed mixed order
LABELS = np.array(
    [3, 0, 1, 1, 2, 0, 3, 1, 0, 2, 1, 1, 0, 3, 2, 2, 1, 0, 1, 3,
     0, 2, 1, 1, 3, 0, 2, 1, 0, 1, 2, 3, 1, 0, 1, 2, 0, 1, 3, 1]
)  # fmt: skip
K = 4
ROOT = Path(__file__).resolve().parents[3]


def _sorted_parts(parts: list[list[int]]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _ref_iid(n: int, clients: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    base, extra = divmod(n, clients)
    parts, start = [], 0
    for j in range(clients):
        size = base + (1 if j < extra else 0)
        parts.append(perm[start : start + size].tolist())
        start += size
    return _sorted_parts(parts)


def _ref_dirichlet(
    labels: np.ndarray,
    clients: int,
    seed: int,
    alpha: float,
    min_size: int,
    balance: bool,
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(labels)
    for _ in range(11):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for k in sorted(set(labels.tolist())):
            members = np.nonzero(labels == k)[0]
            props = list(rng.dirichlet([alpha] * clients))
            if balance:
                props = [
                    0.0 if len(parts[j]) > n / clients else props[j]
                    for j in range(clients)
                ]
                total = sum(props)
                props = [p / total for p in props]
            cuts = (np.cumsum(props) * len(members)).astype(int)[:-1]
            for j, chunk in enumerate(np.split(members, cuts)):
                parts[j].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _sorted_parts(parts)
    raise AssertionError("reference dirichlet found no valid draw")


def _ref_pathological(
    labels: np.ndarray, clients: int, seed: int, per_client: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels.tolist()))
    chosen = [
        rng.choice(classes, size=per_client, replace=False).tolist()
        for _ in range(clients)
    ]
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in classes:
        holders = [j for j in range(clients) if c in chosen[j]]
        if not holders:
            continue
        chunks = np.array_split(np.nonzero(labels == c)[0], len(holders))
        for j, chunk in zip(holders, chunks, strict=True):
            parts[j].extend(chunk.tolist())
    return _sorted_parts(parts)


def _ref_shard(
    labels: np.ndarray, clients: int, seed: int, per_client: int
) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    size = len(labels) // (clients * per_client)
    usable = len(labels) // size
    dealt = np.random.default_rng(seed).permutation(usable)[: clients * per_client]
    parts = []
    for j in range(clients):
        mine = dealt[j * per_client : (j + 1) * per_client]
        parts.append([int(i) for s in mine for i in order[s * size : (s + 1) * size]])
    return _sorted_parts(parts)


def _ref_hetero_dir(
    labels: np.ndarray,
    clients: int,
    seed: int,
    alpha: float,
    min_size: int,
    exact_total: bool = True,
) -> list[np.ndarray]:
    """PFNM's experiment.py::partition_data('hetero-dir'), with a seeded Generator.

    ``exact_total`` pins the cumulative share after the last eligible client to
    1 (fedsim's fix); without it this is the reference code, rounding leak and
    all.
    """
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    smallest = 0
    while smallest < min_size:
        idx_batch: list[list[int]] = [[] for _ in range(clients)]
        for k in range(labels.max() + 1):
            idx_k = np.where(labels == k)[0]
            rng.shuffle(idx_k)
            proportions = rng.dirichlet(np.repeat(alpha, clients))
            proportions = np.array(
                [
                    p * (len(idx_j) < n / clients)
                    for p, idx_j in zip(proportions, idx_batch, strict=True)
                ]
            )
            proportions = proportions / proportions.sum()
            shares = np.cumsum(proportions)
            if exact_total:
                shares[np.nonzero(proportions)[0].max() :] = 1.0
            cuts = (shares * len(idx_k)).astype(int)[:-1]
            idx_batch = [
                idx_j + idx.tolist()
                for idx_j, idx in zip(idx_batch, np.split(idx_k, cuts), strict=True)
            ]
        smallest = min(len(idx_j) for idx_j in idx_batch)
    return _sorted_parts(idx_batch)


# (name, options, reference) on LABELS with 4 clients and seed 7
CASES: dict[str, tuple[dict[str, Any], Any]] = {
    "iid": ({}, lambda: _ref_iid(len(LABELS), 4, 7)),
    "dirichlet": (
        {"alpha": 0.5, "min_partition_size": 2},
        lambda: _ref_dirichlet(LABELS, 4, 7, 0.5, 2, False),
    ),
    "dirichlet_balanced": (
        {"alpha": 0.5, "min_partition_size": 2, "self_balancing": True},
        lambda: _ref_dirichlet(LABELS, 4, 7, 0.5, 2, True),
    ),
    "pathological": (
        {"classes_per_client": 2},
        lambda: _ref_pathological(LABELS, 4, 7, 2),
    ),
    "shard": ({"shards_per_client": 2}, lambda: _ref_shard(LABELS, 4, 7, 2)),
    "hetero_dir": (
        {"alpha": 0.5, "min_size": 3},
        lambda: _ref_hetero_dir(LABELS, 4, 7, 0.5, 3),
    ),
}

# label_counts(LABELS, parts, 4) per case, rows = clients
PINNED: dict[str, list[list[int]]] = {
    "dirichlet": [[0, 2, 1, 1], [4, 10, 3, 1], [3, 2, 3, 1], [3, 1, 1, 4]],
    "dirichlet_balanced": [[3, 9, 0, 0], [6, 1, 0, 3], [0, 0, 0, 4], [1, 5, 8, 0]],
    "hetero_dir": [[0, 0, 0, 7], [8, 3, 0, 0], [1, 7, 4, 0], [1, 5, 4, 0]],
    "iid": [[3, 2, 3, 2], [1, 4, 2, 3], [4, 4, 2, 0], [2, 5, 1, 2]],
    "pathological": [[0, 0, 3, 4], [0, 0, 3, 3], [5, 0, 2, 0], [5, 15, 0, 0]],
    "shard": [[5, 0, 3, 2], [0, 5, 0, 5], [0, 5, 5, 0], [5, 5, 0, 0]],
}


def _registry_name(case: str) -> str:
    return case.removesuffix("_balanced")


def _parts(case: str, seed: int = 7) -> list[np.ndarray]:
    options, _ = CASES[case]
    return partition(_registry_name(case), LABELS, num_clients=4, seed=seed, **options)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parts_match_an_independent_reimplementation(case: str) -> None:
    parts = _parts(case)
    expected = CASES[case][1]()
    assert len(parts) == len(expected) == 4
    for got, want in zip(parts, expected, strict=True):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", sorted(CASES))
def test_label_counts_are_pinned(case: str) -> None:
    counts = label_counts(LABELS, _parts(case), K)
    np.testing.assert_array_equal(counts, np.array(PINNED[case]))


def test_pathological_deterministic_counts_by_hand() -> None:
    # client j holds classes j and j+1 (mod 4); each class is halved between its
    # two holders by np.array_split, the lower client id taking the larger half:
    # class 0 (10) -> clients 0, 3: 5, 5; class 1 (15) -> clients 0, 1: 8, 7;
    # class 2 (8) -> clients 1, 2: 4, 4; class 3 (7) -> clients 2, 3: 4, 3.
    parts = partition(
        "pathological",
        LABELS,
        num_clients=4,
        seed=0,
        classes_per_client=2,
        class_assignment_mode="deterministic",
    )
    expected = [[5, 8, 0, 0], [0, 7, 4, 0], [0, 0, 4, 4], [5, 0, 0, 3]]
    np.testing.assert_array_equal(label_counts(LABELS, parts, K), expected)


def test_shard_by_size_deals_every_whole_shard() -> None:
    # floor(40 / 6) = 6 shards of 6 for 4 clients: one each, the first two get a
    # second; the last 4 label-sorted examples (class 3) are left out.
    parts = partition(
        "shard", LABELS, num_clients=4, seed=3, shards_per_client=None, shard_size=6
    )
    assert [len(p) for p in parts] == [12, 12, 6, 6]
    used = np.concatenate(parts)
    order = np.argsort(LABELS, kind="stable")
    np.testing.assert_array_equal(np.sort(used), np.sort(order[:36]))


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition("iid", LABELS, num_clients=3, seed=1)
    assert [len(p) for p in parts] == [14, 13, 13]


def _big_labels() -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 30))


@pytest.mark.filterwarnings("ignore:pathological partition leaves out")
@pytest.mark.parametrize("name", PARTITIONS.names())
def test_parts_are_sorted_disjoint_and_deterministic(name: str) -> None:
    labels = _big_labels()
    options: dict[str, Any] = {"dirichlet": {"min_partition_size": 5}}.get(name, {})
    first = partition(name, labels, num_clients=5, seed=11, **options)
    again = partition(name, labels, num_clients=5, seed=11, **options)
    other = partition(name, labels, num_clients=5, seed=12, **options)
    assert len(first) == 5
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    used = np.concatenate(first)
    assert len(np.unique(used)) == len(used), "an example went to two clients"
    assert used.min() >= 0 and used.max() < len(labels)
    for part in first:
        assert part.dtype == np.int64 and len(part) > 0
        assert np.all(np.diff(part) > 0)
    if name in ("iid", "dirichlet", "hetero_dir", "shard"):
        # shard: 300 / (5 clients * 2 shards) = 30 divides evenly, so all are used
        assert len(used) == len(labels)


def test_hetero_dir_stops_feeding_clients_at_n_over_j() -> None:
    labels = _big_labels()
    clients, min_size = 5, 10
    cap = len(labels) / clients
    triggered = 0
    for seed in range(20):
        parts = partition(
            "hetero_dir",
            labels,
            num_clients=clients,
            seed=seed,
            alpha=0.2,
            min_size=min_size,
        )
        counts = label_counts(labels, parts, 10)
        held_before = np.cumsum(counts, axis=1) - counts  # before each class, in order
        full = held_before >= cap
        assert np.all(counts[full] == 0), f"seed {seed}: a full client got more"
        triggered += int(full.sum())
        assert counts.sum(axis=1).min() >= min_size
        assert counts.sum() == len(labels)
    assert triggered > 0, "the balancing rule never applied; the test proves nothing"


def test_hetero_dir_fixes_the_reference_rounding_leak() -> None:
    # With the reference's plain cumsum, seed 1 hands a full client one example
    # (a share that should be exactly 1 sums to just below it); fedsim does not.
    labels = _big_labels()
    cap = len(labels) / 5
    leaky = label_counts(labels, _ref_hetero_dir(labels, 5, 1, 0.2, 10, False), 10)
    held_before = np.cumsum(leaky, axis=1) - leaky
    assert np.any(leaky[held_before >= cap] > 0)
    ours = partition("hetero_dir", labels, num_clients=5, seed=1, alpha=0.2)
    np.testing.assert_array_equal(
        label_counts(labels, ours, 10),
        label_counts(labels, _ref_hetero_dir(labels, 5, 1, 0.2, 10), 10),
    )


def test_hetero_dir_redraws_until_min_size() -> None:
    # seed 8 needs three full draws before every client holds 12 examples
    labels = _big_labels()
    options: dict[str, Any] = {"alpha": 0.1, "min_size": 12}
    for attempts in (1, 2):
        with pytest.raises(DataError, match=f"in all {attempts} draws"):
            partition(
                "hetero_dir",
                labels,
                num_clients=8,
                seed=8,
                max_attempts=attempts,
                **options,
            )
    parts = partition(
        "hetero_dir", labels, num_clients=8, seed=8, max_attempts=3, **options
    )
    assert min(len(p) for p in parts) >= 12
    np.testing.assert_array_equal(
        label_counts(labels, parts, 10),
        label_counts(labels, _ref_hetero_dir(labels, 8, 8, 0.1, 12), 10),
    )


def test_label_counts_by_hand() -> None:
    labels = np.array([0, 2, 1, 1, 0, 2, 2])
    parts = [np.array([0, 3]), np.array([1, 2, 5]), np.array([6])]
    expected = np.array([[1, 1, 0], [0, 1, 2], [0, 0, 1]])
    counts = label_counts(labels, parts, 3)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(label_counts(labels, parts, 5)[:, 3:], 0)
    with pytest.raises(
        DataError, match=r"labels must lie in 0\.\.1, got values from 0 to 2"
    ):
        label_counts(labels, parts, 2)


def _one_sentence(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and ". " not in message, message
    return message


BAD_SETTINGS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("iid", {"num_clients": 0}, ConfigError,
     r"num_clients must lie in 1\.\.40 \(the number of examples\), got 0"),
    ("dirichlet", {"num_clients": 41}, ConfigError,
     r"num_clients must lie in 1\.\.40 .*got 41"),
    ("iid", {"seed": -1}, ConfigError,
     r"seed must be a non-negative integer, got -1"),
    ("dirichlet", {"alpha": 0.0}, ConfigError,
     r"alpha must be a positive finite number, got 0\.0"),
    ("hetero_dir", {"alpha": -1}, ConfigError,
     r"alpha must be a positive finite number, got -1"),
    ("pathological", {"classes_per_client": 0}, ConfigError,
     r"classes_per_client must lie in 1\.\.4 \(the classes present\), got 0"),
    ("pathological", {"classes_per_client": 5}, ConfigError,
     r"classes_per_client must lie in 1\.\.4 .*got 5"),
    ("pathological", {"class_assignment_mode": "cyclic"}, ConfigError,
     r"class_assignment_mode must be one of random, deterministic, "
     r"first-deterministic, got 'cyclic'"),
    ("hetero_dir", {"min_size": 11}, DataError,
     r"min_size=11 is impossible for 40 examples over 4 clients; "
     r"it must lie in 0\.\.10"),
    ("dirichlet", {"alpha": 0.05, "min_partition_size": 10}, DataError,
     r"dirichlet partition gave some client fewer than min_partition_size=10 "
     r"examples in all 11 draws with alpha=0\.05 over 4 clients; raise alpha or "
     r"lower min_partition_size"),
    ("hetero_dir", {"alpha": 0.05, "min_size": 10, "max_attempts": 20}, DataError,
     r"hetero_dir partition gave some client fewer than min_size=10 examples in "
     r"all 20 draws"),
    ("shard", {"shards_per_client": 11}, DataError,
     r"needs num_clients\*shards_per_client = 44 shards"),
    ("shard", {"shards_per_client": None, "shard_size": 11}, DataError,
     r"shard_size=11 gives 3 shards of 40 examples, fewer than num_clients=4; "
     r"lower shard_size to at most 10"),
    ("shard", {"shards_per_client": None}, ConfigError,
     r"shard partition needs shards_per_client or shard_size"),
    ("iid", {"alpha": 0.5}, ConfigError,
     r"partition 'iid' has no option 'alpha'; its options are: \(none\)"),
    ("dirichet", {}, ConfigError,
     r"unknown partition 'dirichet' \(did you mean 'dirichlet'\?\)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs", "error", "pattern"), BAD_SETTINGS)
def test_bad_settings_fail_with_one_sentence(
    name: str, kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    call: dict[str, Any] = {"num_clients": 4, "seed": 0, **kwargs}
    with pytest.raises(error, match=pattern) as exc:
        partition(name, LABELS, **call)
    _one_sentence(exc)


def test_pathological_class_on_too_many_clients_is_translated() -> None:
    labels = np.array([0] + [1] * 10)
    with pytest.raises(
        DataError, match=r"puts class 0 on 4 clients but it has only 1 examples"
    ) as exc:
        partition("pathological", labels, num_clients=4, seed=0, classes_per_client=2)
    _one_sentence(exc)


def test_pathological_warns_about_left_out_classes() -> None:
    with pytest.warns(UserWarning, match=r"leaves out classes \[\d, \d\]"):
        parts = partition(
            "pathological", LABELS, num_clients=1, seed=0, classes_per_client=2
        )
    assert len(np.unique(LABELS[parts[0]])) == 2


@pytest.mark.parametrize(
    "labels", [np.zeros((4, 2), dtype=np.int64), np.linspace(0, 1, 8)]
)
def test_bad_labels_are_refused(labels: np.ndarray) -> None:
    with pytest.raises(DataError, match="labels must be"):
        partition("dirichlet", labels, num_clients=2, seed=0)


@pytest.mark.parametrize("name", PARTITIONS.names())
def test_config_file_lists_every_option_with_its_default(name: str) -> None:
    import inspect

    config = yaml.safe_load(
        (ROOT / "configs" / "partition" / f"{name}.yaml").read_text()
    )
    assert config.pop("name") == name
    params = inspect.signature(PARTITIONS.get(name)).parameters.values()
    defaults = {
        p.name: p.default
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in ("num_clients", "seed")
    }
    assert config == defaults
