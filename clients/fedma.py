"""FedMA's client side: local training, then one retraining per matched layer.

The ``fedma`` strategy (``strategies/fedma.py``) runs each round as several
phases of messages; this module answers them on the ClientApp:

``train.fedma_local`` (phase 0)
    Load the global model; if this client took part in the matching that made
    it, cut its own units back out (FedMA's ``reconstruct_local_net``, see
    :func:`fedsim.matching.match.slice_for_client`); train the whole model as
    an ordinary ``train`` message would; keep the trained state.
``train.fedma_layer`` (one per permutation group, input side first)
    Put the matched group in global order with this client's assignment and
    take the newly frozen global tensors (:func:`fedsim.matching.fedma.
    patch_client`), freeze every tensor matched so far, retrain the rest,
    keep the state and the assignment.

Between the phases of a round the client keeps its current model state in its
``context.state``. Nothing is kept between rounds: its assignment into the
global model comes with the next round's ``train.fedma_local`` message (the
server holds it, and checkpoints it), and a client that missed part of a
matching gets none and starts from the whole global model.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedsim import models, tasks
from fedsim.config import ExperimentConfig
from fedsim.faults import apply_fault
from fedsim.matching.fedma import (
    ACTION_LAYER,
    ACTION_LOCAL,
    ASSIGN_RECORD,
    patch_client,
)
from fedsim.matching.match import slice_for_client
from fedsim.node import (
    NodeData,
    client_threads,
    load_dataset,
    model_kwargs,
    resolve_device,
    set_threads,
    train_client,
)
from fedsim.params import SERVER_STATE_KEY, record_to_state, state_to_record
from fedsim.train import derive_seed, local_train

__all__ = ["register_fedma"]

STATE_RECORD = "fedma.state"
META_RECORD = "fedma.meta"

NodeOf = Callable[[Context], tuple[ExperimentConfig, NodeData]]


def register_fedma(app: ClientApp, data: NodeOf) -> None:
    """Add FedMA's two message handlers to ``app``.

    Parameters
    ----------
    app : ClientApp
        fedsim's ClientApp.
    data : callable
        ``data(context) -> (experiment, node data)``, as the app's own
        handlers use.
    """

    @app.train(ACTION_LOCAL)
    def fedma_local(msg: Message, context: Context) -> Message:
        e, node = data(context)
        config: dict[str, Any] = dict(msg.content.get("config", {}))
        apply_fault(config)
        state = _incoming(msg, context)
        own = _own_assignment(msg)
        if own is not None:
            spec = models.permutation_spec(models.fit_to_state(_template(e), state))
            if set(own) == set(spec.names()):
                state = slice_for_client(
                    state, spec, {g: [a] for g, a in own.items()}, 0
                )
        update = train_client(
            e, node, state, server_round=_round(config), config=config
        )
        shared = list(msg.content["arrays"].keys())
        server = _server_keys(msg)
        local = [k for k in update.state if k not in shared and k not in server]
        if local:
            from clients.client_app import LOCAL_STATE_KEY

            context.state[LOCAL_STATE_KEY] = state_to_record(update.state, local)
        context.state[STATE_RECORD] = state_to_record(update.state)
        context.state[META_RECORD] = ConfigRecord({"shared": shared})
        return _reply(msg, update.state, shared, update.metrics, node)

    @app.train(ACTION_LAYER)
    def fedma_layer(msg: Message, context: Context) -> Message:
        e, node = data(context)
        config: dict[str, Any] = dict(msg.content.get("config", {}))
        apply_fault(config)
        set_threads(client_threads(e))
        meta = context.state[META_RECORD]
        assert isinstance(meta, ConfigRecord)
        state = record_to_state(context.state[STATE_RECORD])  # type: ignore[arg-type]
        group = str(config["fedma-group"])
        incoming = record_to_state(msg.content[ASSIGN_RECORD])  # type: ignore[arg-type]
        assignment = incoming[group].numpy().astype(np.int64)
        template = _template(e)
        spec = models.permutation_spec(models.fit_to_state(template, state))
        patched = patch_client(
            state,
            spec,
            group=group,
            assignment=assignment,
            width=int(config["fedma-width"]),
            frozen=record_to_state(msg.content["arrays"]),  # type: ignore[arg-type]
        )
        model = _holding(template, patched)
        frozen = {str(k) for k in config["fedma-frozen"]}
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        trained, metrics = _retrain(e, node, model, config)
        context.state[STATE_RECORD] = state_to_record(trained)
        shared = [str(k) for k in meta["shared"]]  # type: ignore[union-attr]
        return _reply(msg, trained, shared, metrics, node)


def _round(config: dict[str, Any]) -> int:
    return int(config.get("server-round", 1))


@functools.lru_cache(maxsize=4)
def _template_cached(name: str, kwargs_json: str) -> torch.nn.Module:
    return models.build(name, **json.loads(kwargs_json))


def _template(e: ExperimentConfig) -> torch.nn.Module:
    """The experiment's model (one per process), never loaded with a client's state."""
    kwargs = model_kwargs(e, load_dataset(e))
    return _template_cached(e.model.name, json.dumps(kwargs, sort_keys=True))


def _holding(
    template: torch.nn.Module, state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """A fresh model of ``template``'s architecture at ``state``'s widths."""
    model = models.fit_to_state(template, state)
    if model is template:
        model = copy.deepcopy(template)
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    return model


def _retrain(
    e: ExperimentConfig, node: NodeData, model: torch.nn.Module, config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train ``model``'s trainable parameters for the phase's epochs and lr."""
    server_round = _round(config)
    device = resolve_device(e)
    model.to(device)
    n = int(node.x_train.shape[0])
    if not any(p.requires_grad for p in model.parameters()):
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return state, {"num-examples": float(n), "num-steps": 0.0}
    cfg = dataclasses.replace(e.client, epochs=int(config.get("fedma-epochs", 1)))
    lr = (
        e.client.lr
        * e.client.lr_decay ** (server_round - 1)
        * float(config.get("fedma-lr-factor", 1.0))
    )
    phase = int(config.get("fedma-phase", 1))
    generator = torch.Generator().manual_seed(
        derive_seed(e.seed, server_round, node.partition_id, 100 + phase)
    )
    task = tasks.build(e.task.name, **e.task.options)
    result = local_train(
        model,
        node.x_train.to(device),
        node.y_train.to(device),
        cfg,
        task,
        generator=generator,
        lr=lr,
    )
    metrics = {
        "num-examples": float(result.num_examples),
        "train_loss": result.train_loss,
        "num-steps": float(result.num_steps),
    }
    return {k: v.detach().cpu() for k, v in result.state_dict.items()}, metrics


