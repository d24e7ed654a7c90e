"""FedYogi, adaptive server optimisation (Reddi et al., 2021, arXiv:2003.00295).

Flower's built-in ``flwr.serverapp.strategy.FedYogi``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedYogi

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedyogi"]


@STRATEGIES.register("fedyogi")
def fedyogi(
    *,
    context: StrategyContext,
    eta: float = 0.01,
    eta_l: float = 0.05,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 0.001,
) -> FedYogi:
    """Registered ``fedyogi``; options as in ``configs/strategy/fedyogi.yaml``."""
    return FedYogi(
        eta=eta,
        eta_l=eta_l,
        beta_1=beta_1,
        beta_2=beta_2,
        tau=tau,
        **context.sampling(),
    )
