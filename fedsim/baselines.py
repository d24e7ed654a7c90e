"""Non-federated reference models for a federated experiment (classification).

A federated result means little without the numbers it sits between. For one
experiment (dataset, partition, model, client recipe, seed) this module gives:

* **local models**: each client trains the experiment's model on its own
  partition only (:func:`train_local_models`); a federation should beat the
  mean local model and usually the best one;
* **the uniform ensemble** of those local models: the average of their softmax
  outputs (:func:`ensemble_accuracy`), a strong one-shot reference that costs
  one model per client at inference (PFNM reports it as its upper baseline);
* **a central model** trained on the union of the clients' training data
  (:func:`central_model`), the "all data in one place" reference.

Everything uses the experiment's own pieces: the partition of
:func:`fedsim.node.partition_indices`, the client recipe ``exp.client`` run by
:func:`fedsim.train.local_train`, and, unless asked otherwise, the very
initial weights the federated runs start from
(:func:`fedsim.node.build_global_model`). The learning rate is ``exp.client.lr``
held constant (``client.lr_decay`` is a per-round schedule and does not apply);
no proximal term is used. There is no Flower in here, so the PFNM one-shot
experiment and the ``fedsim compare`` command share these functions.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fedsim import tasks
from fedsim.config import ExperimentConfig
from fedsim.data import ArrayDataset
from fedsim.exceptions import ConfigError
from fedsim.models import build as build_model
from fedsim.node import (
    build_global_model,
    client_threads,
    load_dataset,
    model_kwargs,
    node_data,
    set_threads,
)
from fedsim.tasks import Task
from fedsim.tasks.classification import Classification
from fedsim.train import derive_seed, evaluate, local_train

__all__ = [
    "INITS",
    "accuracy",
    "central_model",
    "check_classification",
    "ensemble_accuracy",
    "reference_epochs",
    "train_local_models",
    "union_data",
]

#: How the local models are initialised: all from the federated runs' initial
#: global model, or each from its own seed (PFNM's one-shot setting).
INITS = ("shared", "independent")

# derive_seed tags, so that no reference stream coincides with a run's stream
_LOCAL_DATA_ORDER = 101
_CENTRAL_DATA_ORDER = 103
_INDEPENDENT_INIT = 107


def check_classification(exp: ExperimentConfig) -> Task:
    """The experiment's task, which must be classification.

    Raises
    ------
    ConfigError
        If the task is not the classification task (the references compare
        class predictions).
    """
    task = tasks.build(exp.task.name, **exp.task.options)
    if not isinstance(task, Classification):
        raise ConfigError(
            f"the reference models need task 'classification', not {exp.task.name!r}"
        )
    return task


def reference_epochs(exp: ExperimentConfig) -> int:
    """Epochs that give a reference model the local training a client gets.

    A client trains ``client.epochs`` epochs in each round it is sampled, and
    with exact participation it is sampled in ``cohort / num_clients`` of the
    ``num_rounds`` rounds (``cohort = max(1, floor(num_clients *
    fraction_train))``). The reference epochs are that expected total, rounded
    up: ``ceil(cohort * num_rounds * client.epochs / num_clients)``; with full
    participation, ``num_rounds * client.epochs``. The central model gets the
    same number of passes over the union of the data, so it processes as many
    examples as the whole federation does.
    """
    cohort = max(1, math.floor(exp.num_clients * exp.fraction_train))
    return max(
        1, math.ceil(cohort * exp.num_rounds * exp.client.epochs / exp.num_clients)
    )


def _check_epochs(epochs: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} is not allowed; it must be at least 1")


def _initial_model(
    exp: ExperimentConfig, partition_id: int, init: str
) -> torch.nn.Module:
    splits = load_dataset(exp)
    if init == "shared":
        with torch.random.fork_rng(devices=[]):
            return build_global_model(exp, splits)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(exp.seed, _INDEPENDENT_INIT, partition_id))
        return build_model(exp.model.name, **model_kwargs(exp, splits))


def _train(
    model: torch.nn.Module,
    data: ArrayDataset,
    exp: ExperimentConfig,
    task: Task,
    epochs: int,
    seed: int,
) -> torch.nn.Module:
    recipe = dataclasses.replace(exp.client, epochs=epochs)
    result = local_train(
        model,
        data.x,
        data.y,
        recipe,
        task,
        generator=torch.Generator().manual_seed(seed),
        lr=exp.client.lr,
    )
    model.load_state_dict(result.state_dict)
    model.eval()
    return model


def train_local_models(
    exp: ExperimentConfig, epochs: int, *, init: str = "shared"
) -> list[torch.nn.Module]:
    """Every client's model trained on its own partition only.

    Parameters
    ----------
    exp : ExperimentConfig
        The experiment (its dataset, partition, model, client recipe and seed).
    epochs : int
        Local epochs (see :func:`reference_epochs` for the federated-equivalent
        number).
    init : {"shared", "independent"}
        ``shared``: every client starts from the federated runs' initial global
        model; ``independent``: client ``j`` starts from its own seeded
        initialisation.

    Returns
    -------
    list of torch.nn.Module
        One trained model per client, in partition-id order, in eval mode.
    """
    if init not in INITS:
        raise ConfigError(
            f"init={init!r} is not allowed; it must be one of: {', '.join(INITS)}"
        )
    _check_epochs(epochs)
    task = check_classification(exp)
    set_threads(client_threads(exp))
    trained = []
    for pid in range(exp.num_clients):
        node = node_data(exp, pid)
        data = ArrayDataset(x=node.x_train, y=node.y_train)
        model = _initial_model(exp, pid, init)
        seed = derive_seed(exp.seed, _LOCAL_DATA_ORDER, pid)
        trained.append(_train(model, data, exp, task, epochs, seed))
    return trained


def union_data(exp: ExperimentConfig) -> ArrayDataset:
    """The union of every client's training examples (partition-id order).

    Examples that the partition gives to no client, and the clients' held-out
    splits under federated evaluation, are not in it.
    """
    parts = [node_data(exp, pid) for pid in range(exp.num_clients)]
    return ArrayDataset(
        x=torch.cat([p.x_train for p in parts]),
        y=torch.cat([p.y_train for p in parts]),
    )


def central_model(exp: ExperimentConfig, epochs: int) -> torch.nn.Module:
    """The experiment's model trained centrally on :func:`union_data`.

    It starts from the federated runs' initial global model and uses the
    client recipe for ``epochs`` epochs over the union (in eval mode on return).
    """
    _check_epochs(epochs)
    task = check_classification(exp)
    set_threads(client_threads(exp))
    model = _initial_model(exp, 0, "shared")
    seed = derive_seed(exp.seed, _CENTRAL_DATA_ORDER)
    return _train(model, union_data(exp), exp, task, epochs, seed)


def accuracy(
    model: torch.nn.Module, test: ArrayDataset, batch_size: int = 1000
) -> float:
    """Share of ``test`` that ``model`` classifies correctly (argmax of logits)."""
    task = tasks.build("classification")
    return evaluate(model, test.x, test.y, task, batch_size=batch_size)["accuracy"]


@torch.no_grad()
def ensemble_accuracy(
    models: list[torch.nn.Module], test: ArrayDataset, batch_size: int = 1000
) -> float:
    """Accuracy of the uniform ensemble: argmax of the mean of softmax outputs.

    Averaging probabilities (not logits) keeps one over-confident member from
    outvoting the others.

    Parameters
    ----------
    models : list of torch.nn.Module
        Classifiers returning logits of shape (batch, classes).
    test : ArrayDataset
        Inputs and integer labels.
    """
    if not models:
        raise ValueError("ensemble_accuracy needs at least one model, got none")
    for model in models:
        model.eval()
    n = len(test)
    correct = 0
    for start in range(0, n, batch_size):
        x = test.x[start : start + batch_size]
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in models]).mean(0)
        correct += int(
            (probs.argmax(dim=1) == test.y[start : start + batch_size]).sum()
        )
    return correct / max(n, 1)
