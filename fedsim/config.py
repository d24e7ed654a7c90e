"""Typed, frozen experiment configuration and its composition from ``configs/``.

Hydra composes ``configs/config.yaml`` with the user's overrides; everything
below this module receives an :class:`ExperimentConfig` (frozen dataclasses),
never a ``DictConfig``. Groups whose options differ per component (dataset,
partition, model, strategy, task) are a :class:`Component`: a registry ``name``
plus keyword options that the component's factory validates; groups with one
fixed set of fields (client, simulation, evaluation) have a schema registered
with Hydra's ConfigStore, so a misspelt key fails when the config is composed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

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
    "compose",
    "config_dir",
    "experiment_from_dict",
    "experiment_from_run_config",
    "from_dictconfig",
    "group_options",
    "overrides_from_run_config",
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


def _schema(cls: type) -> DictConfig:
    """A Hydra schema node for a frozen dataclass (writable while composing)."""
    node = OmegaConf.structured(cls)
    _writable(node)
    return node


def _writable(node: DictConfig) -> None:
    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(str(key))
        if isinstance(child, DictConfig):
            _writable(child)


cs = ConfigStore.instance()
cs.store(group="client", name="base_client", node=_schema(ClientConfig))
cs.store(group="simulation", name="base_simulation", node=_schema(SimulationConfig))
cs.store(group="evaluation", name="base_evaluation", node=_schema(EvaluationConfig))


def config_dir() -> Path:
    """The ``configs/`` folder (``FEDSIM_CONFIG_DIR`` overrides it)."""
    env = os.environ.get("FEDSIM_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "configs", Path("configs")]
    for path in candidates:
        if (path / "config.yaml").is_file():
            return path.resolve()
    raise ConfigError(
        "cannot find fedsim's configs/ folder; set FEDSIM_CONFIG_DIR to its path"
    )


def group_options(group: str) -> list[str]:
    """Names of the YAML files of one config group."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    return value


def _component(cfg: DictConfig, group: str) -> Component:
    node = cfg.get(group)
    if node is None or "name" not in node:
        raise ConfigError(f"config group {group!r} needs a name")
    from omegaconf.errors import MissingMandatoryValue

    try:
        data = _plain(node)
    except MissingMandatoryValue as err:
        key = str(getattr(err, "full_key", "") or "a value")
        raise ConfigError(
            f"{key} must be set for {group} {node.get('name')!r} "
            f"(add {key}=... to the command)"
        ) from None
    name = str(data.pop("name"))
    return Component(name=name, options=data)


def _check_range(what: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{what}={value!r} is not allowed; it must be {allowed}")


def from_dictconfig(cfg: DictConfig) -> ExperimentConfig:
    """Convert a composed Hydra config into an :class:`ExperimentConfig`.

    Raises
    ------
    ConfigError
        For a missing group or a run-level value out of range.
    """
    client = OmegaConf.to_object(cfg.client)
    simulation = OmegaConf.to_object(cfg.simulation)
    evaluation = OmegaConf.to_object(cfg.evaluation)
    assert isinstance(client, ClientConfig)
    assert isinstance(simulation, SimulationConfig)
    assert isinstance(evaluation, EvaluationConfig)
    exp = ExperimentConfig(
        seed=int(cfg.seed),
        num_clients=int(cfg.num_clients),
        num_rounds=int(cfg.num_rounds),
        fraction_train=float(cfg.fraction_train),
        fraction_evaluate=float(cfg.fraction_evaluate),
        dataset=_component(cfg, "dataset"),
        partition=_component(cfg, "partition"),
        model=_component(cfg, "model"),
        strategy=_component(cfg, "strategy"),
        task=_component(cfg, "task"),
        client=dataclasses.replace(client, betas=tuple(client.betas)),  # type: ignore[arg-type]
        simulation=simulation,
        evaluation=evaluation,
        output_dir=None if cfg.get("output_dir") is None else str(cfg.output_dir),
        resume=None if cfg.get("resume") is None else str(cfg.resume),
        experiment=None
        if cfg.get("experiment_name") is None
        else str(cfg.experiment_name),
    )
    validate(exp)
    return exp


def validate(exp: ExperimentConfig) -> None:
    """Range checks that need no data (the rest happen where the data is)."""
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


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with Hydra overrides, outside ``hydra.main``.

    Unknown group options and keys are reported as one :class:`ConfigError`
    sentence instead of Hydra's multi-line error.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    check_group_choices(overrides)
    try:
        with initialize_config_dir(str(config_dir()), version_base=None):
            return hydra_compose("config", overrides=list(overrides))
    except (MissingConfigException, ConfigCompositionException) as err:
        raise ConfigError(_first_sentence(err)) from None
    except OmegaConfBaseException as err:
        raise ConfigError(_first_sentence(err)) from None


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    cause = err.__cause__
    if cause is not None and str(cause):
        text = " ".join(str(cause).split())
    return text.split(" full_key:")[0].split("\n")[0]


def check_group_choices(overrides: Iterable[str]) -> None:
    """Refuse ``group=option`` overrides naming an option with no YAML file.

    Sweeps (``strategy=fedavg,fedprox``) are checked value by value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # Hydra's parser raises its own error types
        raise ConfigError(
            f"cannot parse the overrides: {_first_sentence(err)}"
        ) from None
    for ov in parsed:
        key = ov.key_or_group.lstrip("+~")
        if key not in GROUPS or ov.is_delete():
            continue
        values = (
            [str(v) for v in ov.sweep_string_iterator()]
            if ov.is_sweep_override()
            else [str(ov.value())]
        )
        choices = group_options(key)
        for value in values:
            if value not in choices:
                raise ConfigError(
                    f"unknown {key} {value!r}; choose one of: {', '.join(choices)}"
                )


def overrides_from_run_config(run_config: Mapping[str, Any]) -> list[str]:
    """Hydra overrides from a Flower run config (``[tool.flwr.app.config]``).

    The key ``overrides`` holds a space-separated override string; every other
    key ``k`` with value ``v`` becomes ``k=v``. So ``flwr run . --run-config
    "num_rounds=5 strategy='fedprox'"`` means ``fedsim run num_rounds=5
    strategy=fedprox``.
    """
    out: list[str] = []
    for key, value in sorted(run_config.items()):
        if key == "overrides":
            out += shlex.split(str(value))
        elif isinstance(value, bool):
            out.append(f"{key}={str(value).lower()}")
        else:
            out.append(f"{key}={value}")
    return out


_RUN_CONFIG_CACHE: dict[tuple[tuple[str, str], ...], ExperimentConfig] = {}


def experiment_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment a Flower run config describes (cached per process).

    Both the ServerApp and the ClientApp call this under ``flwr run`` and in
    deployment, so they agree on the experiment without any config in messages.
    """
    key = tuple(sorted((str(k), repr(v)) for k, v in run_config.items()))
    if key not in _RUN_CONFIG_CACHE:
        _RUN_CONFIG_CACHE[key] = from_dictconfig(
            compose(overrides_from_run_config(run_config))
        )
    return _RUN_CONFIG_CACHE[key]


def _from_data(cls: Any, data: Any) -> Any:
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output."""
    import typing

    if not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _from_data(hint, value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)  # type: ignore[operator]


def experiment_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """The :class:`ExperimentConfig` stored in a ``results.json`` (``to_dict``)."""
    exp = _from_data(ExperimentConfig, dict(data))
    assert isinstance(exp, ExperimentConfig)
    validate(exp)
    return exp
