"""Fisher records in client replies, shared by the plasticity strategies.

Clients return their Fisher estimate as an extra tensor record
(:data:`fedsim.plasticity.FISHER_RECORD`) beside ``arrays``. Flower's FedAvg
expects exactly one tensor record per reply, so the strategies take the
Fisher record out of each reply before aggregating the weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedsim.exceptions import ConfigError
from fedsim.params import record_to_state
from fedsim.plasticity import FISHER_RECORD, NORMALISATIONS

__all__ = ["ClientFisher", "check_wpl_options", "fits", "take_fisher"]

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


def check_wpl_options(
    alpha: float,
    decay: float,
    normalize: str,
    clip: float | None,
    fisher_samples: int,
) -> None:
    """The weight-plasticity options every WPL strategy takes, checked once."""
    if alpha < 0:
        raise ConfigError(f"strategy.alpha={alpha} must be zero or positive")
    if not 0.0 <= decay < 1.0:
        raise ConfigError(f"strategy.decay={decay} must be in [0, 1)")
    if normalize not in NORMALISATIONS:
        raise ConfigError(
            f"strategy.normalize={normalize!r} is not one of: "
            f"{', '.join(NORMALISATIONS)}"
        )
    if clip is not None and clip <= 0:
        raise ConfigError(f"strategy.clip={clip} must be positive or null")
    if fisher_samples < 1:
        raise ConfigError(
            f"strategy.fisher_samples={fisher_samples} must be at least 1"
        )
