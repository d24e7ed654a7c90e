"""AOFP in federated training: which side prunes, and the server-side wrapper.

``client.pruning.name=aofp`` turns AOFP on; ``client.pruning.side`` says where
the decisions are taken:

``client``
    Every client runs AOFP during its local training and returns a narrower
    model; only strategies that merge models of different widths
    (``accepts_different_widths``, e.g. PFNM/FedMA matching) can aggregate
    them, so :func:`federated_pruning` refuses the others.
``server``
    :class:`ServerAOFP` wraps the experiment's strategy. It sends each round's
    search sets ``S`` to the clients as a tensor record (:data:`AOFP_RECORD`);
    the clients train as usual while measuring, on their own data, the damage
    of masking random halves of ``S``, and reply with per-unit mean damages
    ``t-bar`` and sample counts (a record of the same name). The server pools
    them (weighted by examples), takes one AOFP decision per group and round,
    removes the pruned units from the aggregated model physically and
    broadcasts the narrower model. Every searched group decides once per
    round (a round is the cycle; ``k`` and the stagger have no finer unit
    there) after ``warmup`` rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsim import models
from fedsim.config import ExperimentConfig, PruningConfig
from fedsim.exceptions import ConfigError
from fedsim.params import record_to_state, state_to_record
from fedsim.pruning.aofp import AOFP_RECORD, NEVER_SAMPLED, GroupSearch
from fedsim.pruning.flops import count_flops
from fedsim.pruning.groups import prunable_groups
from fedsim.pruning.removal import remove_units

__all__ = ["AOFP_RECORD", "ServerAOFP", "federated_pruning", "pooled_damage"]

log = logging.getLogger("fedsim")


def federated_pruning(exp: ExperimentConfig, strategy: Any, model: nn.Module) -> Any:
    """The strategy the server should drive, given ``client.pruning``.

    Returns ``strategy`` itself without pruning or with client-side pruning
    (after checking the strategy can merge different widths), and a
    :class:`ServerAOFP` around it for server-side pruning.

    Raises
    ------
    ConfigError
        If the strategy cannot take the widths pruning produces, or a group in
        ``client.pruning.layers`` cannot be pruned.
    """
    cfg = exp.client.pruning
    if cfg.name == "none":
        return strategy
    prunable_groups(model, cfg.layers)  # fails early on a bad layer name
    if cfg.side == "client":
        if not getattr(strategy, "accepts_different_widths", False):
            raise ConfigError(
                f"client.pruning.side='client' makes clients return pruned models "
                f"of different widths, which strategy {exp.strategy.name!r} cannot "
                "aggregate; use a strategy that matches widths (pfnm, fedma) or "
                "client.pruning.side=server"
            )
        return strategy
    if hasattr(strategy, "run_round"):
        raise ConfigError(
            f"client.pruning.side='server' cannot wrap strategy "
            f"{exp.strategy.name!r}, whose rounds have several phases"
        )
    if hasattr(strategy, "current_arrays"):
        raise ConfigError(
            f"client.pruning.side='server' cannot be used with strategy "
            f"{exp.strategy.name!r}: it keeps server-side state at the old widths; "
            "use a stateless aggregator such as fedavg, fedprox or fedmedian"
        )
    return ServerAOFP(strategy, model=model, config=cfg)


def pooled_damage(
    stats: list[tuple[float, dict[str, torch.Tensor]]], group: str, size: int
) -> np.ndarray:
    """Example-weighted mean of the clients' ``t-bar`` of one group.

    Each client counts only for the units it measured (``<group>.n > 0``);
    units nobody measured get :data:`~fedsim.pruning.aofp.NEVER_SAMPLED`.
    """
    num = np.zeros(size)
    den = np.zeros(size)
    for weight, tensors in stats:
        t = tensors.get(f"{group}.t")
        n = tensors.get(f"{group}.n")
        if t is None or n is None or t.shape != (size,) or n.shape != (size,):
            continue
        measured = n.numpy() > 0
        num += np.where(measured, weight * t.numpy(), 0.0)
        den += np.where(measured, weight, 0.0)
    out = np.full(size, NEVER_SAMPLED)
    np.divide(num, den, out=out, where=den > 0)
    return out


class ServerAOFP(Strategy):
    """Server-side AOFP around any stateless Flower strategy.

    Parameters
    ----------
    inner : flwr.serverapp.strategy.Strategy
        The aggregation strategy (every call not about pruning goes to it). If
        it defines ``select_units(spec, group, keep)``, it is called whenever
        units are removed, so it can shrink its own state-dict-shaped state
        (a Fisher estimate).
    model : torch.nn.Module
        The initial global model (built by :func:`fedsim.models.build`).
    config : PruningConfig
        ``theta``, ``warmup`` (rounds), ``target_flops`` and ``layers``.
    """

    def __init__(
        self, inner: Strategy, *, model: nn.Module, config: PruningConfig
    ) -> None:
        self.inner = inner
        self.config = config
        self.model = model
        groups = prunable_groups(model, config.layers)
        if not groups:
            raise ConfigError(
                f"model {getattr(model, 'fedsim_name', '?')!r} has no group AOFP "
                "can prune"
            )
        self.searches = {name: GroupSearch(g.size) for name, g in groups.items()}
        self.reference_flops = count_flops(model)
        self.flops = self.reference_flops
        self.stopped = False

    @property
    def accepts_different_widths(self) -> bool:
        """Whatever the wrapped strategy accepts."""
        return bool(getattr(self.inner, "accepts_different_widths", False))

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def _searching(self, server_round: int) -> bool:
        return not self.stopped and server_round > self.config.warmup

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, plus the search sets while searching."""
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if not self._searching(server_round):
            return messages
        sets = {
            name: torch.as_tensor(s.search, dtype=torch.float64)
            for name, s in self.searches.items()
            if s.searchable and len(s.search) >= 2
        }
        if sets:
            record = state_to_record(sets)
            for message in messages:
                message.content[AOFP_RECORD] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the inner strategy, then decide and prune."""
        replies = list(replies)
        stats: list[tuple[float, dict[str, torch.Tensor]]] = []
        for reply in replies:
            if reply.has_error() or AOFP_RECORD not in reply.content:
                continue
            record = reply.content[AOFP_RECORD]
            del reply.content[AOFP_RECORD]
            weight = float(reply.content["metrics"]["num-examples"])  # type: ignore[arg-type]
            stats.append((weight, record_to_state(record)))  # type: ignore[arg-type]
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None or not stats or not self._searching(server_round):
            return arrays, metrics
        keep: dict[str, np.ndarray] = {}
        for name, s in self.searches.items():
            if not (s.searchable and len(s.search) >= 2):
                continue
            kept = np.flatnonzero(s.keep)
            pruned = s.end_cycle(self.config.theta, pooled_damage(stats, name, s.size))
            if len(pruned):
                keep[name] = np.setdiff1d(kept, pruned)
        if keep:
            arrays = self._prune(arrays, keep)
        return arrays, metrics

    def _prune(self, arrays: ArrayRecord, keep: dict[str, np.ndarray]) -> ArrayRecord:
        """Remove units physically; searches restart on the renumbered units."""
        state = record_to_state(arrays)
        current = models.fit_to_state(self.model, state)
        hook = getattr(self.inner, "select_units", None)
        narrow, state = remove_units(current, state, keep, on_select=hook)
        self.model = narrow
        for name, units in keep.items():
            log.info("AOFP: pruned group %s to %d units", name, len(units))
            self.searches[name] = GroupSearch(len(units))
        self.flops = count_flops(narrow)
        self.stopped = self.flops <= self.config.target_flops * self.reference_flops
        return state_to_record(state)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluation messages."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's evaluation aggregate."""
        return self.inner.aggregate_evaluate(server_round, replies)
