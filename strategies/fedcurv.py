"""FedCurv: FedAvg with every other client's curvature as a penalty.

Shoham et al., "Overcoming Forgetting in Federated Learning on Non-IID Data",
NeurIPS 2019 workshop, arXiv:1910.07796. Client ``k`` minimises

    L_k(w) + lam * sum_{j != k} sum_i F_j,i (w_i - w_j,i)^2

over the clients ``j`` of the previous round, with ``w_j`` their trained local
weights and ``F_j`` their empirical Fisher there. The server keeps each of
them, sums ``U = sum_j F_j`` and ``V = sum_j F_j * w_j`` and sends client ``k``
the sums without its own share (records ``fedsim.fisher`` and
``fedsim.anchors``, the constant as ``fedcurv-const``), so no client needs
memory between rounds and a client absent last round gets the whole sums.
Upload is the weights plus one Fisher (2x), download the weights plus two sums
(3x). Round 1 trains like FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim.exceptions import ConfigError
from fedsim.grid import partition_id
from fedsim.matching.permspec import PermutationSpec, select_units
from fedsim.params import state_to_record
from fedsim.plasticity import (
    ANCHORS_RECORD,
    FEDCURV_CONST,
    FEDCURV_LAMBDA,
    FISHER_RECORD,
    FISHER_SAMPLES,
    CurvatureSums,
    curvature_sums,
    leave_out,
)
from fedsim.strategy import STRATEGIES, StrategyContext
from strategies._fisher import check_fisher_samples, fits, take_fisher

__all__ = ["FedCurv", "fedcurv"]

Tensors = dict[str, torch.Tensor]


class FedCurv(FedAvg):
    """FedAvg whose clients are pulled towards the others' curvature-weighted models.

    Parameters
    ----------
    lam : float
        Penalty strength ``lambda`` (no 1/2, as in the paper).
    fisher_samples : int
        Examples per client for its Fisher estimate.
    **kwargs
        FedAvg's arguments (sampling).
    """

    def __init__(self, *, lam: float, fisher_samples: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if lam < 0:
            raise ConfigError(f"strategy.lam={lam} must be zero or positive")
        check_fisher_samples(fisher_samples)
        self.lam = lam
        self.fisher_samples = fisher_samples
        #: previous round's clients: partition id -> (Fisher, trained weights)
        self.previous: dict[int, tuple[Tensors, Tensors]] = {}
        self.sums: CurvatureSums | None = None
        #: this round's sampled nodes: node id -> partition id
        self._partitions: dict[int, int] = {}

    def sums_for(self, partition: int) -> CurvatureSums | None:
        """The sums over last round's clients other than partition ``partition``."""
        if self.sums is None:
            return None
        own = self.previous.get(partition)
        return self.sums if own is None else leave_out(self.sums, *own)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, each with its own leave-one-out sums."""
        config[FEDCURV_LAMBDA] = float(self.lam)
        config[FISHER_SAMPLES] = int(self.fisher_samples)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._partitions = {
            m.metadata.dst_node_id: partition_id(grid, m.metadata.dst_node_id)
            for m in messages
        }
        if self.sums is not None and not fits(self.sums.precision, arrays):
            self.previous, self.sums = {}, None
        if self.sums is None:
            return messages
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            sums = self.sums_for(self._partitions[node])
            assert sums is not None
            own_config = ConfigRecord(dict(config))
            own_config[FEDCURV_CONST] = float(sums.const)
            content = RecordDict(
                {
                    self.arrayrecord_key: arrays,
                    self.configrecord_key: own_config,
                    FISHER_RECORD: state_to_record(self._sent(sums.precision)),
                    ANCHORS_RECORD: state_to_record(self._sent(sums.weighted)),
                }
            )
            out.append(
                Message(
                    content,
                    dst_node_id=node,
                    message_type=message.metadata.message_type,
                )
            )
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the weights; keep every client's Fisher and weights."""
        replies = list(replies)
        taken = take_fisher(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and taken:
            self.previous = {
                self._partitions.get(c.node_id, c.node_id): (c.fisher, c.weights)
                for c in taken
            }
            self._sum()
        return arrays, metrics

    def _sent(self, sums: Tensors) -> Tensors:
        """Sums (kept in float64 for the subtraction) in the clients' dtypes."""
        fisher, _ = next(iter(self.previous.values()))
        return {k: v.to(fisher[k].dtype) for k, v in sums.items()}

    def _sum(self) -> None:
        pairs = list(self.previous.values())
        self.sums = curvature_sums([f for f, _ in pairs], [w for _, w in pairs])

    def select_units(self, spec: PermutationSpec, group: str, keep: np.ndarray) -> None:
        """Shrink the stored Fisher estimates and anchors when units are pruned."""
        if not self.previous:
            return
        self.previous = {
            partition: (
                select_units(f, spec, group, keep),
                select_units(w, spec, group, keep),
            )
            for partition, (f, w) in self.previous.items()
        }
        self._sum()


@STRATEGIES.register("fedcurv")
def fedcurv(
    *,
    context: StrategyContext,
    lam: float = 1.0,
    fisher_samples: int = 256,
) -> FedCurv:
    """Registered ``fedcurv``; options as in ``configs/strategy/fedcurv.yaml``."""
    return FedCurv(lam=lam, fisher_samples=fisher_samples, **context.sampling())
