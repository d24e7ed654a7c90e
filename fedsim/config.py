"""Typed, frozen experiment configuration and its validation.

Everything below the composition roots receives an :class:`ExperimentConfig`
(frozen dataclasses), never a Hydra ``DictConfig``. Groups whose options differ
per component (dataset, partition, model, strategy, task) are a
:class:`Component`: a registry ``name`` plus keyword options that the
component's factory validates; groups with one fixed set of fields (client,
simulation, evaluation) are dataclasses here, which :mod:`fedsim.compose`
registers as schemas with Hydra's ConfigStore, so a misspelt key fails when the
config is composed. :func:`validate` does the range checks that need no data.

Building an :class:`ExperimentConfig` (from ``configs/`` and overrides, a Flower
run config or a ``results.json``) lives in :mod:`fedsim.compose`; its public
functions are re-exported here, so ``from fedsim.config import compose`` works.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedsim.exceptions import ConfigError

__all__ = [
    "GROUPS",
    "ClientConfig",
    "Component",
    "EvaluationConfig",
    "ExperimentConfig",
    "FaultsConfig",
    "PruningConfig",
    "ResourcesConfig",
    "SimulationConfig",
    "VectorizedConfig",
    "check_group_choices",
    "compose",
    "config_dir",
    "experiment_from_dict",
    "experiment_from_run_config",
    "from_dictconfig",
    "group_options",
    "overrides_from_run_config",
    "validate",
]

# Simulation engines: Flower's Ray runtime (one Ray call per client message),
# Ray workers called once per round each (fedsim.sharded), all clients in the
# server process (no Ray; debugging, tests), and batched cohorts.
ENGINES = ("flower", "sharded", "inprocess", "vectorized")

# Config groups, in the order `fedsim run --help` lists them.
GROUPS = (
    "dataset",
    "partition",
    "model",
    "strategy",
    "client",
    "task",
    "simulation",
    "evaluation",
    "experiment",
)


@dataclass(frozen=True)
class Component:
    """A registered component chosen by name, with its factory's options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


PRUNING = ("none", "aofp")
PRUNING_SIDES = ("client", "server")


@dataclass(frozen=True)
class PruningConfig:
    """AOFP filter pruning during federated training (``client.pruning.*``).

    See :mod:`fedsim.pruning.aofp` for the algorithm and
    :mod:`fedsim.pruning.federated` for the two sides.
    """

    name: str = "none"  # "none" or "aofp"
    side: str = "client"  # "client": each client prunes; "server": the global model
    k: int = 50  # local steps per decision cycle (client side)
    theta: float = 0.05  # prune a candidate half when its mean damage is below theta
    warmup: int = 20  # steps (client side) or rounds (server side) before searching
    target_flops: float = 0.5  # stop once FLOPs <= target_flops x the initial model's
    layers: tuple[str, ...] = ()  # groups to prune (spec names); empty = all prunable

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(str(v) for v in self.layers))


@dataclass(frozen=True)
class ClientConfig:
    """Local training recipe of every client (``configs/client/*.yaml``)."""

    name: str = "sgd"
    optimizer: str = "sgd"  # "sgd" or "adam"
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam only
    eps: float = 1e-8  # Adam only
    amsgrad: bool = False  # Adam only
    epochs: int = 1  # local epochs per round
    batch_size: int = 32
    lr_decay: float = 1.0  # lr is multiplied by lr_decay ** (round - 1)
    proximal_mu: float = 0.0  # FedProx term; the fedprox strategy sends its own
    device: str = "cpu"  # "cpu", "cuda" or "auto" (cuda when available)
    num_threads: int = 0  # torch threads per client; 0 = the client's CPU share
    pruning: PruningConfig = field(default_factory=PruningConfig)


