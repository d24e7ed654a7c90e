"""FedAdam, adaptive server optimisation (Reddi et al., 2021, arXiv:2003.00295).

Flower's built-in ``flwr.serverapp.strategy.FedAdam``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedadam"]


@STRATEGIES.register("fedadam")
def fedadam(
    *,
    context: StrategyContext,
    eta: float = 0.01,
    eta_l: float = 0.05,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 0.001,
) -> FedAdam:
    """Registered ``fedadam``; options as in ``configs/strategy/fedadam.yaml``."""
    return FedAdam(
        eta=eta,
        eta_l=eta_l,
        beta_1=beta_1,
        beta_2=beta_2,
        tau=tau,
        **context.sampling(),
    )
