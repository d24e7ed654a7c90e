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

from fedsim.config import ExperimentConfig

__all__ = ["backend_config", "quiet", "run_simulation"]


def quiet(level: str = "ERROR") -> None:
    """Silence Flower's per-round INFO logs and Ray's start-up warnings."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
    logging.getLogger("flwr").setLevel(getattr(logging, level.upper(), logging.ERROR))
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    warnings.filterwarnings("ignore", category=DeprecationWarning)


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
        ray.init(**config["init_args"])
    flwr_run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=exp.num_clients,
        backend_config=config,
        verbose_logging=False,
    )
