"""One shard of a vectorised cohort: its clients' data, model and batched training.

A shard is what one process trains at once: in the server's process, or in a
Ray actor per GPU or CPU group (:func:`fedsim.simulation.run_cohort_shards`).
:func:`run_shard` takes a :class:`ShardJob` (which clients, the states they
start from, their learning rates and FedProx weights) and returns their
trained states stacked, with the metrics a ClientApp reports. Each process
keeps the experiment's client data stacked once on its device and one trainer
per architecture, so nothing is rebuilt or re-copied from round to round.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedsim import models, node, tasks
from fedsim._cohort import CohortTrainer, memory_budget
from fedsim._cohort_plan import ClientStore
from fedsim.config import ExperimentConfig
from fedsim.train import derive_seed

__all__ = [
    "CPU_CHUNK_TENSOR_BYTES",
    "ShardJob",
    "ShardResult",
    "auto_chunk",
    "client_store",
    "run_shard",
    "split_evenly",
    "steps_of",
    "template_model",
    "train_shard",
    "trainer_for",
]

Tensors = dict[str, torch.Tensor]

CPU_CHUNK_TENSOR_BYTES = 16 * 2**20
"""On CPU, a chunk's largest stacked tensor (weights or one activation) stays
below this many bytes.

Larger chunks mean fewer batched calls, but element-wise operands that miss
the caches, and blocks past glibc's mmap threshold (32 MB under fedsim's
:mod:`fedsim.malloc` settings) page-fault on every fresh allocation. Measured
on a 2-core EPYC with those settings, 100 clients on 2 threads, the caps
alternated in one process, median seconds per cohort at caps of 4, 8, 12, 16,
24 and 31 MB: ``mlp`` 0.160, 0.118, 0.105, 0.105, 0.108, 0.136; ``cnn`` at 4,
8, 16 and 24 MB: 2.60, 2.33, 2.36, 2.47.
"""


@dataclass(frozen=True)
class ShardJob:
    """The clients one shard trains in one round.

    Attributes
    ----------
    partition_ids : tuple of int
        The clients.
    rounds : tuple of int
        Each client's server round (seeds its data order, as per client).
    states : tuple of dict
        The distinct full state dicts the clients start from.
    state_of : tuple of int
        For each client, the index of its state in ``states``.
    lrs, mus : tuple of float
        Each client's learning rate and FedProx weight.
    max_chunk : int
        Most clients per batched call; 0 sizes chunks to the device memory.
    memory_fraction : float
        Share of the device's free memory a chunk may use.
    """

    partition_ids: tuple[int, ...]
    rounds: tuple[int, ...]
    states: tuple[Tensors, ...]
    state_of: tuple[int, ...]
    lrs: tuple[float, ...]
    mus: tuple[float, ...]
    max_chunk: int = 0
    memory_fraction: float = 0.5


@dataclass(frozen=True)
class ShardResult:
    """Trained states (CPU) and per-client metrics, in the job's client order.

    Attributes
    ----------
    chunks : tuple of dict
        The trained states of each batched chunk, stacked along its clients
        (kept apart: stacking them again would copy every state once more).
    place : tuple of (int, int)
        For each client, its chunk and its row in that chunk.
    train_loss, num_steps, num_examples : tuple
        Each client's metrics.
    """

    chunks: tuple[Tensors, ...]
    place: tuple[tuple[int, int], ...]
    train_loss: tuple[float, ...]
    num_steps: tuple[int, ...]
    num_examples: tuple[int, ...]

    def state(self, client: int) -> Tensors:
        """Client ``client``'s trained state (views into its chunk)."""
        chunk, row = self.place[client]
        return {k: v[row] for k, v in self.chunks[chunk].items()}


def _key(*parts: object) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


_STORES: dict[str, ClientStore] = {}
_TRAINERS: dict[str, CohortTrainer] = {}


def _data_key(exp: ExperimentConfig) -> str:
    return _key(
        exp.dataset.name,
        exp.dataset.options,
        exp.partition.name,
        exp.partition.options,
        exp.num_clients,
        exp.seed,
        exp.evaluation.federated,
        exp.evaluation.local_test_fraction,
    )


def client_store(
    exp: ExperimentConfig, device: torch.device, *, split: str = "train"
) -> ClientStore:
    """Every client's ``train`` (or ``test``) split, stacked once per process."""
    key = _key(_data_key(exp), str(device), split)
    if key not in _STORES:
        if len(_STORES) >= 4:
            _STORES.clear()
        data = {}
        for pid in range(exp.num_clients):
            part = node.node_data(exp, pid)
            data[pid] = (
                (part.x_train, part.y_train)
                if split == "train"
                else (part.x_test, part.y_test)
            )
        _STORES[key] = ClientStore.stack(data, device=device)
    return _STORES[key]


