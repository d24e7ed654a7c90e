"""Coordinate-wise median aggregation (Yin et al., 2018, arXiv:1803.01498).

Flower's built-in ``flwr.serverapp.strategy.FedMedian``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedmedian"]


@STRATEGIES.register("fedmedian")
def fedmedian(*, context: StrategyContext) -> FedMedian:
    """Registered ``fedmedian``; options as in ``configs/strategy/fedmedian.yaml``."""
    return FedMedian(**context.sampling())
