"""A device's own data (``data-path``): layouts, contents, identity, and the
ClientApp wiring, run in-process with device node configs (no Flower runtime)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clients.client_app import build_client_app
from fedsim.config import Component, ExperimentConfig, compose, from_dictconfig
from fedsim.data import load
from fedsim.data.mnist import MEAN, STD
from fedsim.device_data import data_identity, device_dataset, device_node_data
from fedsim.exceptions import ConfigError, DataError
from fedsim.inprocess import InProcessGrid
from fedsim.results import Results
from fedsim.runner import open_results
from fedsim.server import ServerLoop
from fedsim.server_app import prepare
from tests.deploy.datafiles import (
    device_folders,
    digit_bytes,
    write_idx,
    write_mnist_folder,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return device_folders(tmp_path_factory.mktemp("data"), 2)


def _exp(server: Path, *extra: str) -> ExperimentConfig:
    return from_dictconfig(
        compose(
            [
                "dataset=mnist",
                f"dataset.data_dir={server}",
                "partition=iid",
                "model.hidden=[16]",
                "num_clients=2",
                "num_rounds=2",
                "simulation.engine=inprocess",
                "client.lr=0.1",
                *extra,
            ]
        )
    )


def _device_share(i: int, num_devices: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Indices of device ``i``'s train and test digits (as datafiles deals them)."""
    share = np.arange(digit_bytes()[1].shape[0])[300 + i :: num_devices]
    return share[60:], share[:60]


def test_every_data_path_form_reaches_the_loaders_data_dir(tmp_path: Path) -> None:
    images, _ = digit_bytes()
    root = tmp_path / "plain"
    folder = write_mnist_folder(root, np.arange(50), np.arange(50, 60))
    tv = tmp_path / "torchvision"
    write_mnist_folder(tv, np.arange(50), np.arange(50, 60), layout="MNIST/raw")
    dataset = Component("mnist", {"data_dir": "data", "download": True})
    for given, expected in [
        (root, root),
        (folder, root),
        (folder / "train-labels-idx1-ubyte", root),
        (tv, tv),
        (tv / "MNIST" / "raw", tv),
    ]:
        resolved = device_dataset(dataset, str(given))
        assert resolved.options == {"data_dir": str(expected), "download": False}
    reference = load("mnist", data_dir=str(root)).train.x
    loaded = load("mnist", **device_dataset(dataset, str(tv / "MNIST" / "raw")).options)
    assert torch.equal(loaded.train.x, reference)
    assert reference.shape == (50, 1, *images.shape[1:])


def test_hf_data_path_becomes_the_loaders_path(tmp_path: Path) -> None:
    saved = tmp_path / "my_ds"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")
    dataset = Component("hf", {"path": "???", "image_key": "img", "seed": 3})
    for given in (saved, saved / "dataset_dict.json"):
        resolved = device_dataset(dataset, str(given))
        assert resolved.options == {
            "path": str(saved),
            "image_key": "img",
            "seed": 3,
            "download": False,
        }


def test_a_bundled_dataset_or_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'digits' is not read from files.*mnist"):
        device_dataset(Component("digits", {}), str(tmp_path))
    with pytest.raises(DataError, match="does not exist on this device"):
        device_dataset(Component("mnist", {}), str(tmp_path / "nowhere"))


def test_the_device_trains_on_its_whole_train_split(
    folders: tuple[Path, list[Path]],
) -> None:
    server, devices = folders
    images, labels = digit_bytes()
    train_idx, test_idx = _device_share(1)
    exp = _exp(server)
    local, node = device_node_data(exp, str(devices[1]))
    expected = (images[train_idx].astype(np.float32) / 255.0 - MEAN) / STD
    assert torch.allclose(node.x_train[:, 0], torch.from_numpy(expected), atol=1e-5)
    assert node.y_train.tolist() == labels[train_idx].tolist()
    assert node.x_test.shape[0] == 0  # no federated evaluation: nothing held out
    assert local.dataset.options["data_dir"] == str(devices[1])
    assert exp.dataset.options["data_dir"] == str(server)  # the server's is untouched
    _, evaluated = device_node_data(
        _exp(server, "evaluation=federated"), str(devices[1])
    )
    assert evaluated.y_test.tolist() == labels[test_idx].tolist()
    assert torch.equal(evaluated.x_train, node.x_train)


