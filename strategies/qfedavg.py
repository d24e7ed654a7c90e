"""q-FedAvg, fair resource allocation (Li et al., 2020, arXiv:1905.10497).

The Lipschitz estimate L = 1/client_learning_rate uses the client lr unless set.
Flower's built-in ``flwr.serverapp.strategy.QFedAvg``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import QFedAvg

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["qfedavg"]


@STRATEGIES.register("qfedavg")
def qfedavg(
    *,
    context: StrategyContext,
    q: float = 0.1,
    client_learning_rate: float | None = None,
) -> QFedAvg:
    """Registered ``qfedavg``; options as in ``configs/strategy/qfedavg.yaml``."""
    lr = context.client_lr if client_learning_rate is None else client_learning_rate
    return QFedAvg(q=q, client_learning_rate=lr, **context.sampling())
