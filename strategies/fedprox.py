"""FedProx (Li et al., 2020, arXiv:1812.06127).

Flower's FedProx only sends ``proximal-mu`` to the clients; fedsim's ClientApp adds
the proximal term (mu/2)||w - w_global||^2 to every local batch loss.
Flower's built-in ``flwr.serverapp.strategy.FedProx``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedprox"]


@STRATEGIES.register("fedprox")
def fedprox(
    *,
    context: StrategyContext,
    proximal_mu: float = 0.01,
) -> FedProx:
    """Registered ``fedprox``; options as in ``configs/strategy/fedprox.yaml``."""
    return FedProx(proximal_mu=proximal_mu, **context.sampling())
