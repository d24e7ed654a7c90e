"""Federated Matched Averaging (FedMA) for any model in the library.

Wang et al., "Federated Learning with Matched Averaging", ICLR 2020
(arXiv:2002.06440). One communication round is several phases of messages
(fedsim's server loop calls :meth:`FedMA.run_round`):

0. ``train.fedma_local``: every sampled client gets the global model and,
   if it took part in the whole matching that made it, its assignment to the
   global units, cuts its own units back out (FedMA's
   ``reconstruct_local_net``), trains the whole model locally and sends it
   back.
1. For every permutation group of the model, input side first (FedMA's
   bottom-up order; a conv with its BatchNorm, a hidden layer, a GroupSort
   block, ...): the server matches the group across the clients' current
   models with PFNM's BBP-MAP score (neuron vectors of the incoming weights:
   the layers below are already global, the layers above are left out) and
   sends each client, as ``train.fedma_layer``, its own assignment and the
   global values of the tensors the step freezes; the client puts the group
   in global order (zero-padding the units it lacks), freezes every matched
   tensor and retrains the rest (``retrain_epochs``; after the last group
   ``last_epochs`` at ``last_lr_factor`` times the learning rate, as FedMA's
   last stage) and sends its model back.
2. The tensors no group moves, the output layer among them, are averaged:
   the output layer per class with weights ``n_jk / n_k``, the others by
   example counts.

The global model comes back at the matched widths (capped by ``max_growth``
times the widest client); server-owned tensors whose shapes depend on a
width that changed are re-initialised by the model factory at the new widths
(clients never send them). The server keeps every client's assignment (by
partition id) as strategy state, so a checkpoint holds it and a resumed run
continues exactly; clients keep nothing between rounds. A client whose reply
fails in some phase drops out of the rest of the round (and next round trains
the whole global model); if none is left the round keeps the previous global
model. Matching defaults are
FedMA's: ``gamma=7``, ``sigma2=sigma0_2=1``, 5 sweeps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.grid import partition_id
from fedsim.matching.bbp import Popularity
from fedsim.matching.fedma import (
    ACTION_LAYER,
    ACTION_LOCAL,
    ASSIGN_RECORD,
    average_rest,
    match_layer,
)
from fedsim.matching.match import global_model
from fedsim.matching.permspec import PermutationSpec
from fedsim.params import record_to_state, state_to_record
from fedsim.strategy import STRATEGIES, StrategyContext
from fedsim.train import derive_seed
from fedsim.validation import check_reply

__all__ = ["FedMA", "fedma"]

log = logging.getLogger("fedsim")

State = dict[str, torch.Tensor]
_MATCH_TAG = 47  # derive_seed tag of FedMA's matching sweeps


@dataclass
class _Client:
    """One participant's latest model and data summary."""

    state: State
    counts: np.ndarray
    examples: float


