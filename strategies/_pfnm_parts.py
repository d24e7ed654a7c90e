"""The pieces of the ``pfnm`` strategy that do not hold its state.

Client models as they arrive (:class:`LocalModel`), one matching's outcome
(:class:`Matched`), the calls into :mod:`fedsim.matching` for the ``mlp``
model and for any other model, the reference initialisation, the federated
evaluation of one candidate model on the clients' held-out data, and the
round's train-loss metric.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedsim import models
from fedsim.exceptions import AggregationError
from fedsim.matching.match import match as spec_match
from fedsim.matching.permspec import PermutationSpec
from fedsim.matching.pfnm import pfnm_mlp_with_assignments
from fedsim.params import array_to_numpy
from fedsim.train import derive_seed

__all__ = [
    "LocalModel",
    "Matched",
    "Units",
    "fits",
    "held_out_score",
    "match_general",
    "match_mlp",
    "match_seed",
    "reference_init",
    "spec_of",
    "train_metrics",
]

_MATCH_TAG = 43  # derive_seed tag of the matching's sweep order

I64 = NDArray[np.int64]
Units = dict[str, I64]  # group name -> global atom of each of a client's units


def match_seed(run_seed: int, server_round: int) -> int:
    """Seed of the sweep order of round ``server_round``'s matching."""
    return derive_seed(run_seed, server_round, _MATCH_TAG)


