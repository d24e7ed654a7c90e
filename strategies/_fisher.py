"""Fisher records in client replies, shared by the plasticity strategies.

Clients return their Fisher estimate as an extra tensor record
(:data:`fedsim.plasticity.FISHER_RECORD`) beside ``arrays``. Flower's FedAvg
expects exactly one tensor record per reply, so the strategies take the
Fisher record out of each reply before aggregating the weights. The
weight-plasticity options (:class:`WPLOptions`) are shared here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedsim.exceptions import ConfigError
from fedsim.params import record_to_state
from fedsim.plasticity import (
    FISHER_RECORD,
    FISHER_SAMPLES,
    NORMALISATIONS,
    WPL_ALPHA,
    decayed,
    normalise,
)

__all__ = [
    "ClientFisher",
    "WPLOptions",
    "check_fisher_samples",
    "fits",
    "take_fisher",
]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientFisher:
    """One client's Fisher estimate with what it was sent with.

    Attributes
    ----------
    node_id : int
        The replying node.
    num_examples : float
        Its ``num-examples`` metric (the aggregation weight).
    fisher : dict
        The Fisher estimate.
    weights : dict
        The client's trained weights of the same tensors (FedCurv's anchors).
    """

    node_id: int
    num_examples: float
    fisher: Tensors
    weights: Tensors


def take_fisher(replies: Iterable[Message]) -> list[ClientFisher]:
    """Remove the Fisher record from every reply that has one, and return them."""
    found: list[ClientFisher] = []
    for reply in replies:
        if reply.has_error() or FISHER_RECORD not in reply.content:
            continue
        record = reply.content[FISHER_RECORD]
        del reply.content[FISHER_RECORD]
        assert isinstance(record, ArrayRecord)
        fisher = record_to_state(record)
        arrays = reply.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        weights = {k: v for k, v in record_to_state(arrays).items() if k in fisher}
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord)
        count = float(metrics["num-examples"])  # type: ignore[arg-type]
        found.append(ClientFisher(reply.metadata.src_node_id, count, fisher, weights))
    return found


def fits(tensors: Tensors, arrays: ArrayRecord) -> bool:
    """Whether every tensor matches the shape of the same key in ``arrays``."""
    return all(
        k in arrays and tuple(arrays[k].shape) == tuple(v.shape)
        for k, v in tensors.items()
    )


def check_fisher_samples(fisher_samples: int) -> None:
    """``strategy.fisher_samples`` (examples per client Fisher estimate), checked."""
    if fisher_samples < 1:
        raise ConfigError(
            f"strategy.fisher_samples={fisher_samples} must be at least 1"
        )


@dataclass(frozen=True)
class WPLOptions:
    """The weight-plasticity options every WPL strategy takes (checked here).

    Attributes
    ----------
    alpha : float
        Penalty strength (``alpha * sum F (w - w*)^2``, no 1/2).
    decay : float
        Share of the earlier rounds' Fisher kept each round, in [0, 1).
    normalize : str
        ``"mean"`` (mean entry one), ``"max"`` or ``"none"``.
    clip : float or None
        Cap on the normalised entries.
    fisher_samples : int
        Examples per client for its Fisher estimate.
    """

    alpha: float
    decay: float
    normalize: str
    clip: float | None
    fisher_samples: int

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ConfigError(f"strategy.alpha={self.alpha} must be zero or positive")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"strategy.decay={self.decay} must be in [0, 1)")
        if self.normalize not in NORMALISATIONS:
            raise ConfigError(
                f"strategy.normalize={self.normalize!r} is not one of: "
                f"{', '.join(NORMALISATIONS)}"
            )
        if self.clip is not None and self.clip <= 0:
            raise ConfigError(f"strategy.clip={self.clip} must be positive or null")
        check_fisher_samples(self.fisher_samples)

    def ask(self, config: ConfigRecord) -> None:
        """Put the penalty strength and the Fisher request in a round's config."""
        config[WPL_ALPHA] = float(self.alpha)
        config[FISHER_SAMPLES] = int(self.fisher_samples)

    def fold(self, memory: Tensors | None, mean: Tensors) -> Tensors:
        """The new Fisher memory: this round's ``mean`` estimate normalised,
        after ``memory`` decayed (``None``: nothing remembered yet)."""
        return decayed(memory, normalise(mean, self.normalize, self.clip), self.decay)
