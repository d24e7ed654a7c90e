"""The only module that talks to ``flwr.simulation`` and Ray.

Flower's simulation engine runs the ServerApp in a thread and the ClientApp on
Ray actors, one actor per ``client_resources`` share of the machine. fedsim
passes the experiment to both apps by closure (``run_simulation`` leaves the
Flower run config empty), gives each client one CPU by default (Flower's
default of two serialises clients on a 2-core machine), keeps Ray's object
store small, mutes Ray's and Flower's console noise unless asked for, and
attaches to an existing Ray cluster when ``simulation.ray_address`` is set.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from fedsim import malloc
from fedsim.config import ExperimentConfig

__all__ = [
    "backend_config",
    "close_cohort_shards",
    "cohort_shard_count",
    "quiet",
    "run_cohort_shards",
    "run_simulation",
]


def quiet(level: str = "ERROR") -> None:
    """Silence Flower's per-round INFO logs and Ray's start-up warnings."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
    logging.getLogger("flwr").setLevel(getattr(logging, level.upper(), logging.ERROR))
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _init_ray(ray: Any, init_args: dict[str, Any]) -> None:
    """``ray.init`` whose processes start with fedsim's malloc settings
    (:func:`fedsim.malloc.environment`: glibc reads them at process start)."""
    ray.init(runtime_env={"env_vars": malloc.environment()}, **init_args)


def backend_config(exp: ExperimentConfig) -> dict[str, Any]:
    """Flower's Ray backend config for ``exp``."""
    sim = exp.simulation
    resources = {
        "num_cpus": sim.client_resources.num_cpus,
        "num_gpus": sim.client_resources.num_gpus,
    }
    init_args: dict[str, Any] = {
        "logging_level": sim.ray_log_level,
        "log_to_driver": sim.ray_log_level.upper() in ("DEBUG", "INFO"),
        "configure_logging": True,
        "include_dashboard": False,  # as Flower starts Ray: no web UI daemon
    }
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    else:
        if sim.ray_num_cpus is not None:
            init_args["num_cpus"] = sim.ray_num_cpus
        if sim.object_store_mb is not None:
            init_args["object_store_memory"] = int(sim.object_store_mb) * 1024 * 1024
    return {"client_resources": resources, "init_args": init_args}


def run_simulation(server_app: Any, client_app: Any, exp: ExperimentConfig) -> None:
    """Run ``server_app`` against ``exp.num_clients`` simulated ClientApps on Ray."""
    quiet(exp.simulation.ray_log_level)
    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    config = backend_config(exp)
    if exp.simulation.ray_address and not ray.is_initialized():
        # Flower only calls ray.init when Ray is not running: attach ourselves.
        _init_ray(ray, config["init_args"])
    # the Ray that Flower starts inherits this process's environment
    os.environ.update(malloc.environment())
    flwr_run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=exp.num_clients,
        backend_config=config,
        verbose_logging=False,
    )


# -- the vectorized engine's cohort shards on Ray ------------------------------
# (fedsim.vectorized calls these; everything Ray-specific of that engine is here)

_SHARDS: dict[str, Any] = {"actors": [], "key": None, "started_ray": False}


