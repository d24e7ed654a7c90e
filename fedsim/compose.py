"""Building an :class:`~fedsim.config.ExperimentConfig` from configs and dicts.

Hydra composes ``configs/config.yaml`` with the user's overrides
(:func:`compose`, which first refuses group options that have no YAML file);
:func:`from_dictconfig` turns the result into frozen dataclasses and validates
them. A Flower run config becomes overrides (:func:`overrides_from_run_config`)
and then an experiment (:func:`experiment_from_run_config`), and the dict a
``results.json`` stores becomes an experiment again
(:func:`experiment_from_dict`). The client, simulation and evaluation
dataclasses are registered here as Hydra schemas, so composing fails on a
misspelt key.

:mod:`fedsim.config` re-exports the public functions, and is where the
dataclasses and their validation live.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from fedsim.exceptions import ConfigError

__all__ = [
    "check_group_choices",
    "compose",
    "config_dir",
    "experiment_from_dict",
    "experiment_from_run_config",
    "from_dictconfig",
    "group_options",
    "overrides_from_run_config",
]


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


def config_dir() -> Path:
    """The ``configs/`` folder (``FEDSIM_CONFIG_DIR`` overrides it).

    Returns
    -------
    Path
        The first folder holding a ``config.yaml`` among ``$FEDSIM_CONFIG_DIR``,
        the ``configs/`` next to the ``fedsim`` package and ``./configs``.

    Raises
    ------
    ConfigError
        If none of them does.
    """
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
    """Names of the YAML files of one config group.

    Parameters
    ----------
    group : str
        A config group, e.g. ``"strategy"`` (see :data:`fedsim.config.GROUPS`).

    Returns
    -------
    list of str
        The option names (file stems), sorted; empty for an unknown group.
    """
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


def from_dictconfig(cfg: DictConfig) -> ExperimentConfig:
    """Convert a composed Hydra config into an :class:`ExperimentConfig`.

    Parameters
    ----------
    cfg : DictConfig
        A config composed from ``configs/config.yaml`` (see :func:`compose`).

    Returns
    -------
    ExperimentConfig
        The validated experiment (see :func:`fedsim.config.validate`).

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


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/config.yaml`` with Hydra overrides, outside ``hydra.main``.

    Parameters
    ----------
    overrides : sequence of str
        Hydra overrides such as ``"strategy=fedprox"`` or ``"client.lr=0.01"``.

    Returns
    -------
    DictConfig
        The composed config (convert it with :func:`from_dictconfig`).

    Raises
    ------
    ConfigError
        For overrides that do not parse or that Hydra refuses (an unknown group
        option or key, a value of the wrong type), reported as one sentence
        instead of Hydra's multi-line error.
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

    Parameters
    ----------
    overrides : iterable of str
        Hydra overrides; sweeps (``strategy=fedavg,fedprox``) are checked value
        by value.

    Raises
    ------
    ConfigError
        If the overrides do not parse, or name an option of a group in
        :data:`fedsim.config.GROUPS` with no YAML file (the sentence lists the
        choices).
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

    Parameters
    ----------
    run_config : mapping of str to Any
        The Flower run config.

    Returns
    -------
    list of str
        The overrides, keys in sorted order; booleans written ``true`` and
        ``false``.
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

    Parameters
    ----------
    run_config : mapping of str to Any
        The Flower run config (see :func:`overrides_from_run_config`).

    Returns
    -------
    ExperimentConfig
        Cached per process under the run config's keys and the ``repr`` of its
        values: the same object for the same run config.

    Raises
    ------
    ConfigError
        For a bad override or a value out of range.
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
    """The :class:`ExperimentConfig` stored in a ``results.json`` (``to_dict``).

    Parameters
    ----------
    data : mapping of str to Any
        The output of :meth:`ExperimentConfig.to_dict`, e.g. read back from JSON
        (lists where the dataclasses hold tuples); a missing key of a field with
        a default keeps the default.

    Returns
    -------
    ExperimentConfig
        The validated experiment.

    Raises
    ------
    ConfigError
        For a value out of range.
    """
    exp = _from_data(ExperimentConfig, dict(data))
    assert isinstance(exp, ExperimentConfig)
    validate(exp)
    return exp


# Imported after this module's definitions: fedsim.config imports the public
# functions above when it is imported first, and these names when this module
# is imported first, so neither import meets a half-defined module.
from fedsim.config import (  # noqa: E402
    GROUPS,
    ClientConfig,
    Component,
    EvaluationConfig,
    ExperimentConfig,
    SimulationConfig,
    validate,
)

cs = ConfigStore.instance()
cs.store(group="client", name="base_client", node=_schema(ClientConfig))
cs.store(group="simulation", name="base_simulation", node=_schema(SimulationConfig))
cs.store(group="evaluation", name="base_evaluation", node=_schema(EvaluationConfig))
