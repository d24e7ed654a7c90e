"""FedAvg with server momentum (Hsu et al., 2019, arXiv:1909.06335).

Flower's built-in ``flwr.serverapp.strategy.FedAvgM``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedavgm"]


@STRATEGIES.register("fedavgm")
def fedavgm(
    *,
    context: StrategyContext,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.9,
) -> FedAvgM:
    """Registered ``fedavgm``; options as in ``configs/strategy/fedavgm.yaml``."""
    return FedAvgM(
        server_learning_rate=server_learning_rate,
        server_momentum=server_momentum,
        **context.sampling(),
    )
