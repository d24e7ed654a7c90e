"""Bulyan: Krum selection then trimmed mean (El Mhamdi et al., 2018, arXiv:1802.07927).

Flower's built-in ``flwr.serverapp.strategy.Bulyan``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["bulyan"]


@STRATEGIES.register("bulyan")
def bulyan(
    *,
    context: StrategyContext,
    num_malicious_nodes: int = 0,
) -> Bulyan:
    """Registered ``bulyan``; options as in ``configs/strategy/bulyan.yaml``."""
    return Bulyan(num_malicious_nodes=num_malicious_nodes, **context.sampling())
