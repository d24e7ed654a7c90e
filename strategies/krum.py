"""Krum, Byzantine-robust selection (Blanchard et al., 2017, NeurIPS).

Flower's built-in ``flwr.serverapp.strategy.Krum``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import Krum

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["krum"]


@STRATEGIES.register("krum")
def krum(
    *,
    context: StrategyContext,
    num_malicious_nodes: int = 0,
) -> Krum:
    """Registered ``krum``; options as in ``configs/strategy/krum.yaml``."""
    return Krum(num_malicious_nodes=num_malicious_nodes, **context.sampling())
