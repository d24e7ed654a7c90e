"""FedAdagrad, adaptive server optimisation (Reddi et al., 2021, arXiv:2003.00295).

Flower's built-in ``flwr.serverapp.strategy.FedAdagrad``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdagrad

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedadagrad"]


@STRATEGIES.register("fedadagrad")
def fedadagrad(
    *,
    context: StrategyContext,
    eta: float = 0.1,
    eta_l: float = 0.05,
    tau: float = 0.001,
) -> FedAdagrad:
    """Registered ``fedadagrad``; options as in ``configs/strategy/fedadagrad.yaml``."""
    return FedAdagrad(eta=eta, eta_l=eta_l, tau=tau, **context.sampling())
