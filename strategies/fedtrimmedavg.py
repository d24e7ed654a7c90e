"""Coordinate-wise trimmed mean (Yin et al., 2018, arXiv:1803.01498).

Flower's built-in ``flwr.serverapp.strategy.FedTrimmedAvg``; fedsim only fixes exact
participation (see :meth:`fedsim.strategy.StrategyContext.sampling`).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg

from fedsim.strategy import STRATEGIES, StrategyContext

__all__ = ["fedtrimmedavg"]


@STRATEGIES.register("fedtrimmedavg")
def fedtrimmedavg(
    *,
    context: StrategyContext,
    beta: float = 0.2,
) -> FedTrimmedAvg:
    """Registered ``fedtrimmedavg``; options in its ``configs/strategy`` file."""
    return FedTrimmedAvg(beta=beta, **context.sampling())
