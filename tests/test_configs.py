"""Every config file composes, and its name, file stem and registry key agree."""

from __future__ import annotations

import pytest

import strategies  # noqa: F401
from fedsim import data, models, tasks
from fedsim.config import GROUPS, compose, config_dir, from_dictconfig, group_options
from fedsim.data.partition import PARTITIONS
from fedsim.exceptions import ConfigError
from fedsim.strategy import STRATEGIES

REGISTRIES = {
    "dataset": lambda: data.names(),
    "partition": lambda: PARTITIONS.names(),
    "model": lambda: models.names(),
    "strategy": lambda: STRATEGIES.names(),
    "task": lambda: (tasks.build("classification"), tasks.TASKS.names())[1],
}

CASES = [(g, o) for g in GROUPS if g != "experiment" for o in group_options(g)]


@pytest.mark.parametrize(("group", "option"), CASES)
def test_group_option_composes_and_names_agree(group: str, option: str) -> None:
    extra = ["dataset.path=/tmp/saved"] if (group, option) == ("dataset", "hf") else []
    cfg = compose([f"{group}={option}", *extra])
    exp = from_dictconfig(cfg)
    node = getattr(exp, group)
    assert node.name == option, f"configs/{group}/{option}.yaml has name {node.name!r}"
    if group in REGISTRIES:
        assert option in REGISTRIES[group](), f"{group} {option!r} is not registered"


@pytest.mark.parametrize("name", group_options("experiment"))
def test_experiment_files_compose(name: str) -> None:
    exp = from_dictconfig(compose([f"experiment={name}"]))
    assert exp.experiment == name


def test_every_registered_component_has_a_config_file() -> None:
    for group, names in REGISTRIES.items():
        missing = set(names()) - set(group_options(group))
        assert not missing, f"{group} without configs/{group}/*.yaml: {sorted(missing)}"


def test_defaults_are_the_documented_main_job() -> None:
    exp = from_dictconfig(compose([]))
    assert (exp.dataset.name, exp.model.name, exp.strategy.name) == (
        "mnist5k",
        "mlp",
        "fedavg",
    )
    assert exp.num_clients == 10 and exp.partition.name == "dirichlet"
    assert exp.simulation.client_resources.num_cpus == 1


def test_unknown_option_is_one_sentence_with_choices() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown strategy 'fedmagic'; choose one of: .*fedavg"
    ):
        compose(["strategy=fedmagic"])
    with pytest.raises(ConfigError, match="unknown model 'x'"):
        compose(["model=mlp,x"])


def test_a_missing_mandatory_value_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dataset.path must be set for dataset 'hf'"):
        from_dictconfig(compose(["dataset=hf"]))


def test_a_misspelt_typed_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="lrr"):
        compose(["client.lrr=0.1"])


def test_out_of_range_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="num_clients=0"):
        from_dictconfig(compose(["num_clients=0"]))
    with pytest.raises(ConfigError, match=r"fraction_train=1\.5"):
        from_dictconfig(compose(["fraction_train=1.5"]))


def test_config_dir_is_found() -> None:
    assert (config_dir() / "config.yaml").is_file()
