"""FedAvg with the weight-plasticity loss across rounds.

WPL: Benyahia et al., "Overcoming Multi-Model Forgetting", ICML 2019,
arXiv:1902.08232, used across communication rounds (see
:mod:`fedsim.plasticity`). Each round the server sends the global model ``w*``,
the aggregated diagonal Fisher ``F`` (record ``fedsim.fisher``) and ``alpha``;
client ``k`` minimises ``L_k(w) + alpha * sum_i F_i (w_i - w*_i)^2`` and returns
its weights with its empirical Fisher at them. The server averages the weights
(FedAvg) and the Fisher estimates (weighted by examples), normalises the mean
Fisher (mean entry one, entries cut at ``clip``) and mixes it into its
memory: ``F <- decay * F + (1 - decay) * F_new``.
Round 1 has no Fisher yet and trains like FedAvg. With ``F = 1`` and
``alpha = mu / 2`` this is FedProx.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.matching.permspec import PermutationSpec, select_units
from fedsim.params import state_to_record
from fedsim.plasticity import (
    FISHER_RECORD,
    weighted_mean,
)
from fedsim.strategy import STRATEGIES, StrategyContext
from strategies._fisher import WPLOptions, fits, take_fisher

__all__ = ["FedAvgWPL", "fedavg_wpl"]


class FedAvgWPL(FedAvg):
    """FedAvg whose clients add the weight-plasticity penalty.

    Parameters
    ----------
    alpha : float
        Penalty strength (``alpha * sum F (w - w*)^2``, no 1/2).
    decay : float
        Share of the previous Fisher kept each round, in [0, 1).
    normalize : str
        ``"mean"`` (mean entry one), ``"max"`` or ``"none"``.
    clip : float or None
        Cap on the normalised entries (keeps plain SGD stable on the stiffest
        ones: it needs ``lr * 2 * alpha * clip < 2 * (1 + momentum)``).
    fisher_samples : int
        Examples per client for its Fisher estimate.
    **kwargs
        FedAvg's arguments (sampling).
    """

    def __init__(
        self,
        *,
        alpha: float,
        decay: float,
        normalize: str,
        clip: float | None,
        fisher_samples: int,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.wpl = WPLOptions(
            alpha=alpha,
            decay=decay,
            normalize=normalize,
            clip=clip,
            fisher_samples=fisher_samples,
        )
        self.fisher: dict[str, torch.Tensor] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages with ``alpha``, the Fisher request and ``F``."""
        self.wpl.ask(config)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.fisher is not None and not fits(self.fisher, arrays):
            # the global model changed widths in a way nobody told us about
            self.fisher = None
        if self.fisher is not None:
            record = state_to_record(self.fisher)
            for message in messages:
                message.content[FISHER_RECORD] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the weights; example-weighted mean of the Fisher estimates."""
        replies = list(replies)
        taken = take_fisher(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and taken:
            mean = weighted_mean(
                [c.fisher for c in taken], [c.num_examples for c in taken]
            )
            self.fisher = self.wpl.fold(self.fisher, mean)
        return arrays, metrics

    def select_units(self, spec: PermutationSpec, group: str, keep: np.ndarray) -> None:
        """Shrink the Fisher memory when the server prunes units of ``group``."""
        if self.fisher is not None:
            self.fisher = select_units(self.fisher, spec, group, keep)


@STRATEGIES.register("fedavg_wpl")
def fedavg_wpl(
    *,
    context: StrategyContext,
    alpha: float = 0.05,
    decay: float = 0.5,
    normalize: str = "mean",
    clip: float | None = 10.0,
    fisher_samples: int = 256,
) -> FedAvgWPL:
    """Registered ``fedavg_wpl``; options as in ``configs/strategy/fedavg_wpl.yaml``."""
    return FedAvgWPL(
        alpha=alpha,
        decay=decay,
        normalize=normalize,
        clip=clip,
        fisher_samples=fisher_samples,
        **context.sampling(),
    )