class FedMA(FedAvg):
    """FedMA's multi-phase round; see the module docstring.

    Parameters
    ----------
    model_name : str
        The run's registered model.
    model_kwargs : dict
        Its build kwargs (the initial widths).
    seed : int
        Seeds the matching sweeps (with the round).
    sigma2, sigma0_2, gamma, iters, max_growth, popularity
        Matching hyperparameters (:func:`fedsim.matching.match.match`).
    retrain_epochs : int
        Local epochs after each matched group.
    last_epochs : int
        Local epochs after the last group (only unmatched tensors train).
    last_lr_factor : float
        Learning-rate factor of that last retraining.
    **sampling
        FedAvg's participation arguments.
    """

    accepts_different_widths = True

    def __init__(
        self,
        *,
        model_name: str,
        model_kwargs: Mapping[str, Any],
        seed: int,
        sigma2: float,
        sigma0_2: float,
        gamma: float,
        iters: int,
        max_growth: float | None,
        popularity: Popularity,
        retrain_epochs: int,
        last_epochs: int,
        last_lr_factor: float,
        **sampling: Any,
    ) -> None:
        super().__init__(**sampling)
        _check(sigma2, sigma0_2, gamma, iters, max_growth, popularity)
        for name, value in (
            ("retrain_epochs", retrain_epochs),
            ("last_epochs", last_epochs),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"strategy.{name}={value!r} must be an integer >= 1.")
        if not (math.isfinite(last_lr_factor) and last_lr_factor > 0):
            raise ConfigError(
                f"strategy.last_lr_factor={last_lr_factor!r} must be a number > 0."
            )
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        self._template: torch.nn.Module | None = None  # built lazily, not pickled
        self.seed = seed
        self.hyper = {
            "sigma2": float(sigma2),
            "sigma0_2": float(sigma0_2),
            "gamma": float(gamma),
            "iters": int(iters),
            "max_growth": None if max_growth is None else float(max_growth),
            "popularity": popularity,
        }
        self.retrain_epochs = retrain_epochs
        self.last_epochs = last_epochs
        self.last_lr_factor = float(last_lr_factor)
        template = self.template()
        self.roles = models.tensor_roles(template)
        self.buffers = {name for name, _ in template.named_buffers()}
        self.tag = 0  # round whose matching made the current global model
        #: partition id -> group -> the client's units in the current global
        #: model, for the clients that took part in that whole matching
        self.assignments: dict[int, dict[str, np.ndarray]] = {}
        #: one entry per phase: round, phase, group, width, clients, seconds,
        #: client_widths (node -> widths of the model it sent back)
        self.history: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_template"] = None
        return state

    def template(self) -> torch.nn.Module:
        """The run's model at its initial widths (built once per process)."""
        if self._template is None:
            with torch.random.fork_rng(devices=[]):
                self._template = models.build(self.model_name, **self.model_kwargs)
        return self._template

    # -- the round --------------------------------------------------------------
    def run_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One FedMA round: local training, one phase per group, averaging."""
        sampled = list(self.configure_train(server_round, arrays, config, grid))
        local = ConfigRecord({**dict(config), "server-round": server_round})
        started = time.perf_counter()
        replies = grid.send_and_receive(
            [
                Message(
                    self._local_content(arrays, local, partition_id(grid, node)),
                    node,
                    f"train.{ACTION_LOCAL}",
                )
                for node in (m.metadata.dst_node_id for m in sampled)
            ]
        )
        clients, losses = self._accept(replies, arrays, grid, {})
        self._log(server_round, 0, None, None, clients, started)
        if not clients:
            return None, None
        names = models.permutation_spec(self.template()).names()
        rng = np.random.default_rng(derive_seed(self.seed, server_round, _MATCH_TAG))
        widths: dict[str, int] = {}
        frozen: State = {}
        matched: dict[int, dict[str, np.ndarray]] = {}  # node -> group -> units
        for phase, group in enumerate(names, start=1):
            started = time.perf_counter()
            states = [c.state for c in clients.values()]
            step = match_layer(
                states,
                [self._spec(s) for s in states],
                group,
                widths,
                np.stack([c.counts for c in clients.values()]),
                roles=self.roles,
                buffers=self.buffers,
                rng=rng,
                **self.hyper,  # type: ignore[arg-type]
            )
            widths[group] = step.width
            frozen.update(step.frozen)
            last = phase == len(names)
            settings = ConfigRecord(
                {
                    **dict(config),
                    "server-round": server_round,
                    "fedma-phase": phase,
                    "fedma-group": group,
                    "fedma-width": step.width,
                    "fedma-frozen": list(frozen),
                    "fedma-epochs": self.last_epochs if last else self.retrain_epochs,
                    "fedma-lr-factor": self.last_lr_factor if last else 1.0,
                }
            )
            frozen_record = state_to_record(step.frozen)
            for node, a in zip(clients, step.assignments, strict=True):
                matched.setdefault(node, {})[group] = np.asarray(a, dtype=np.int64)
            messages = [
                Message(
                    RecordDict(
                        {
                            "arrays": frozen_record,
                            ASSIGN_RECORD: ArrayRecord({group: Array(a)}),
                            "config": settings,
                        }
                    ),
                    node,
                    f"train.{ACTION_LAYER}",
                )
                for node, a in zip(clients, step.assignments, strict=True)
            ]
            replies = grid.send_and_receive(messages)
            clients, _ = self._accept(replies, arrays, grid, clients)
            self._log(server_round, phase, group, step.width, clients, started)
            if not clients:
                return None, None
        states = [c.state for c in clients.values()]
        # buffers (BatchNorm statistics) of frozen layers kept updating on the
        # clients under the global weights: average their final values
        frozen = {k: v for k, v in frozen.items() if k not in self.buffers}
        rest = [k for k in arrays.keys() if k not in frozen]
        averaged = average_rest(
            states,
            [self._spec(s) for s in states],
            rest,
            np.stack([c.counts for c in clients.values()]),
        )
        merged = {**frozen, **averaged}
        out = {k: merged[k] for k in arrays.keys()}
        out.update(self._resized_server_state(out, grid))
        self.tag = server_round
        self.assignments = {partition_id(grid, n): matched[n] for n in clients}
        metrics: dict[str, Any] = (
            {"train_loss": float(np.mean(losses))} if losses else {}
        )
        return state_to_record(out), MetricRecord(metrics)

    # -- helpers ----------------------------------------------------------------
    def _local_content(
        self, arrays: ArrayRecord, config: ConfigRecord, partition: int
    ) -> RecordDict:
        """Phase 0's message: the global model, with the client's assignment
        into it when the client took part in the whole matching that made it."""
        content = RecordDict({"arrays": arrays, "config": config})
        own = self.assignments.get(partition)
        if own:
            content[ASSIGN_RECORD] = ArrayRecord({g: Array(a) for g, a in own.items()})
        return content

    def _resized_server_state(self, state: State, grid: Grid) -> State:
        """Server-owned tensors that no longer fit the matched widths, rebuilt.

        The clients never send server-owned tensors (selective-conv gates and
        pointers, spectral-norm vectors); when the matching changed a width
        they depend on, the model factory's fresh values at the new widths
        replace them (the server loop installs them with the new model, and
        the model's ``server_update`` takes it from there).
        """
        record = getattr(grid, "server_state", None)
        if not isinstance(record, ArrayRecord):
            return {}
        current = record_to_state(record)
        with torch.random.fork_rng(devices=[]):
            fresh = global_model(self.template(), state).state_dict()
        return {
            k: v
            for k, v in fresh.items()
            if k in current and v.shape != current[k].shape
        }

    def _spec(self, state: Mapping[str, torch.Tensor]) -> PermutationSpec:
        with torch.random.fork_rng(devices=[]):  # a rebuild must not draw globally
            return models.permutation_spec(models.fit_to_state(self.template(), state))

    def _accept(
        self,
        replies: Iterable[Message],
        arrays: ArrayRecord,
        grid: Grid,
        previous: Mapping[int, _Client],
    ) -> tuple[dict[int, _Client], list[float]]:
        """Usable replies by node (in node order) and their train losses; a bad
        or failed reply drops out, and so does a node not in ``previous``."""
        nodes = getattr(grid, "nodes", {})
        out: dict[int, _Client] = {}
        losses: list[float] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("fedma: node %d failed: %s", node, reply.error.reason)
                continue
            info = nodes.get(node)
            reason = check_reply(
                reply.content,
                arrays,
                allow_other_widths=True,
                max_examples=float(info.num_examples) if info else 1e12,
            )
            counts = reply.content["metrics"].get("label-counts")
            if reason is None and not isinstance(counts, list):
                reason = "the reply has no label-counts"
            if reason is not None:
                log.warning("fedma: rejected the update of node %d: %s", node, reason)
                continue
            metrics = reply.content["metrics"]
            if "train_loss" in metrics:
                losses.append(float(metrics["train_loss"]))  # type: ignore[arg-type]
            out[node] = _Client(
                state=record_to_state(reply.content["arrays"]),  # type: ignore[arg-type]
                counts=np.asarray(counts, dtype=np.float64),
                examples=float(metrics["num-examples"]),  # type: ignore[arg-type]
            )
        if previous:
            out = {n: c for n, c in out.items() if n in previous}
        return dict(sorted(out.items())), losses

    def _log(
        self,
        server_round: int,
        phase: int,
        group: str | None,
        width: int | None,
        clients: Mapping[int, _Client],
        started: float,
    ) -> None:
        self.history.append(
            {
                "round": server_round,
                "phase": phase,
                "group": group,
                "width": width,
                "clients": len(clients),
                "seconds": time.perf_counter() - started,
                # the widths of the models the clients sent back
                "client_widths": {
                    node: self._spec(c.state).widths() for node, c in clients.items()
                },
            }
        )


def _check(
    sigma2: float,
    sigma0_2: float,
    gamma: float,
    iters: int,
    max_growth: float | None,
    popularity: str,
) -> None:
    for name, value in (("sigma2", sigma2), ("sigma0_2", sigma0_2), ("gamma", gamma)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"strategy.{name}={value!r} must be a number > 0.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"strategy.iters={iters!r} must be an integer >= 0.")
    if max_growth is not None and not (
        isinstance(max_growth, int | float) and max_growth >= 1
    ):
        raise ConfigError(
            f"strategy.max_growth={max_growth!r} must be a number >= 1 or null."
        )
    if popularity not in get_args(Popularity):
        raise ConfigError(
            f"strategy.popularity={popularity!r} is not one of: "
            f"{', '.join(get_args(Popularity))}."
        )


@STRATEGIES.register("fedma")
def fedma(
    *,
    context: StrategyContext,
    sigma2: float = 1.0,
    sigma0_2: float = 1.0,
    gamma: float = 7.0,
    iters: int = 5,
    max_growth: float | None = None,
    popularity: str = "reference",
    retrain_epochs: int = 1,
    last_epochs: int = 3,
    last_lr_factor: float = 0.1,
) -> FedMA:
    """Registered ``fedma``; options as in ``configs/strategy/fedma.yaml``."""
    return FedMA(
        model_name=context.model_name,
        model_kwargs=context.model_kwargs,
        seed=context.seed,
        sigma2=sigma2,
        sigma0_2=sigma0_2,
        gamma=gamma,
        iters=iters,
        max_growth=max_growth,
        popularity=popularity,  # type: ignore[arg-type]
        retrain_epochs=retrain_epochs,
        last_epochs=last_epochs,
        last_lr_factor=last_lr_factor,
        **context.sampling(),
    )