@dataclass(frozen=True)
class ResourcesConfig:
    """Ray resources reserved by each simulated client."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class FaultsConfig:
    """Fault injection (fractions of the sampled clients per round)."""

    crash: float = 0.0  # the client raises
    straggle: float = 0.0  # the client sleeps straggle_seconds before replying
    straggle_seconds: float = 30.0
    corrupt: float = 0.0  # the client returns NaN weights


@dataclass(frozen=True)
class VectorizedConfig:
    """How ``simulation.engine=vectorized`` shards and chunks a cohort."""

    shards: int = 0  # shards per round; 0 = one per GPU / Ray node, else 1
    shard_cpus: int = 0  # torch threads per shard; 0 = the CPUs clients would share
    max_chunk: int = 0  # most clients per batched call; 0 = fit device memory
    memory_fraction: float = 0.5  # share of free device memory one chunk may use

    def __post_init__(self) -> None:
        for name in ("shards", "shard_cpus", "max_chunk"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(
                    f"simulation.vectorized.{name}={value} is not allowed; it must "
                    "be 0 (automatic) or positive"
                )
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(
                f"simulation.vectorized.memory_fraction={self.memory_fraction} is "
                "not allowed; it must be in (0, 1]"
            )


@dataclass(frozen=True)
class SimulationConfig:
    """How clients are simulated (``configs/simulation/*.yaml``)."""

    name: str = "local"
    engine: str = "flower"  # flower | sharded | inprocess | vectorized
    client_resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray_address: str | None = None  # "auto" or host:port attaches to a cluster
    ray_num_cpus: int | None = None  # CPUs of a locally started Ray; None = all
    object_store_mb: int | None = 256  # Ray object store of a local start
    ray_log_level: str = "ERROR"
    round_timeout: float | None = None  # seconds to wait for replies per round
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    vectorized: VectorizedConfig = field(default_factory=VectorizedConfig)


@dataclass(frozen=True)
class EvaluationConfig:
    """Server-side and federated evaluation (``configs/evaluation/*.yaml``)."""

    name: str = "default"
    every: int = 1  # evaluate the global model every `every` rounds (and round 0)
    batch_size: int = 1000
    federated: bool = False  # also evaluate on clients' local held-out splits
    local_test_fraction: float = 0.2  # share of each client's data held out for it
    per_class: bool = False  # also record each class's and the worst class's accuracy


@dataclass(frozen=True)
class ExperimentConfig:
    """One fully resolved experiment."""

    seed: int
    num_clients: int
    num_rounds: int
    fraction_train: float
    fraction_evaluate: float
    dataset: Component
    partition: Component
    model: Component
    strategy: Component
    task: Component
    client: ClientConfig
    simulation: SimulationConfig
    evaluation: EvaluationConfig
    output_dir: str | None = None
    resume: str | None = None
    experiment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for ``results.json``)."""
        return dataclasses.asdict(self)


def validate(exp: ExperimentConfig) -> None:
    """Range checks that need no data (the rest happen where the data is).

    Parameters
    ----------
    exp : ExperimentConfig
        The experiment to check.

    Raises
    ------
    ConfigError
        Naming the first run-level, client, pruning, simulation or evaluation
        value out of range and the values allowed.
    """
    _check_range("num_clients", exp.num_clients, exp.num_clients >= 1, "at least 1")
    _check_range("num_rounds", exp.num_rounds, exp.num_rounds >= 1, "at least 1")
    for key in ("fraction_train", "fraction_evaluate"):
        value = getattr(exp, key)
        _check_range(key, value, 0.0 < value <= 1.0, "in (0, 1]")
    c = exp.client
    _check_range(
        "client.optimizer",
        c.optimizer,
        c.optimizer in ("sgd", "adam"),
        "one of: sgd, adam",
    )
    _check_range("client.lr", c.lr, c.lr > 0, "positive")
    _check_range("client.epochs", c.epochs, c.epochs >= 1, "at least 1")
    _check_range("client.batch_size", c.batch_size, c.batch_size >= 1, "at least 1")
    _check_range(
        "client.device",
        c.device,
        c.device in ("cpu", "cuda", "auto"),
        "one of: cpu, cuda, auto",
    )
    _validate_pruning(c.pruning)
    s = exp.simulation
    _check_range(
        "simulation.engine",
        s.engine,
        s.engine in ENGINES,
        f"one of: {', '.join(ENGINES)}",
    )
    r = s.client_resources
    _check_range(
        "simulation.client_resources.num_cpus", r.num_cpus, r.num_cpus > 0, "positive"
    )
    _check_range(
        "simulation.client_resources.num_gpus",
        r.num_gpus,
        r.num_gpus >= 0,
        "zero or positive",
    )
    f = s.faults
    for key in ("crash", "straggle", "corrupt"):
        value = getattr(f, key)
        _check_range(
            f"simulation.faults.{key}", value, 0.0 <= value <= 1.0, "in [0, 1]"
        )
    total = f.crash + f.straggle + f.corrupt
    _check_range(
        "the sum of simulation.faults fractions", total, total <= 1.0, "at most 1"
    )
    if s.round_timeout is not None:
        _check_range(
            "simulation.round_timeout",
            s.round_timeout,
            s.round_timeout > 0,
            "positive (or null for no limit)",
        )
    e = exp.evaluation
    _check_range("evaluation.every", e.every, e.every >= 1, "at least 1")
    if e.per_class and exp.task.name != "classification":
        raise ConfigError(
            f"evaluation.per_class=true needs task=classification, not "
            f"task={exp.task.name}"
        )
    _check_range(
        "evaluation.local_test_fraction",
        e.local_test_fraction,
        0.0 <= e.local_test_fraction < 1.0,
        "in [0, 1)",
    )


def _validate_pruning(p: PruningConfig) -> None:
    _check_range(
        "client.pruning.name",
        p.name,
        p.name in PRUNING,
        f"one of: {', '.join(PRUNING)}",
    )
    _check_range(
        "client.pruning.side",
        p.side,
        p.side in PRUNING_SIDES,
        f"one of: {', '.join(PRUNING_SIDES)}",
    )
    _check_range("client.pruning.k", p.k, p.k >= 1, "at least 1")
    _check_range("client.pruning.theta", p.theta, p.theta > 0, "positive")
    _check_range("client.pruning.warmup", p.warmup, p.warmup >= 0, "zero or more")
    _check_range(
        "client.pruning.target_flops",
        p.target_flops,
        0.0 < p.target_flops <= 1.0,
        "in (0, 1]",
    )


def _check_range(what: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{what}={value!r} is not allowed; it must be {allowed}")


# Re-exports of fedsim.compose, which builds an ExperimentConfig from Hydra
# configs, Flower run configs and stored dicts. Imported last: fedsim.compose
# imports the dataclasses and validate above (and does so itself only after its
# own definitions), so either module can be imported first.
from fedsim.compose import (  # noqa: E402
    check_group_choices,
    compose,
    config_dir,
    experiment_from_dict,
    experiment_from_run_config,
    from_dictconfig,
    group_options,
    overrides_from_run_config,
)