def template_model(
    exp: ExperimentConfig, state: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """The experiment's model at the widths of ``state`` (global RNG untouched)."""
    splits = node.load_dataset(exp)
    with torch.random.fork_rng(devices=[]):
        base = models.build(exp.model.name, **node.model_kwargs(exp, splits))
        return models.fit_to_state(base, state)


def trainer_for(
    exp: ExperimentConfig, state: Mapping[str, torch.Tensor], device: torch.device
) -> CohortTrainer:
    """A cached :class:`CohortTrainer` for the model at the widths of ``state``."""
    shapes = sorted((k, tuple(v.shape), str(v.dtype)) for k, v in state.items())
    key = _key(exp.model.name, exp.model.options, exp.task, exp.client, shapes, device)
    if key not in _TRAINERS:
        if len(_TRAINERS) >= 4:
            _TRAINERS.clear()
        model = template_model(exp, state).to(device)
        _TRAINERS[key] = CohortTrainer(
            model=model,
            task=tasks.build(exp.task.name, **exp.task.options),
            cfg=exp.client,
            proximal=node.proximal_penalty,
        )
    return _TRAINERS[key]


def auto_chunk(
    trainer: CohortTrainer, sample: torch.Tensor, *, memory_fraction: float
) -> int:
    """Clients per batched call that fit the device (and, on CPU, its caches)."""
    device = sample.device
    need = trainer.footprint(sample)
    chunk = max(1, memory_budget(device, memory_fraction) // max(1, need.total))
    if device.type == "cpu":
        chunk = min(chunk, max(1, CPU_CHUNK_TENSOR_BYTES // max(1, need.largest)))
    return int(chunk)


def train_shard(
    trainer: CohortTrainer,
    store: ClientStore,
    job: ShardJob,
    *,
    seed: int,
) -> ShardResult:
    """Train ``job``'s clients with ``trainer`` on ``store`` (see :func:`run_shard`)."""
    device = store.device
    size = len(job.partition_ids)
    states: Tensors = {}
    for key in trainer.keys:
        if len(job.states) == 1:
            single = job.states[0][key].to(device)
            states[key] = single.unsqueeze(0).expand(size, *single.shape)
        else:
            states[key] = torch.stack([job.states[i][key] for i in job.state_of]).to(
                device
            )
    generators = [
        torch.Generator().manual_seed(derive_seed(seed, rnd, pid))
        for rnd, pid in zip(job.rounds, job.partition_ids, strict=True)
    ]
    chunk = job.max_chunk
    if chunk <= 0:
        start = store.spans[job.partition_ids[0]][0]
        sample = store.x[start : start + min(8, store.count(job.partition_ids[0]))]
        chunk = auto_chunk(trainer, sample, memory_fraction=job.memory_fraction)
    pieces = trainer.train_chunks(
        states,
        store,
        list(job.partition_ids),
        generators,
        lr=list(job.lrs),
        mu=list(job.mus),
        max_chunk=chunk,
    )
    place: list[tuple[int, int]] = [(0, 0)] * size
    loss: list[float] = [0.0] * size
    steps: list[int] = [0] * size
    for c, (members, result) in enumerate(pieces):
        chunk_loss = result.train_loss.cpu().tolist()
        chunk_steps = result.num_steps.cpu().tolist()
        for row, client in enumerate(members):
            place[client] = (c, row)
            loss[client] = float(chunk_loss[row])
            steps[client] = int(chunk_steps[row])
    return ShardResult(
        chunks=tuple({k: v.cpu() for k, v in r.state.items()} for _, r in pieces),
        place=tuple(place),
        train_loss=tuple(loss),
        num_steps=tuple(steps),
        num_examples=tuple(store.count(p) for p in job.partition_ids),
    )


def run_shard(exp: ExperimentConfig, job: ShardJob) -> ShardResult:
    """Train one shard of a cohort in this process, on the experiment's device.

    Client ``p`` of round ``r`` draws its batches from
    ``torch.Generator().manual_seed(derive_seed(exp.seed, r, p))`` exactly as
    :func:`fedsim.node.train_client` does, so the result equals per-client
    training to float rounding.
    """
    device = node.resolve_device(exp)
    store = client_store(exp, device)
    trainer = trainer_for(exp, job.states[0], device)
    return train_shard(trainer, store, job, seed=exp.seed)


def split_evenly(steps: Sequence[int], shards: int) -> list[list[int]]:
    """Positions of ``steps`` dealt to ``shards`` groups of similar total work.

    Longest first, each to the least-loaded group; every group keeps its
    positions in ascending order. Empty groups are dropped.
    """
    loads = [0] * max(1, shards)
    groups: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(steps)), key=lambda i: -steps[i]):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += max(1, steps[i])
    return [sorted(g) for g in groups if g]


def steps_of(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of a client with ``num_examples`` examples."""
    return epochs * math.ceil(num_examples / batch_size)