def test_identity_is_stable_follows_the_data_and_yields_to_partition_id(
    folders: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    server, devices = folders
    exp = _exp(server)
    ids = [device_node_data(exp, str(d))[1].partition_id for d in devices]
    assert ids[0] != ids[1] and all(0 <= i < 2**31 for i in ids)
    copy, edited = tmp_path / "copy", tmp_path / "edited"
    shutil.copytree(devices[0], copy)
    shutil.copytree(devices[0], edited)
    assert device_node_data(exp, str(copy))[1].partition_id == ids[0]
    changed = digit_bytes()[1][_device_share(0)[0]].copy()
    changed[0] = (changed[0] + 1) % 10
    write_idx(edited / "mnist" / "train-labels-idx1-ubyte", changed)
    assert device_node_data(exp, str(edited))[1].partition_id != ids[0]
    train = load("mnist", data_dir=str(devices[0])).train
    assert data_identity(train) == ids[0]
    assert device_node_data(exp, str(devices[0]), partition_id=7)[1].partition_id == 7
    with pytest.raises(ConfigError, match="partition-id must be >= 0, got -1"):
        device_node_data(exp, str(devices[0]), partition_id=-1)


def _federate(
    tmp_path: Path, exp: ExperimentConfig, node_configs: list[dict[str, Any]]
) -> Results:
    """Run ``exp`` in-process with one ClientApp context per node config."""
    ready = prepare(exp)
    results = open_results(exp, ready.splits)
    grid = InProcessGrid(build_client_app(exp), len(node_configs))
    for context, node_config in zip(grid.contexts.values(), node_configs, strict=True):
        context.node_config = node_config
    loop = ServerLoop(
        exp, ready.strategy, ready.splits, ready.model, results, progress=None
    )
    return loop.run(grid)


def test_devices_with_their_own_data_federate(
    folders: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    server, devices = folders
    exp = _exp(server, f"output_dir={tmp_path / 'run'}")
    configs = [{"data-path": str(d)} for d in devices]
    results = _federate(tmp_path, exp, configs)
    ids = sorted(device_node_data(exp, str(d))[1].partition_id for d in devices)
    assert [r["round"] for r in results.rounds] == [0, 1, 2]
    for record in results.rounds[1:]:
        assert record["clients"] == ids
        assert record["num_replies"] == 2 and record["num_failures"] == 0
    sizes = {c["partition_id"]: c["num_examples"] for c in results.extra["clients"]}
    by_id = {
        device_node_data(exp, str(d))[1].partition_id: i for i, d in enumerate(devices)
    }
    for pid, size in sizes.items():
        assert size == len(_device_share(by_id[pid])[0])
    assert (
        results.rounds[-1]["test_accuracy"] > results.rounds[0]["test_accuracy"] + 0.2
    )


def test_partition_ids_name_the_devices_when_given(
    folders: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    server, devices = folders
    exp = _exp(server, "num_rounds=1", f"output_dir={tmp_path / 'run'}")
    configs = [
        {"data-path": str(d), "partition-id": 5 - i} for i, d in enumerate(devices)
    ]
    results = _federate(tmp_path, exp, configs)
    assert results.rounds[1]["clients"] == [4, 5]


def test_twin_devices_or_a_bundled_dataset_fail_before_round_one(
    folders: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    server, devices = folders
    exp = _exp(server, "num_rounds=1", f"output_dir={tmp_path / 'twins'}")
    twins = [{"data-path": str(devices[0])}, {"data-path": str(devices[0])}]
    with pytest.raises(ConfigError, match="two nodes claim partition-id"):
        _federate(tmp_path, exp, twins)
    bundled = from_dictconfig(
        compose(
            [
                "dataset=digits",
                "model.hidden=[16]",
                "num_clients=2",
                "num_rounds=1",
                f"output_dir={tmp_path / 'digits'}",
            ]
        )
    )
    configs = [{"data-path": str(d)} for d in devices]
    with pytest.raises(ConfigError, match="'digits' is not read from files"):
        _federate(tmp_path, bundled, configs)
