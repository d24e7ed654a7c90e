"""The strategy registry and what every strategy factory receives.

Strategies live in the top-level ``strategies`` package (one file each) and
register a factory here: ``@STRATEGIES.register("fedavg") def fedavg(*,
context: StrategyContext, **options) -> flwr.serverapp.strategy.Strategy``.
``options`` come from ``configs/strategy/<name>.yaml``; ``context`` carries what
fedsim knows about the run (client count, participation, the model factory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedsim.registry import Registry

__all__ = ["STRATEGIES", "StrategyContext"]

STRATEGIES: Registry[Any] = Registry("strategy")


@dataclass(frozen=True)
class StrategyContext:
    """Run facts a strategy factory may need.

    Attributes
    ----------
    num_clients : int
        Number of simulated clients (SuperNodes).
    fraction_train, fraction_evaluate : float
        Share of clients sampled per round for training / federated evaluation.
    federated_evaluation : bool
        Whether clients evaluate the global model on their local splits.
    seed : int
        The run seed.
    num_rounds : int
        Rounds the run will do.
    model_name : str
        Registered model name.
    model_kwargs : dict
        The kwargs the global model was built with (for rebuilding at new widths).
    num_classes : int
        Classes of the dataset.
    task : str
        Registered task name.
    client_lr : float
        The clients' local learning rate (q-FedAvg's Lipschitz estimate).
    """

    num_clients: int
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    federated_evaluation: bool = False
    seed: int = 0
    num_rounds: int = 1
    model_name: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 10
    task: str = "classification"
    client_lr: float = 0.05

    def cohort_size(self) -> int:
        """Clients per training round: ``floor(N * fraction_train)``, at least 1."""
        return max(1, math.floor(self.num_clients * self.fraction_train))

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments that make Flower's sampling exact from round 1.

        Flower computes the cohort from the nodes connected when a round starts
        and falls back to ``min_train_nodes`` (2) when none are yet; fedsim
        waits for every node before round 1 and sets the minimums to the exact
        cohort size, so every round samples exactly :meth:`cohort_size` clients.
        (fedsim's server loop only asks for federated evaluation when
        ``evaluation.federated`` is on.)
        """
        train = self.cohort_size()
        evaluate = max(1, math.floor(self.num_clients * self.fraction_evaluate))
        return {
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": train,
            "min_evaluate_nodes": evaluate,
            "min_available_nodes": self.num_clients,
        }
