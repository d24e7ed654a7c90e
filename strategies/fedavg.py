"""Federated Averaging (McMahan et al., 2017, arXiv:1602.05629).

Flower's built-in ``flwr.serverapp.strategy.FedAvg``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedavg"]


@STRATEGIES.register("fedavg")
def fedavg(*, context: StrategyContext) -> FedAvg:
    """Registered ``fedavg``; options as in ``configs/strategy/fedavg.yaml``."""
    return FedAvg(**context.sampling())
