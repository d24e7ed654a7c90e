"""The ``vectorized`` engine: a cohort's clients train together, behind any strategy.

:class:`VectorizedGrid` is a Flower ``Grid`` (an :class:`~fedsim.inprocess.
InProcessGrid` underneath) that answers a round's train messages all at once:
it stacks the clients' starting states and trains them as one batched
computation (:mod:`fedsim._cohort`: ``torch.func.vmap`` over
:func:`fedsim.train.make_step`, each client with its own data order, padding
masks, BatchNorm statistics and optimiser state), then hands back ordinary
reply messages, the same a ClientApp would send. Strategies and the server
loop cannot tell the difference, so every strategy works unchanged. Federated
evaluation is batched too: clients that evaluate the same model share one
forward pass over their concatenated held-out rows.

The cohort is split into shards: one in this process (the default on CPU and
on a single GPU), or one Ray actor per GPU or CPU group
(:func:`fedsim.simulation.run_cohort_shards`) when there are several GPUs, a
Ray cluster (``simulation.ray_address``) or ``shards > 1`` in
``simulation.vectorized`` (:class:`fedsim.config.VectorizedConfig`). Inside a
shard, clients train in chunks sized to the device memory (on CPU also to its
caches), with ``shard_cpus`` torch threads (0: the in-process shard gets the
CPUs the clients would share, a Ray shard its part of the cluster's).

Whatever cannot be batched exactly trains one client at a time through the
ClientApp, as under ``simulation.engine=inprocess``; each reason is logged
once. Per message: tensor records besides the model (FedCurv/WPL anchors and
Fisher, AOFP search sets) and round-config keys other than ``server-round``,
``lr`` and ``proximal-mu`` (injected faults, Fisher requests). Per cohort:
client-side AOFP pruning (``client.pruning``), models with client-local
tensors (``tensor_roles`` ``"local"``), clients starting from models of
different widths, and any model that
:func:`fedsim._cohort_probe.batching_problem` rejects (vmap raises,
Python-side state, layers other than BatchNorm that mix a batch's examples,
data-dependent control flow).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp

from fedsim import models, node, tasks
from fedsim._cohort_eval import client_metrics
from fedsim._cohort_messages import (
    incoming_states,
    message_problem,
    metrics_reply,
    train_reply,
)
from fedsim._cohort_probe import batching_problem, first_line
from fedsim._cohort_shard import (
    ShardJob,
    ShardResult,
    client_store,
    run_shard,
    split_evenly,
    steps_of,
    template_model,
)
from fedsim.config import ExperimentConfig, VectorizedConfig
from fedsim.inprocess import InProcessGrid

__all__ = ["VectorizedGrid"]

log = logging.getLogger("fedsim")

TRAIN = "train"
EVALUATE = "evaluate"


def _local_cpus(exp: ExperimentConfig) -> int:
    """CPUs the clients of a local simulation share: ``simulation.ray_num_cpus``,
    else this machine's (what a locally started Ray would have)."""
    return max(1, exp.simulation.ray_num_cpus or os.cpu_count() or 1)


