"""Probabilistic Federated Neural Matching (PFNM) as a Flower strategy.

Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural
Networks", ICML 2019 (arXiv:1905.12022). Clients send their trained weights
and their label counts (the ClientApp adds ``label-counts`` to every train
reply); the server matches their hidden units to global atoms and returns the
global model at the matched widths, which may exceed every client's.

Round 1 sends every client its own, differently seeded initial model
(``client_init``): ``independent`` (the model's own initialisation),
``reference`` (the reference code's N(0, 0.1^2) weights and 0.1 biases) or
``shared`` (the global model, as FedAvg). With ``num_rounds=1`` this is
one-shot PFNM. Later rounds are "PFNM with communication": each client gets
back its own slice of the global model (``send=slice``: the rows and columns
of the atoms its units were matched to, so it keeps its width; the output
layer is global) or the whole global model (``send=global``), and the server
matches again starting from those atoms, with ``rematch_iters`` sweeps.

Robustness. A client that fails or is not sampled keeps its assignment, moved
to the new atom numbering (:mod:`fedsim.matching.assignments`); a client that
never trained (or lost its assignment) gets the whole global model. Clients of
different widths are matched together. A client without examples of a class
does not move that class's output weights; a class no participant has is
weighted equally across them (its weights are averaged, no division by zero).

The ``mlp`` model is matched by :func:`fedsim.matching.pfnm_mlp_with_assignments`
with the reference defaults; any other model needs the spec-driven
``fedsim.matching.match``. With ``select: true`` the hyperparameters are chosen
once, in the first round, on the clients' held-out data
(:mod:`fedsim.matching.select`). The local models of the final round are kept
in :attr:`PFNMStrategy.local_models` (``keep_local_models``) so that
``python -m fedsim.oneshot`` can compare them with the matched model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
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
from flwr.serverapp.strategy import FedAvg

from fedsim import models, tasks
from fedsim.exceptions import AggregationError, ConfigError
from fedsim.grid import partition_id
from fedsim.matching.assignments import carry_over_clients
from fedsim.matching.permspec import select_units
from fedsim.matching.select import (
    Candidate,
    Hyper,
    best_candidate,
    candidates,
    width_ratio,
)
from fedsim.params import array_to_numpy, state_to_record
from fedsim.strategy import STRATEGIES, StrategyContext
from fedsim.train import derive_seed
from strategies._pfnm_parts import (
    LocalModel,
    Matched,
    Units,
    fits,
    held_out_score,
    match_general,
    match_mlp,
    match_seed,
    reference_init,
    spec_of,
    train_metrics,
)

__all__ = [
    "CLIENT_INITS",
    "SEND",
    "LocalModel",
    "Matched",
    "PFNMStrategy",
    "match_seed",
    "pfnm",
]

log = logging.getLogger("fedsim")

CLIENT_INITS = ("independent", "reference", "shared")
SEND = ("slice", "global")
POPULARITY = ("reference", "consistent")
MISSING = ("patch", "zero_precision")
_INIT_TAG = 41  # derive_seed tag of the clients' round-1 models


class PFNMStrategy(FedAvg):
    """PFNM, one-shot or with communication; see the module docstring.

    Parameters
    ----------
    context : StrategyContext
        The run (model to rebuild, seed, rounds, task, federated evaluation).
    hyper : Hyper
        ``sigma2``, ``sigma0_2``, ``gamma`` (the starting point of ``select``).
    iters, rematch_iters : int
        Sweeps of a fresh matching, and of one restarted from the atoms the
        participants were sent.
    popularity, missing : str
        As for :func:`fedsim.matching.pfnm_mlp`.
    client_init, send : str
        Round-1 models and later-round payload; see the module docstring.
    select : bool
        Choose the hyperparameters on held-out client data in the first round.
    select_grid : mapping of str to list of float
        Values tried for ``sigma2``, ``sigma0_2``, ``gamma`` (with ``hyper``).
    max_width_factor : float
        Selection skips settings whose global width exceeds this many times
        the widest client's in some layer.
    keep_local_models : bool
        Keep the final round's local models (for the one-shot table).
    **sampling
        FedAvg's participation arguments.
    """

    accepts_different_widths = True

    def __init__(
        self,
        *,
        context: StrategyContext,
        hyper: Hyper,
        iters: int,
        rematch_iters: int,
        popularity: str,
        missing: str,
        client_init: str,
        send: str,
        select: bool,
        select_grid: Mapping[str, Sequence[float]],
        max_width_factor: float,
        keep_local_models: bool,
        **sampling: Any,
    ) -> None:
        super().__init__(**sampling)
        for name, value, allowed in (
            ("popularity", popularity, POPULARITY),
            ("missing", missing, MISSING),
            ("client_init", client_init, CLIENT_INITS),
            ("send", send, SEND),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"strategy.{name}={value!r} is not one of: {', '.join(allowed)}."
                )
        for name, count in (("iters", iters), ("rematch_iters", rematch_iters)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ConfigError(f"strategy.{name}={count!r} must be an integer >= 0.")
        if not max_width_factor >= 1.0:
            raise ConfigError(
                f"strategy.max_width_factor={max_width_factor!r} must be at least 1."
            )
        if select and not context.federated_evaluation:
            raise ConfigError(
                "strategy.select=true scores settings on the clients' held-out data; "
                "use evaluation=federated (evaluation.local_test_fraction > 0)."
            )
        self.context = context
        self.hyper = hyper
        self.iters, self.rematch_iters = iters, rematch_iters
        self.popularity, self.missing = popularity, missing
        self.client_init, self.send = client_init, send
        self.select = select
        self.grid_candidates = candidates(hyper, select_grid)
        self.max_width_factor = float(max_width_factor)
        self.keep_local_models = keep_local_models
        self.primary = tasks.build(context.task).primary
        # matching state (pickled with the strategy in every checkpoint)
        self.widths: dict[str, int] | None = None  # global widths after the last match
        self.assignments: dict[int, Units] = {}  # partition id -> its atoms
        self.selection: list[Candidate] = []
        self.local_models: dict[int, LocalModel] = {}
        self._sent: dict[int, Units | None] = {}  # this round's payload per client
        self._node_pid: dict[int, int] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._grid: Grid | None = None  # this round's grid (not pickled)
        self._model: torch.nn.Module | None = None  # template (not pickled)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_grid"] = None
        state["_model"] = None
        return state

    # -- helpers --------------------------------------------------------------
    def template(self) -> torch.nn.Module:
        """The run's model at its configured widths (built once per process)."""
        if self._model is None:
            ctx = self.context
            with torch.random.fork_rng(devices=[]):
                self._model = models.build(ctx.model_name, **ctx.model_kwargs)
        return self._model

    def _spec_of(self, state: Mapping[str, torch.Tensor]) -> Any:
        """The permutation spec of the run's model at the widths of ``state``."""
        return spec_of(self.template(), state)

    def initial_state(self, partition_id: int, keys: Iterable[str]) -> dict[str, Any]:
        """Client ``partition_id``'s own round-1 model (``client_init``)."""
        seed = derive_seed(self.context.seed, _INIT_TAG, partition_id)
        ctx = self.context
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = models.build(ctx.model_name, **ctx.model_kwargs)
        if self.client_init == "reference":
            reference_init(model, torch.Generator().manual_seed(seed))
        state = model.state_dict()
        return {k: state[k] for k in keys}

    def slice_of(self, state: dict[str, torch.Tensor], units: Units) -> dict[str, Any]:
        """The global ``state`` restricted to ``units`` of every group, in order."""
        for group, keep in units.items():
            state = select_units(state, self._spec_of(state), group, keep)
        return state

    def _payload(
        self, pid: int, arrays: ArrayRecord, state: dict[str, torch.Tensor]
    ) -> tuple[ArrayRecord, Units | None]:
        """What client ``pid`` trains this round, and the atoms its units are."""
        if self.widths is None and self.client_init != "shared":
            return state_to_record(self.initial_state(pid, arrays.keys())), None
        spec = self._spec_of(state)
        own = self.assignments.get(pid)
        if self.send == "slice" and own is not None:
            return state_to_record(self.slice_of(state, own)), own
        return arrays, {g.name: np.arange(g.size, dtype=np.int64) for g in spec}

    # -- Flower Strategy --------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client: its own model, slice or the global one."""
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        self._grid = grid
        state = {
            k: torch.from_numpy(np.array(array_to_numpy(a))) for k, a in arrays.items()
        }
        if self.widths is not None and self._spec_of(state).widths() != self.widths:
            log.warning("pfnm: the global model changed widths; assignments reset")
            self.widths, self.assignments = None, {}
        messages, self._sent = [], {}
        for message in sampled:
            node = message.metadata.dst_node_id
            pid = partition_id(grid, node)
            self._node_pid[node] = pid
            record, self._sent[pid] = self._payload(pid, arrays, state)
            content = RecordDict(
                {"arrays": record, "config": ConfigRecord(dict(config))}
            )
            messages.append(
                Message(
                    content=content, message_type=MessageType.TRAIN, dst_node_id=node
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Match the replies' models; returns the global model at matched widths."""
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        clients = sorted((self._local(r) for r in valid), key=lambda c: c.partition_id)
        self._dtypes = {k: v.dtype for k, v in clients[0].state.items()}
        sent = [self._sent.get(c.partition_id) for c in clients]
        init = sent if fits(sent, clients, self.template()) else None
        if self.select and not self.selection:
            matched = self._select(server_round, clients, init, valid)
        else:
            matched = self.match_clients(
                clients, hyper=self.hyper, server_round=server_round, init=init
            )
        self._remember(clients, sent, matched)
        if self.keep_local_models and server_round >= self.context.num_rounds:
            self.local_models = {c.partition_id: c for c in clients}
        return matched.record(self._dtypes), train_metrics(valid)

    # -- matching ---------------------------------------------------------------
    def match_clients(
        self,
        clients: Sequence[LocalModel],
        *,
        hyper: Hyper,
        server_round: int,
        init: Sequence[Units | None] | None = None,
        missing: str | None = None,
        popularity: str | None = None,
    ) -> Matched:
        """Match ``clients`` as round ``server_round`` does (public for reports).

        ``init`` (the atoms each client was sent) restarts the matching with
        ``rematch_iters`` sweeps; without it ``iters`` sweeps follow a fresh pass.
        """
        counts = np.stack([c.label_counts for c in clients]).astype(np.float64)
        counts[:, counts.sum(0) == 0] = 1.0  # a class nobody has: equal shares
        options = {
            "sigma2": hyper.sigma2,
            "sigma0_2": hyper.sigma0_2,
            "gamma": hyper.gamma,
            "iters": self.iters if init is None else self.rematch_iters,
            "seed": match_seed(self.context.seed, server_round),
            "popularity": popularity or self.popularity,
            "missing": missing or self.missing,
        }
        if self.context.model_name == "mlp":
            return match_mlp(clients, counts, init, options)
        return match_general(
            clients, counts, init, options, self.template(), self.context.model_name
        )

    def _select(
        self,
        server_round: int,
        clients: Sequence[LocalModel],
        init: Sequence[Units | None] | None,
        replies: Sequence[Message],
    ) -> Matched:
        """Try every candidate; keep the best on the clients' held-out data."""
        template = self.template()
        local = {
            g: max(c.widths(template)[g] for c in clients)
            for g in models.permutation_spec(template).names()
        }
        nodes = [r.metadata.src_node_id for r in replies]
        higher = tasks.build(self.context.task).higher_is_better
        tried, results = [], []
        for hyper in self.grid_candidates:
            matched = self.match_clients(
                clients, hyper=hyper, server_round=server_round, init=init
            )
            ratio = width_ratio(matched.widths, local)
            score = None
            if ratio <= self.max_width_factor:
                score = self._held_out_score(server_round, matched, nodes)
            tried.append(Candidate(hyper, dict(matched.widths), ratio, score))
            results.append(matched)
        best = best_candidate(tried, higher_is_better=higher)
        self.selection, self.hyper = tried, best.hyper
        log.info("pfnm: selected %s on held-out client data", best.hyper.label())
        return results[tried.index(best)]

    def _held_out_score(
        self, server_round: int, matched: Matched, nodes: Sequence[int]
    ) -> float | None:
        """Example-weighted held-out metric of ``matched`` over ``nodes``."""
        if self._grid is None:
            raise AggregationError(
                "strategy.select needs the round's grid; call configure_train first."
            )
        arrays = matched.record(self._dtypes)
        return held_out_score(self._grid, arrays, nodes, server_round, self.primary)

    def _local(self, reply: Message) -> LocalModel:
        node = reply.metadata.src_node_id
        if node not in self._node_pid:
            raise AggregationError(f"pfnm got a reply from node {node}, never sent to.")
        return LocalModel.from_reply(
            reply, self._node_pid[node], self.context.num_classes
        )

    def _remember(
        self,
        clients: Sequence[LocalModel],
        sent: Sequence[Units | None],
        matched: Matched,
    ) -> None:
        """Store participants' assignments; move absent clients' to the new atoms."""
        groups = list(matched.assignments)
        new = {
            c.partition_id: {g: matched.assignments[g][j] for g in groups}
            for j, c in enumerate(clients)
        }
        kept = {}
        if self.widths is not None:
            absent = {p: a for p, a in self.assignments.items() if p not in new}
            known = {
                c.partition_id: units
                for c, units in zip(clients, sent, strict=True)
                if units is not None
                and all(len(units[g]) == len(new[c.partition_id][g]) for g in groups)
            }
            kept = carry_over_clients(absent, self.widths, known, new, matched.widths)
        self.assignments = {**kept, **new}
        self.widths = dict(matched.widths)


@STRATEGIES.register("pfnm")
def pfnm(
    *,
    context: StrategyContext,
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
) -> PFNMStrategy:
    """Registered ``pfnm``; options as in ``configs/strategy/pfnm.yaml``."""
    return PFNMStrategy(
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
