"""Reference models: local models, their uniform ensemble, the central model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import baselines
from fedsim.baselines import (
    accuracy,
    central_model,
    ensemble_accuracy,
    reference_epochs,
    train_local_models,
    union_data,
)
from fedsim.config import ExperimentConfig, compose, from_dictconfig
from fedsim.data import ArrayDataset
from fedsim.exceptions import ConfigError
from fedsim.node import build_global_model, load_dataset, node_data

TINY = [
    "dataset=digits",
    "model.hidden=[32]",
    "num_clients=5",
    "client.lr=0.1",
]


def experiment(*extra: str) -> ExperimentConfig:
    return from_dictconfig(compose([*TINY, *extra]))


def lookup_model(logits: list[list[float]]) -> torch.nn.Module:
    """A classifier whose logits for one-hot input i are ``logits[i]``."""
    table = torch.tensor(logits, dtype=torch.float32)
    layer = torch.nn.Linear(table.shape[0], table.shape[1], bias=False)
    with torch.no_grad():
        layer.weight.copy_(table.T)
    return layer


def one_hot_test(labels: list[int]) -> ArrayDataset:
    n = len(labels)
    return ArrayDataset(x=torch.eye(n), y=torch.tensor(labels))


def test_ensemble_averages_probabilities_by_hand() -> None:
    # 4 test examples, 2 classes, 3 members
    a = lookup_model([[0, 20], [2, 0], [0, 1], [3, 0]])
    b = lookup_model([[3, 0], [0, 1], [0, 2], [0, 1]])
    c = lookup_model([[3, 0], [0, 3], [2, 0], [0, 2]])
    test = one_hot_test([0, 1, 1, 1])
    # member accuracies: a predicts 1,0,1,0 -> 1/4; b 0,1,1,1 -> 4/4; c 0,1,0,1 -> 3/4
    assert accuracy(a, test) == 0.25
    assert accuracy(b, test) == 1.0
    assert accuracy(c, test) == 0.75
    # example 0: p(class 1) = (sigmoid(20) + 2 sigmoid(-3)) / 3 = 0.365 -> class 0
    #   (averaging logits instead would give [2, 6.67] -> class 1, wrong)
    # example 1: (sigmoid(-2) + sigmoid(1) + sigmoid(3)) / 3 = 0.601 -> class 1
    # example 2: (sigmoid(1) + sigmoid(2) + sigmoid(-2)) / 3 = 0.577 -> class 1
    # example 3: (sigmoid(-3) + sigmoid(1) + sigmoid(2)) / 3 = 0.554 -> class 1
    assert ensemble_accuracy([a, b, c], test) == 1.0
    # a and c alone: example 0 -> (1 + 0.047) / 2 > 0.5 -> class 1 (wrong);
    # 1: (0.119 + 0.953) / 2 = 0.536 -> 1; 2: (0.731 + 0.119) / 2 = 0.425 -> 0 (wrong);
    # 3: (0.047 + 0.881) / 2 = 0.464 -> 0 (wrong)
    assert ensemble_accuracy([a, c], test) == 0.25
    # one member: its own accuracy, in any batch size
    assert ensemble_accuracy([c], test, batch_size=3) == accuracy(c, test)
    with pytest.raises(ValueError, match="at least one model"):
        ensemble_accuracy([], test)


def test_reference_epochs_by_hand() -> None:
    # full participation: every round's epochs
    assert reference_epochs(experiment("num_rounds=10", "client.epochs=1")) == 10
    # cohort floor(5 * 0.5) = 2 of 5 clients, 3 rounds x 2 epochs: ceil(12 / 5) = 3
    exp = experiment("num_rounds=3", "client.epochs=2", "fraction_train=0.5")
    assert reference_epochs(exp) == 3
    # cohort floor(5 * 0.1) -> at least 1 client: ceil(1 * 2 / 5) = 1
    assert reference_epochs(experiment("num_rounds=2", "fraction_train=0.1")) == 1


def test_union_is_every_clients_training_data() -> None:
    # pathological partition leaves out the classes no client drew
    exp = experiment("partition=pathological", "partition.classes_per_client=1")
    with pytest.warns(UserWarning, match="leaves out classes"):
        union = union_data(exp)
    nodes = [node_data(exp, j) for j in range(exp.num_clients)]
    assert len(union) == sum(len(n.y_train) for n in nodes)
    assert len(union) < len(load_dataset(exp).train)
    counts = np.bincount(union.y.numpy(), minlength=10)
    assert counts.tolist() == np.sum([n.label_counts() for n in nodes], axis=0).tolist()


def test_shared_and_independent_initialisation() -> None:
    # a vanishing learning rate leaves every model at its initial weights
    exp = experiment("client.lr=1e-12", "client.momentum=0")
    initial = build_global_model(exp, load_dataset(exp)).state_dict()
    shared = train_local_models(exp, 1)
    independent = train_local_models(exp, 1, init="independent")
    assert len(shared) == len(independent) == exp.num_clients
    for model in shared:
        for key, value in model.state_dict().items():
            assert torch.allclose(value, initial[key], atol=1e-8)
    weights = [m.state_dict()["layers.0.weight"] for m in independent]
    assert not torch.allclose(weights[0], initial["layers.0.weight"], atol=1e-3)
    assert not torch.allclose(weights[0], weights[1], atol=1e-3)
    again = train_local_models(exp, 1, init="independent")
    assert torch.equal(again[0].state_dict()["layers.0.weight"], weights[0])
    with pytest.raises(ConfigError, match="init='random'"):
        train_local_models(exp, 1, init="random")
    with pytest.raises(ConfigError, match="epochs=0"):
        train_local_models(exp, 0)


def test_references_on_a_label_skewed_split() -> None:
    """Each client holds 2 label-sorted shards (about 2 classes): local models
    stay poor, the ensemble and the central model do well, all reproducibly."""
    exp = experiment("partition=shard", "partition.shards_per_client=2")
    test = load_dataset(exp).test
    local = train_local_models(exp, 5)
    local_acc = [accuracy(m, test) for m in local]
    for j, model in enumerate(local):
        node = node_data(exp, j)
        own = ArrayDataset(x=node.x_train, y=node.y_train)
        assert accuracy(model, own) > 0.9  # it learnt its own two classes
        assert local_acc[j] < 0.45  # and knows little else (3-4 classes of 10)
    ensemble = ensemble_accuracy(local, test)
    central = central_model(exp, 5)
    central_acc = accuracy(central, test)
    assert ensemble > max(local_acc) + 0.2
    assert central_acc > 0.9 and central_acc > ensemble
    again = central_model(exp, 5)
    for key, value in central.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


def test_only_classification_has_references(monkeypatch: pytest.MonkeyPatch) -> None:
    class Regression:
        primary = "mse"
        higher_is_better = False

    monkeypatch.setattr(baselines.tasks, "build", lambda name, **kw: Regression())
    with pytest.raises(ConfigError, match="need task 'classification'"):
        train_local_models(experiment(), 1)