@dataclass
class _Batch:
    """Replies of the batched path (by message position) and their work's seconds."""

    replies: dict[int, Message] = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class VectorizedGrid(InProcessGrid):
    """A Grid that trains (and evaluates) each cohort batched.

    Parameters
    ----------
    client_app : ClientApp
        The app for everything not batched (hello, fall-backs).
    exp : ExperimentConfig
        The experiment (one node per client, ``partition-id`` = index).
    options : VectorizedConfig, optional
        Sharding and chunking (default: ``exp.simulation.vectorized``).
    """

    def __init__(
        self,
        client_app: ClientApp,
        exp: ExperimentConfig,
        *,
        options: VectorizedConfig | None = None,
    ) -> None:
        super().__init__(client_app, exp.num_clients)
        self.exp = exp
        self.options = options or exp.simulation.vectorized
        self.partition = {nid: i for i, nid in enumerate(self.node_ids)}
        self.fallbacks: list[str] = []
        self._problems: dict[str, str | None] = {}
        self._on_ray = False

    # -- Grid ---------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Answer every message now: train/evaluate cohorts batched, the rest alone."""
        batch = list(messages)
        ids = []
        for message in batch:
            message_id = f"m{next(self._counter)}-{os.urandom(4).hex()}"
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
        for message_id, (reply, _) in zip(ids, self._answer(batch), strict=True):
            self._replies[message_id] = reply
        return ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Answer every message; with ``timeout``, drop replies that took longer.

        Batched clients all finish when their batch does (as parallel clients
        started together would); a client on the per-client path takes as long
        as its own call, as under the in-process engine.
        """
        answers = self._answer(list(messages))
        return [r for r, took in answers if timeout is None or took <= timeout]

    def _answer(self, batch: list[Message]) -> list[tuple[Message, float]]:
        """Every message's reply and how long it took, in message order.

        A batched reply took as long as its batch's training (or evaluation);
        the engine's one-time set-up (the batching probe, stacking the data)
        does not count against a round timeout.
        """
        answered: dict[int, tuple[Message, float]] = {}
        for kind, handler in ((TRAIN, self._train), (EVALUATE, self._evaluate)):
            picked = [i for i, m in enumerate(batch) if _type(m) == kind]
            if picked:
                done = handler([batch[i] for i in picked], picked)
                answered.update({i: (r, done.seconds) for i, r in done.replies.items()})
        out = []
        for i, message in enumerate(batch):
            if i in answered:
                reply, took = answered[i]
                reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
                out.append((reply, took))
                continue
            alone = time.monotonic()
            reply = self._call(message)
            out.append((reply, time.monotonic() - alone))
        return out

    def close(self) -> None:
        """Release the Ray shard actors, if any were started."""
        if self._on_ray:
            from fedsim.simulation import close_cohort_shards

            close_cohort_shards()
            self._on_ray = False

    # -- fall-back bookkeeping ---------------------------------------------
    def _fall_back(self, reason: str) -> _Batch:
        if reason not in self.fallbacks:
            self.fallbacks.append(reason)
            log.warning(
                "vectorized engine: %s; those clients train one at a time instead",
                reason,
            )
        return _Batch()

    def _experiment_problem(self) -> str | None:
        pruning = self.exp.client.pruning  # AOFP
        if pruning.name != "none" and pruning.side == "client":
            return (
                f"client.pruning.name={pruning.name!r} prunes each client's model "
                "physically (its width changes while it trains)"
            )
        return None

    def _model_problem(self, state: dict[str, torch.Tensor]) -> str | None:
        """Why the model at ``state``'s widths cannot be batched (probed once)."""
        shapes = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in state.items())
        key = repr(shapes)
        if key not in self._problems:
            model = template_model(self.exp, state)
            local = [k for k, r in models.tensor_roles(model).items() if r == "local"]
            missing = sorted(set(model.state_dict()) - set(state))
            if local:
                problem: str | None = f"the model has client-local tensors {local}"
            elif missing:
                problem = f"the messages lack the model tensors {missing}"
            else:
                part = self._probe_data()
                task = tasks.build(self.exp.task.name, **self.exp.task.options)
                problem = batching_problem(
                    model, task, self.exp.client, part.x_train, part.y_train
                )
                if problem is not None:
                    problem = (
                        f"model {self.exp.model.name!r} cannot be batched: {problem}"
                    )
            self._problems[key] = problem
        return self._problems[key]

    def _probe_data(self) -> node.NodeData:
        """The first client with training examples (real rows for the probe)."""
        for pid in range(self.exp.num_clients):
            part = node.node_data(self.exp, pid)
            if part.x_train.shape[0] > 0:
                return part
        raise ValueError("no client has training examples")

    # -- training -------------------------------------------------------------
    def _train(self, messages: list[Message], where: list[int]) -> _Batch:
        problem = self._experiment_problem()
        if problem is not None:
            return self._fall_back(problem)
        keep = []
        for i, message in enumerate(messages):
            problem = message_problem(message)
            if problem is not None:
                self._fall_back(problem)
                continue
            pid = self.partition[message.metadata.dst_node_id]
            # a client without examples gets the per-client path's error reply
            if node.node_data(self.exp, pid).x_train.shape[0] > 0:
                keep.append(i)
        if not keep:
            return _Batch()
        messages = [messages[i] for i in keep]
        where = [where[i] for i in keep]
        pids = [self.partition[m.metadata.dst_node_id] for m in messages]
        states, state_of = incoming_states(messages)
        signature = {(k, tuple(v.shape), v.dtype) for k, v in states[0].items()}
        for state in states[1:]:
            if {(k, tuple(v.shape), v.dtype) for k, v in state.items()} != signature:
                return self._fall_back(
                    "the clients start from models of different widths"
                )
        problem = self._model_problem(states[0])
        if problem is not None:
            return self._fall_back(problem)
        c = self.exp.client
        configs: list[dict[str, Any]] = [
            dict(m.content.get("config", {})) for m in messages
        ]
        rounds = tuple(int(cfg.get("server-round", 1)) for cfg in configs)
        lrs = tuple(
            float(cfg.get("lr", c.lr * c.lr_decay ** (rnd - 1)))
            for cfg, rnd in zip(configs, rounds, strict=True)
        )
        mus = tuple(float(cfg.get("proximal-mu", c.proximal_mu)) for cfg in configs)
        try:
            results, seconds = self._run(pids, rounds, states, state_of, lrs, mus)
        except Exception as err:  # anything batched training could not do
            return self._fall_back(f"batched training failed ({first_line(err)})")
        replies: dict[int, Message] = {}
        for message, position, (result, row) in zip(
            messages, where, results, strict=True
        ):
            replies[position] = train_reply(message, result, row)
        return _Batch(replies, seconds)

    def _shard_count(self, size: int) -> int:
        opts = self.options
        if opts.shards:
            return min(opts.shards, size)
        if self.exp.simulation.ray_address:
            from fedsim.simulation import cohort_shard_count

            return min(size, cohort_shard_count(self.exp))
        device = node.resolve_device(self.exp)
        if device.type == "cuda":
            return min(size, max(1, torch.cuda.device_count()))
        return 1

    def _run(
        self,
        pids: list[int],
        rounds: tuple[int, ...],
        states: list[dict[str, torch.Tensor]],
        state_of: list[int],
        lrs: tuple[float, ...],
        mus: tuple[float, ...],
    ) -> tuple[list[tuple[ShardResult, int]], float]:
        """Train the cohort in shards: per client (its shard's result, its row),
        and the seconds the training took."""
        counts = [int(node.node_data(self.exp, p).x_train.shape[0]) for p in pids]
        c = self.exp.client
        steps = [steps_of(n, c.batch_size, c.epochs) for n in counts]
        groups = split_evenly(steps, self._shard_count(len(pids)))
        jobs = []
        for group in groups:
            used = sorted({state_of[i] for i in group})
            jobs.append(
                ShardJob(
                    partition_ids=tuple(pids[i] for i in group),
                    rounds=tuple(rounds[i] for i in group),
                    states=tuple(states[j] for j in used),
                    state_of=tuple(used.index(state_of[i]) for i in group),
                    lrs=tuple(lrs[i] for i in group),
                    mus=tuple(mus[i] for i in group),
                    max_chunk=self.options.max_chunk,
                    memory_fraction=self.options.memory_fraction,
                )
            )
        if len(jobs) == 1 and not self.exp.simulation.ray_address:
            client_store(self.exp, node.resolve_device(self.exp))  # once per run
            # the one shard is every client of the round: give it the CPUs
            # the clients would share (as Ray shards get their share)
            threads = self.options.shard_cpus or _local_cpus(self.exp)
            started = time.monotonic()
            with _torch_threads(threads):
                results = [run_shard(self.exp, jobs[0])]
        else:
            from fedsim.simulation import run_cohort_shards

            self._on_ray = True
            started = time.monotonic()
            results = run_cohort_shards(
                self.exp, jobs, shard_cpus=self.options.shard_cpus
            )
        seconds = time.monotonic() - started
        placed: dict[int, tuple[ShardResult, int]] = {}
        for group, result in zip(groups, results, strict=True):
            for row, i in enumerate(group):
                placed[i] = (result, row)
        return [placed[i] for i in range(len(pids))], seconds

    # -- evaluation -----------------------------------------------------------
    def _evaluate(self, messages: list[Message], where: list[int]) -> _Batch:
        if any(not isinstance(m.content.get("arrays"), ArrayRecord) for m in messages):
            return _Batch()
        pids = [self.partition[m.metadata.dst_node_id] for m in messages]
        states, state_of = incoming_states(messages)
        for state in states:
            problem = self._model_problem(state)
            if problem is not None:
                return self._fall_back(problem)
        store = client_store(self.exp, torch.device("cpu"), split="test")
        task = tasks.build(self.exp.task.name, **self.exp.task.options)
        started = time.monotonic()
        replies: dict[int, Message] = {}
        for s, state in enumerate(states):
            members = [i for i in range(len(messages)) if state_of[i] == s]
            model = template_model(self.exp, state)
            model.load_state_dict(state, strict=True)
            model.eval()
            sums = client_metrics(
                model,
                task,
                store,
                [pids[i] for i in members],
                self.exp.evaluation.batch_size,
            )
            for i, metrics in zip(members, sums, strict=True):
                replies[where[i]] = metrics_reply(messages[i], metrics)
        return _Batch(replies, time.monotonic() - started)


def _type(message: Message) -> str:
    return str(message.metadata.message_type)
