"""Multi-Krum: average of the m best Krum scores (Blanchard et al., 2017).

Flower's built-in ``flwr.serverapp.strategy.MultiKrum``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import MultiKrum

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["multikrum"]


@STRATEGIES.register("multikrum")
def multikrum(
    *,
    context: StrategyContext,
    num_malicious_nodes: int = 0,
    num_nodes_to_select: int = 1,
) -> MultiKrum:
    """Registered ``multikrum``; options as in ``configs/strategy/multikrum.yaml``."""
    return MultiKrum(
        num_malicious_nodes=num_malicious_nodes,
        num_nodes_to_select=num_nodes_to_select,
        **context.sampling(),
    )
