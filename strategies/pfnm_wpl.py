"""PFNM with the weight-plasticity loss: the Fisher follows the matching.

WPL across rounds (:mod:`fedsim.plasticity`, Benyahia et al., ICML 2019,
arXiv:1902.08232) on top of PFNM with communication (:mod:`strategies.pfnm`).
Each client ``k`` minimises ``L_k(w) + alpha * sum_i F_i (w_i - w*_i)^2``
around the model ``w*`` it is sent, and returns its weights with its
empirical Fisher at them. Under matching a client's units are not the global
units: client ``k``'s unit ``u`` of group ``g`` is global atom
``assignments[g][k][u]``, and the global widths change every round. The Fisher
is state-dict shaped, so it is moved exactly as the weights are:

* the server keeps one Fisher ``F`` at the global widths, in global atom order;
* each client is sent, with its slice of the global model, the same slice of
  ``F`` (:func:`fisher_slice`: the rows and columns of the atoms its units
  are, in its own order; the whole ``F`` with the whole model);
* after matching, every client's fresh Fisher is scattered to the new global
  atoms through the client's new assignment (:func:`to_global`), zero at the
  atoms the client lacks (they carry no importance from it), and the
  example-weighted mean is normalised (mean entry one, entries cut at
  ``clip``) as in ``fedavg_wpl``;
* the memory of earlier rounds is carried the same way: the slice of ``F`` a
  client was sent rides with its units into the new numbering (clients that
  came back at other widths, e.g. pruned by AOFP, carry none), and
  ``F <- decay * memory + (1 - decay) * F_new``.

When the matching is the identity (every client holds every atom in global
order) this is ``fedavg_wpl``'s Fisher update. Round 1 (no Fisher yet) is
PFNM's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedsim.exceptions import AggregationError
from fedsim.matching.layout import SpecLayout, scatter_state
from fedsim.matching.match import slice_for_client
from fedsim.matching.permspec import PermutationSpec, select_units
from fedsim.matching.select import Hyper
from fedsim.params import record_to_state, state_to_record
from fedsim.plasticity import (
    FISHER_RECORD,
    weighted_mean,
)
from fedsim.strategy import STRATEGIES, StrategyContext
from strategies._fisher import ClientFisher, WPLOptions, fits, take_fisher
from strategies.pfnm import PFNMStrategy

__all__ = ["PFNMWPL", "fisher_slice", "pfnm_wpl", "to_global"]

log = logging.getLogger("fedsim")

Tensors = dict[str, torch.Tensor]


def fisher_slice(
    fisher: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    units: Mapping[str, np.ndarray],
) -> Tensors:
    """The entries of ``fisher`` at the global atoms ``units``, in that order.

    Parameters
    ----------
    fisher : mapping of str to Tensor
        State-dict shaped tensors at the global widths (any subset of keys).
    spec : PermutationSpec
        The global model's spec.
    units : mapping of group name to int array
        The atom of each of a client's units (what its model slice holds).
    """
    moves = {g: [np.asarray(a, dtype=np.int64)] for g, a in units.items()}
    return slice_for_client(fisher, spec, moves, 0)


def to_global(
    tensors: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    shapes: Mapping[str, tuple[int, ...]],
    assignment: Mapping[str, np.ndarray],
    widths: Mapping[str, int],
) -> Tensors:
    """A client's state-dict shaped tensors moved to the global atoms.

    Unit ``u`` of group ``g`` goes to atom ``assignment[g][u]``; entries of
    atoms the client lacks are zero.

    Parameters
    ----------
    tensors : mapping of str to Tensor
        At the client's widths (any subset of its state dict's keys).
    spec : PermutationSpec
        The client model's spec.
    shapes : mapping of str to tuple of int
        The client's state-dict shapes (every tensor the spec refers to).
    assignment : mapping of group name to int array
        The client's assignment from the matching.
    widths : mapping of group name to int
        The global widths.
    """
    source = SpecLayout(spec, shapes)
    target = source.resized(widths)
    moves = {g: np.asarray(a, dtype=np.int64) for g, a in assignment.items()}
    return scatter_state(tensors, source, target, moves)


class PFNMWPL(PFNMStrategy):
    """PFNM whose clients add the weight-plasticity penalty; see the module doc.

    Parameters
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
    **pfnm
        :class:`~strategies.pfnm.PFNMStrategy`'s arguments.
    """

    def __init__(
        self,
        *,
        alpha: float,
        decay: float,
        normalize: str,
        clip: float | None,
        fisher_samples: int,
        **pfnm: Any,
    ) -> None:
        super().__init__(**pfnm)
        self.wpl = WPLOptions(
            alpha=alpha,
            decay=decay,
            normalize=normalize,
            clip=clip,
            fisher_samples=fisher_samples,
        )
        #: the Fisher at the global widths, in global atom order
        self.fisher: Tensors | None = None
        self._fisher_sent: dict[int, Tensors] = {}  # this round's slice per client

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """PFNM's messages with ``alpha``, the Fisher request and each one's ``F``."""
        self.wpl.ask(config)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._fisher_sent = {}
        if self.fisher is not None and not fits(self.fisher, arrays):
            log.warning("pfnm_wpl: the global model changed widths; Fisher reset")
            self.fisher = None
        if self.fisher is None:
            return messages
        spec = self._spec_of(record_to_state(arrays))
        for message in messages:
            pid = self._node_pid[message.metadata.dst_node_id]
            units = self._sent.get(pid)
            if units is None:  # a round-1 model of its own: no Fisher yet
                continue
            sliced = fisher_slice(self.fisher, spec, units)
            self._fisher_sent[pid] = sliced
            message.content[FISHER_RECORD] = state_to_record(sliced)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Match the weights, then carry every Fisher through the assignments."""
        replies = list(replies)
        taken = take_fisher(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or not taken:
            return arrays, metrics
        by_node = {r.metadata.src_node_id: r for r in replies if not r.has_error()}
        shapes = {k: tuple(a.shape) for k, a in arrays.items()}
        fresh: list[Tensors] = []
        memory: list[Tensors] = []
        fresh_weights: list[float] = []
        memory_weights: list[float] = []
        for client in taken:
            carried = self._carried(client, by_node[client.node_id], shapes)
            fresh.append(carried[0])
            fresh_weights.append(client.num_examples)
            if carried[1] is not None:
                memory.append(carried[1])
                memory_weights.append(client.num_examples)
        old = weighted_mean(memory, memory_weights) if memory else None
        self.fisher = self.wpl.fold(old, weighted_mean(fresh, fresh_weights))
        return arrays, metrics

    def _carried(
        self,
        client: ClientFisher,
        reply: Message,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> tuple[Tensors, Tensors | None]:
        """A client's fresh Fisher at the global atoms, and its sent slice of
        ``F`` too when it came back at the widths it was sent."""
        pid = self._node_pid[client.node_id]
        record = reply.content["arrays"]
        assert isinstance(record, ArrayRecord)
        state = record_to_state(record)
        spec = self._spec_of(state)
        own = {k: tuple(v.shape) for k, v in state.items()}
        assert self.widths is not None  # set by the matching
        assignment = self.assignments[pid]
        fresh = to_global(client.fisher, spec, own, assignment, self.widths)
        for key, value in fresh.items():
            if tuple(value.shape) != shapes.get(key):
                raise AggregationError(
                    f"the Fisher of client {pid} has a tensor {key!r} that does not "
                    "fit the matched global model."
                )
        sent = self._fisher_sent.get(pid)
        if sent is None or not _same_shapes(sent, client.fisher):
            return fresh, None
        return fresh, to_global(sent, spec, own, assignment, self.widths)

    def select_units(self, spec: PermutationSpec, group: str, keep: np.ndarray) -> None:
        """Shrink the Fisher when the server prunes units of ``group``."""
        if self.fisher is not None:
            self.fisher = select_units(self.fisher, spec, group, keep)


def _same_shapes(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)


@STRATEGIES.register("pfnm_wpl")
def pfnm_wpl(
    *,
    context: StrategyContext,
    alpha: float = 0.05,
    decay: float = 0.5,
    normalize: str = "mean",
    clip: float | None = 10.0,
    fisher_samples: int = 256,
    sigma2: float = 1.0,
    sigma0_2: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    rematch_iters: int = 3,
    popularity: str = "reference",
    missing: str = "patch",
    client_init: str = "independent",
    send: str = "slice",
    select: bool = False,
    select_grid: Mapping[str, Sequence[float]] | None = None,
    max_width_factor: float = 3.0,
    keep_local_models: bool = True,
) -> PFNMWPL:
    """Registered ``pfnm_wpl``: ``pfnm``'s options and ``fedavg_wpl``'s (see
    ``configs/strategy/pfnm_wpl.yaml``)."""
    return PFNMWPL(
        alpha=alpha,
        decay=decay,
        normalize=normalize,
        clip=clip,
        fisher_samples=fisher_samples,
        context=context,
        hyper=Hyper(sigma2=sigma2, sigma0_2=sigma0_2, gamma=gamma),
        iters=iters,
        rematch_iters=rematch_iters,
        popularity=popularity,
        missing=missing,
        client_init=client_init,
        send=send,
        select=select,
        select_grid=dict(select_grid or {}),
        max_width_factor=max_width_factor,
        keep_local_models=keep_local_models,
        **context.sampling(),
    )