def spec_of(
    template: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> PermutationSpec:
    """The permutation spec of ``template``'s architecture at ``state``'s widths."""
    with torch.random.fork_rng(devices=[]):  # a rebuild must not draw globally
        return models.permutation_spec(models.fit_to_state(template, state))


@dataclass(frozen=True)
class LocalModel:
    """One client's trained model as it arrived in a train reply."""

    partition_id: int
    state: dict[str, np.ndarray]
    label_counts: np.ndarray
    num_examples: float

    @classmethod
    def from_reply(
        cls, reply: Message, partition_id: int, num_classes: int
    ) -> LocalModel:
        """Read a train reply (``arrays``, ``num-examples``, ``label-counts``).

        Raises
        ------
        AggregationError
            If the reply has no list of ``num_classes`` label counts.
        """
        metrics = reply.content.metric_records["metrics"]
        counts = metrics.get("label-counts")
        if not isinstance(counts, list) or len(counts) != num_classes:
            raise AggregationError(
                f"node {reply.metadata.src_node_id}'s reply has label-counts="
                f"{counts!r}; pfnm needs a list of {num_classes} per-class counts."
            )
        arrays = reply.content.array_records["arrays"]
        return cls(
            partition_id=partition_id,
            state={k: np.array(array_to_numpy(a)) for k, a in arrays.items()},
            label_counts=np.asarray(counts, dtype=np.float64),
            num_examples=float(metrics["num-examples"]),  # type: ignore[arg-type]
        )

    def widths(self, template: torch.nn.Module) -> dict[str, int]:
        """Width of every permutation group of this client's model."""
        state = {k: torch.from_numpy(v) for k, v in self.state.items()}
        own = template.state_dict()
        return models.infer_widths(models.permutation_spec(template), state, own)


@dataclass(frozen=True)
class Matched:
    """A matching's global model, every client's assignment and the widths."""

    state: dict[str, np.ndarray]
    assignments: dict[str, list[I64]]  # group -> per client (input order)
    widths: dict[str, int]

    def record(self, dtypes: Mapping[str, np.dtype[Any]]) -> ArrayRecord:
        """The global model as an ``ArrayRecord`` in the given dtypes."""
        return ArrayRecord(
            {
                k: torch.from_numpy(v.astype(dtypes.get(k, np.float32)))
                for k, v in self.state.items()
            }
        )


def fits(
    sent: Sequence[Units | None],
    clients: Sequence[LocalModel],
    template: torch.nn.Module,
) -> bool:
    """Whether every client came back with the units it was sent (restartable)."""
    for units, client in zip(sent, clients, strict=True):
        if units is None:
            return False
        widths = client.widths(template)
        if any(len(units[g]) != widths[g] for g in units):
            return False
    return True


def reference_init(model: torch.nn.Module, generator: torch.Generator) -> None:
    """The reference code's init: weights N(0, 0.1^2), biases 0.1 (in place)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.1, generator=generator)
            elif name.endswith("bias"):
                param.fill_(0.1)


def match_mlp(
    clients: Sequence[LocalModel],
    counts: np.ndarray,
    init: Sequence[Units | None] | None,
    options: dict[str, Any],
) -> Matched:
    """PFNM of MLPs (``layers.<i>.weight/bias``; groups ``hidden.<c>``)."""
    n_layers = len(clients[0].state) // 2
    keys = [f"layers.{i}.{p}" for i in range(n_layers) for p in ("weight", "bias")]
    for c in clients:
        if sorted(c.state) != sorted(keys):
            raise AggregationError(
                f"client {c.partition_id} sent tensors {sorted(c.state)}; an mlp has "
                f"{keys}."
            )
    groups = [f"hidden.{c}" for c in range(n_layers - 1)]
    start = None
    if init is not None:
        start = [[units[g] for units in init if units is not None] for g in groups]
    result = pfnm_mlp_with_assignments(
        [[c.state[k] for k in keys] for c in clients], counts, init=start, **options
    )
    return Matched(
        state=dict(zip(keys, result.weights, strict=True)),
        assignments={g: result.assignments[c] for c, g in enumerate(groups)},
        widths={g: result.widths[c] for c, g in enumerate(groups)},
    )


def match_general(
    clients: Sequence[LocalModel],
    counts: np.ndarray,
    init: Sequence[Units | None] | None,
    options: dict[str, Any],
    template: torch.nn.Module,
    model_name: str,
) -> Matched:
    """Any other model, through ``fedsim.matching.match``."""
    nets = []
    for c in clients:  # each client's model at its own widths
        tensors = {k: torch.from_numpy(v) for k, v in c.state.items()}
        with torch.random.fork_rng(devices=[]):
            net = models.fit_to_state(copy.deepcopy(template), tensors)
        net.load_state_dict(tensors, strict=False)
        nets.append(net)
    if init is not None and init[0] is not None:
        options = dict(options)
        options["init"] = {
            g: [units[g] for units in init if units is not None] for g in init[0]
        }
    spec = models.permutation_spec(nets[0])
    global_state, found = spec_match(nets, spec, counts, template=template, **options)
    missing = sorted(set(clients[0].state) - set(global_state))
    if missing:
        raise AggregationError(
            f"fedsim.matching.match returned no tensor {missing[0]!r}."
        )
    state = {  # the tensors the clients sent, nothing else
        k: np.asarray(global_state[k], dtype=np.float64) for k in clients[0].state
    }
    widths = spec_of(template, {k: torch.from_numpy(v) for k, v in state.items()})
    assignments = {g: [np.asarray(a, dtype=np.int64) for a in found[g]] for g in found}
    return Matched(state=state, assignments=assignments, widths=widths.widths())


def held_out_score(
    grid: Grid,
    arrays: ArrayRecord,
    nodes: Sequence[int],
    server_round: int,
    metric: str,
) -> float | None:
    """Federated evaluation of ``arrays`` on ``nodes``' held-out splits.

    Returns the example-weighted mean of ``metric`` (``None`` when no node had
    held-out examples). With a :class:`fedsim.grid.FedsimGrid` the messages'
    bytes count in the round's totals but their replies do not count as the
    round's training replies.
    """
    config = ConfigRecord({"server-round": server_round})
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node in nodes
    ]
    take = getattr(grid, "take_stats", None)
    before = take() if take else None
    replies = list(grid.send_and_receive(messages))
    if take and before is not None:
        during = take()
        before.bytes_sent += during.bytes_sent
        before.bytes_received += during.bytes_received
        grid.stats = before  # type: ignore[attr-defined]
    total = weighted = 0.0
    for reply in replies:
        if reply.has_error():
            continue
        metrics = reply.content.metric_records["metrics"]
        n = float(metrics.get("num-examples", 0.0))  # type: ignore[arg-type]
        if n > 0 and metric in metrics:
            total += n
            weighted += n * float(metrics[metric])  # type: ignore[arg-type]
    return weighted / total if total > 0 else None


def train_metrics(replies: Sequence[Message]) -> MetricRecord:
    """Example-weighted mean train loss of the replies that report one."""
    total = weighted = 0.0
    for reply in replies:
        metrics = reply.content.metric_records["metrics"]
        if "train_loss" in metrics:
            n = float(metrics["num-examples"])  # type: ignore[arg-type]
            total += n
            weighted += n * float(metrics["train_loss"])  # type: ignore[arg-type]
    return MetricRecord({"train_loss": weighted / total} if total > 0 else {})