def _reply(
    msg: Message,
    state: dict[str, torch.Tensor],
    shared: list[str],
    metrics: dict[str, float],
    node: NodeData,
) -> Message:
    content = RecordDict(
        {
            "arrays": state_to_record(state, shared),
            "metrics": MetricRecord({**metrics, "label-counts": node.label_counts()}),
        }
    )
    return Message(content, reply_to=msg)


def _own_assignment(msg: Message) -> dict[str, np.ndarray] | None:
    """This client's assignment into the global model, if the message has one."""
    owned = msg.content.get(ASSIGN_RECORD)
    if not isinstance(owned, ArrayRecord) or not len(owned):
        return None
    return {k: v.numpy().astype(np.int64) for k, v in record_to_state(owned).items()}


def _server_keys(msg: Message) -> set[str]:
    record = msg.content.get(SERVER_STATE_KEY)
    return set(record.keys()) if isinstance(record, ArrayRecord) else set()


def _incoming(msg: Message, context: Context) -> dict[str, torch.Tensor]:
    """This client's local tensors + server-owned tensors + the global arrays."""
    from clients.client_app import LOCAL_STATE_KEY

    state: dict[str, torch.Tensor] = {}
    for record in (
        context.state.get(LOCAL_STATE_KEY),
        msg.content.get(SERVER_STATE_KEY),
    ):
        if isinstance(record, ArrayRecord):
            state.update(record_to_state(record))
    state.update(record_to_state(msg.content["arrays"]))  # type: ignore[arg-type]
    return state
