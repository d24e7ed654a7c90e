"""What one client does, independent of Flower: local training and evaluation.

The ClientApp (``clients/client_app.py``) turns Flower messages into calls to
:func:`train_client` and :func:`evaluate_client`; the vectorised engine calls
the same pieces for a whole cohort. A client's data comes from
:mod:`fedsim.node_data` (its names are importable from here too). A
simulation worker is a long-lived Ray actor that serves many clients in turn,
so each process keeps one model object per architecture and loads each
client's state into it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim import data as datasets
from fedsim import models, tasks
from fedsim.config import ExperimentConfig
from fedsim.exceptions import ConfigError
from fedsim.node_data import (
    NodeData,
    load_dataset,
    node_data,
    options_key,
    partition_indices,
)
from fedsim.plasticity import (
    ANCHORS_RECORD,
    FEDCURV_CONST,
    FEDCURV_LAMBDA,
    FISHER_RECORD,
    FISHER_SAMPLES,
    WPL_ALPHA,
    CurvatureSums,
    empirical_fisher,
    fedcurv_penalty,
    wpl_penalty,
)
from fedsim.pruning.aofp import AOFP, AOFP_RECORD, aofp_train
from fedsim.pruning.flops import count_flops
from fedsim.train import Penalty, derive_seed, evaluate, local_train

__all__ = [
    "ClientUpdate",
    "NodeData",
    "build_global_model",
    "client_threads",
    "evaluate_client",
    "load_dataset",
    "model_kwargs",
    "node_data",
    "partition_indices",
    "resolve_device",
    "set_threads",
    "train_client",
]

Tensors = dict[str, torch.Tensor]


def model_kwargs(exp: ExperimentConfig, splits: datasets.DataSplits) -> dict[str, Any]:
    """Build kwargs of the experiment's model for this dataset."""
    return {
        "input_shape": tuple(splits.input_shape),
        "num_classes": splits.num_classes,
        **exp.model.options,
    }


def build_global_model(
    exp: ExperimentConfig, splits: datasets.DataSplits
) -> torch.nn.Module:
    """The initial global model, seeded by the run seed (same for every strategy)."""
    torch.manual_seed(derive_seed(exp.seed, 11))
    return models.build(exp.model.name, **model_kwargs(exp, splits))


def resolve_device(exp: ExperimentConfig) -> torch.device:
    """The client's torch device (``client.device``; ``auto`` picks CUDA if present)."""
    wanted = exp.client.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("client.device='cuda' but this machine has no CUDA device")
    return torch.device(wanted)


def client_threads(exp: ExperimentConfig) -> int:
    """Torch threads per client: ``client.num_threads``, else its CPU share."""
    share = int(exp.simulation.client_resources.num_cpus)
    return max(1, exp.client.num_threads or share)


@functools.lru_cache(maxsize=1)
def set_threads(num_threads: int) -> None:
    """Set torch's intra-op threads once per process.

    More threads than the client's CPU share oversubscribe the machine when
    several clients train at once (measured 7-30x slower on 2 cores).
    """
    torch.set_num_threads(max(1, num_threads))


@functools.lru_cache(maxsize=4)
def _template(name: str, kwargs_json: str) -> tuple[torch.nn.Module, Tensors]:
    """One model object per process and architecture, reused by every client,
    with a copy of its initial state."""
    model = models.build(name, **json.loads(kwargs_json))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _model_for(
    exp: ExperimentConfig,
    splits: datasets.DataSplits,
    state: Mapping[str, torch.Tensor],
) -> torch.nn.Module:
    """The experiment's model at the widths of ``state``, holding ``state``.

    Tensors missing from ``state`` (a client's local-role tensors before its
    first round) keep the model's initial values.
    """
    template, initial = _template(
        exp.model.name, options_key(model_kwargs(exp, splits))
    )
    model = models.fit_to_state(template, state)
    base = initial if model is template else model.state_dict()
    full = {**base, **state}
    model.load_state_dict(full, strict=True)
    return model


def proximal_penalty(anchor: Tensors, mu: float) -> Penalty:
    """FedProx's (mu / 2) * ||w - w_global||^2 over the trainable parameters."""

    def penalty(params: Tensors) -> torch.Tensor:
        total = torch.zeros((), dtype=next(iter(params.values())).dtype)
        for key, value in params.items():
            if key in anchor:
                total = total + (value - anchor[key]).pow(2).sum()
        return 0.5 * mu * total

    return penalty


@dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back after local training.

    Attributes
    ----------
    state : dict
        The trained model's full state dict (every key of the model).
    metrics : dict
        ``num-examples``, ``train_loss``, ``num-steps`` and any extras.
    extras : dict
        Further named tensor records for the server (e.g. a Fisher estimate),
        sent as ArrayRecords beside ``arrays``.
    """

    state: Tensors
    metrics: dict[str, float]
    extras: dict[str, Tensors] = field(default_factory=dict)


def _penalty(
    model: torch.nn.Module,
    config: Mapping[str, Any],
    extras: Mapping[str, Mapping[str, torch.Tensor]],
    default_mu: float,
) -> Penalty | None:
    """The sum of the regularisers the round asks for (FedProx, WPL, FedCurv)."""
    terms: list[Penalty] = []
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    device = next(iter(anchor.values())).device
    mu = float(config.get("proximal-mu", default_mu))
    if mu > 0:
        terms.append(proximal_penalty(anchor, mu))
    fisher = {k: v.to(device) for k, v in extras.get(FISHER_RECORD, {}).items()}
    if fisher and ANCHORS_RECORD in extras:
        weighted = {k: v.to(device) for k, v in extras[ANCHORS_RECORD].items()}
        sums = CurvatureSums(fisher, weighted, float(config.get(FEDCURV_CONST, 0.0)))
        terms.append(fedcurv_penalty(sums, float(config.get(FEDCURV_LAMBDA, 0.0))))
    elif fisher and float(config.get(WPL_ALPHA, 0.0)) > 0:
        terms.append(wpl_penalty(anchor, fisher, float(config[WPL_ALPHA])))
    if len(terms) <= 1:
        return terms[0] if terms else None

    def total(params: Tensors) -> torch.Tensor:
        return torch.stack([term(params) for term in terms]).sum()

    return total


def _pruning_search(
    exp: ExperimentConfig,
    splits: datasets.DataSplits,
    model: torch.nn.Module,
    extras: Mapping[str, Mapping[str, torch.Tensor]],
    seed: int,
) -> AOFP | None:
    """AOFP's search for this round: the client's own, or probing for the server."""
    cfg = exp.client.pruning
    generator = torch.Generator().manual_seed(seed)
    if cfg.name == "aofp" and cfg.side == "client":
        template, _ = _template(exp.model.name, options_key(model_kwargs(exp, splits)))
        return AOFP(
            model,
            generator=generator,
            layers=cfg.layers,
            k=cfg.k,
            theta=cfg.theta,
            warmup=cfg.warmup,
            target_flops=cfg.target_flops,
            reference_flops=count_flops(template),
        )
    sets = extras.get(AOFP_RECORD)
    if sets:
        return AOFP(
            model,
            generator=generator,
            search_sets={k: v.long().numpy() for k, v in sets.items()},
        )
    return None


def train_client(
    exp: ExperimentConfig,
    node: NodeData,
    state: Mapping[str, torch.Tensor],
    *,
    server_round: int,
    config: Mapping[str, Any],
    extras: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> ClientUpdate:
    """Load ``state`` into the client's model, train locally, return the update.

    ``config`` is the round's ConfigRecord as a dict (``proximal-mu`` from
    FedProx, ``wpl-alpha``/``fedcurv-lambda`` and ``fisher-samples`` from the
    plasticity strategies, ``lr`` overrides); ``extras`` are the message's
    further tensor records by name (everything but the model): a Fisher
    estimate and FedCurv anchors (:mod:`fedsim.plasticity`), AOFP search sets
    (:mod:`fedsim.pruning.federated`).

    With ``client.pruning`` on the client side, AOFP runs during local training
    and the update comes back narrower (``flops`` in the metrics). With search
    sets from the server, the client measures AOFP's damages and returns them
    as the extra record ``fedsim.aofp``. When the round asks for
    ``fisher-samples``, the client also returns its empirical Fisher at the
    trained weights as ``fedsim.fisher``.
    """
    set_threads(client_threads(exp))
    splits_meta = load_dataset(exp)
    device = resolve_device(exp)
    model = _model_for(exp, splits_meta, state)
    model.to(device)
    task = tasks.build(exp.task.name, **exp.task.options)
    lr = float(
        config.get("lr", exp.client.lr * exp.client.lr_decay ** (server_round - 1))
    )
    extras = extras or {}
    penalty = _penalty(model, config, extras, exp.client.proximal_mu)
    generator = torch.Generator().manual_seed(
        derive_seed(exp.seed, server_round, node.partition_id)
    )
    search = _pruning_search(
        exp,
        splits_meta,
        model,
        extras,
        derive_seed(exp.seed, server_round, node.partition_id, 5),
    )
    x, y = node.x_train.to(device), node.y_train.to(device)
    if search is None:
        result = local_train(
            model, x, y, exp.client, task, generator=generator, lr=lr, penalty=penalty
        )
    else:
        result = aofp_train(
            model,
            x,
            y,
            exp.client,
            task,
            search=search,
            generator=generator,
            lr=lr,
            penalty=penalty,
        )
    metrics = {
        "num-examples": float(result.num_examples),
        "train_loss": result.train_loss,
        "num-steps": float(result.num_steps),
    }
    trained = result.state_dict
    out: dict[str, Tensors] = {}
    if search is not None and search.measure_only:
        out[AOFP_RECORD] = search.statistics()
    elif search is not None:
        model, trained = search.export(trained)
        metrics["flops"] = float(count_flops(model))
    samples = int(config.get(FISHER_SAMPLES, 0))
    if samples > 0:
        model.load_state_dict(trained)
        pick = torch.randperm(int(x.shape[0]), generator=generator)[:samples]
        pick = pick.to(device)
        out[FISHER_RECORD] = empirical_fisher(
            model, x.index_select(0, pick), y.index_select(0, pick), task
        )
    return ClientUpdate(
        {k: v.cpu() for k, v in trained.items()},
        metrics,
        {name: {k: v.cpu() for k, v in t.items()} for name, t in out.items()},
    )


def evaluate_client(
    exp: ExperimentConfig,
    node: NodeData,
    state: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Evaluate ``state`` on the client's held-out split (federated evaluation)."""
    splits_meta = load_dataset(exp)
    model = _model_for(exp, splits_meta, state)
    task = tasks.build(exp.task.name, **exp.task.options)
    bind = getattr(task, "bind_model", None)
    if bind is not None:  # as the server does: e.g. density's bits per dimension
        task = bind(model)
    n = int(node.x_test.shape[0])
    if n == 0:
        return {"num-examples": 0.0}
    metrics = evaluate(
        model, node.x_test, node.y_test, task, batch_size=exp.evaluation.batch_size
    )
    return {"num-examples": float(n), **metrics}