class _CohortShardWorker:
    """A Ray actor that trains cohort shards; its data and models stay cached."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))

    def run(self, exp: ExperimentConfig, job: Any) -> Any:
        from fedsim._cohort_shard import run_shard

        return run_shard(exp, job)


def _open_ray(exp: ExperimentConfig) -> tuple[Any, bool]:
    """Ray, initialised for ``exp`` if needed; and whether this call started a
    local Ray (which its caller then shuts down) rather than attaching."""
    quiet(exp.simulation.ray_log_level)
    import ray

    if ray.is_initialized():
        return ray, False
    _init_ray(ray, backend_config(exp)["init_args"])
    return ray, not exp.simulation.ray_address


def _ensure_ray(exp: ExperimentConfig) -> Any:
    ray, started = _open_ray(exp)
    if started:
        _SHARDS["started_ray"] = True
    return ray


def _uses_gpu(exp: ExperimentConfig) -> bool:
    wanted = exp.client.device
    if wanted == "auto":
        import torch

        return bool(torch.cuda.is_available())
    return wanted == "cuda"


def cohort_shard_count(exp: ExperimentConfig) -> int:
    """Shards for the Ray cluster: one per GPU when training on CUDA, else per node."""
    ray = _ensure_ray(exp)
    if _uses_gpu(exp):
        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def run_cohort_shards(
    exp: ExperimentConfig, jobs: list[Any], *, shard_cpus: int = 0
) -> list[Any]:
    """Run each :class:`~fedsim._cohort_shard.ShardJob` on its own Ray actor.

    One actor per shard (kept for the next round while the shard count stays
    the same), reserving one GPU each when training on CUDA and ``shard_cpus``
    CPUs (0: the cluster's CPUs divided among the shards).
    """
    ray = _ensure_ray(exp)
    gpus = 1 if _uses_gpu(exp) else 0
    cpus = shard_cpus or max(
        1, int(ray.cluster_resources().get("CPU", 1)) // max(1, len(jobs))
    )
    key = f"{len(jobs)}:{cpus}:{gpus}"
    if _SHARDS["key"] != key:
        _kill_shard_actors(ray)
        actor = ray.remote(num_cpus=cpus, num_gpus=gpus)(_CohortShardWorker)
        _SHARDS["actors"] = [actor.remote(cpus) for _ in jobs]
        _SHARDS["key"] = key
    refs = [
        worker.run.remote(exp, job)
        for worker, job in zip(_SHARDS["actors"], jobs, strict=True)
    ]
    return list(ray.get(refs))


def _kill_shard_actors(ray: Any) -> None:
    for worker in _SHARDS["actors"]:
        ray.kill(worker)
    _SHARDS["actors"] = []
    _SHARDS["key"] = None


def close_cohort_shards() -> None:
    """Stop the shard actors, and Ray itself if it was started for them."""
    import ray

    if ray.is_initialized():
        _kill_shard_actors(ray)
        if _SHARDS["started_ray"]:
            ray.shutdown()
    _SHARDS["started_ray"] = False


# -- the sharded engine's client workers on Ray ------------------------------
# (fedsim.sharded calls these: one Ray call per worker and round)


class _ClientWorker:
    """A Ray actor running the ClientApp for the nodes of one shard, in turn."""

    def __init__(self, client_app: Any, num_nodes: int, threads: int) -> None:
        import torch

        from fedsim.inprocess import InProcessGrid

        torch.set_num_threads(max(1, threads))
        self.grid = InProcessGrid(client_app, num_nodes)

    def run(self, messages: list[Any], timeout: float | None) -> list[Any]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class ClientWorkers:
    """Handles on the sharded engine's Ray workers."""

    def __init__(self, ray: Any, actors: list[Any], started_ray: bool) -> None:
        self.ray = ray
        self.actors = actors
        self.started_ray = started_ray

    @property
    def count(self) -> int:
        return len(self.actors)

    def run(self, groups: dict[int, list[Any]], timeout: float | None) -> list[Any]:
        """Run each worker's messages (one call per worker); all replies."""
        refs = [self.actors[i].run.remote(msgs, timeout) for i, msgs in groups.items()]
        replies: list[Any] = []
        for part in self.ray.get(refs):
            replies.extend(part)
        return replies

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()


def start_client_workers(exp: ExperimentConfig, client_app: Any) -> ClientWorkers:
    """Start as many client workers as clients fit the Ray cluster at once."""
    ray, started = _open_ray(exp)
    res = exp.simulation.client_resources
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 1) // res.num_cpus)
    if res.num_gpus > 0:
        fits = min(fits, int(total.get("GPU", 0) // res.num_gpus))
    count = max(1, min(fits, exp.num_clients))
    worker = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus)(_ClientWorker)
    from fedsim.node import client_threads

    threads = client_threads(exp)
    actors = [worker.remote(client_app, exp.num_clients, threads) for _ in range(count)]
    return ClientWorkers(ray, actors, started)
