"""fedsim on a real Flower deployment: a SuperLink with TLS and SuperNode
authentication, SuperNodes with their own data folders, ``flwr run``.

Every process is real and runs on 127.0.0.1 with the commands ``fedsim certs``
prints; the ``federation`` fixture stops all of them, also when a test fails.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedsim.certs import create
from fedsim.data import load
from fedsim.device_data import data_identity
from tests.deploy.datafiles import device_folders
from tests.deploy.federation import Federation, kill_tree

pytestmark = pytest.mark.deploy

RUN_TIMEOUT = 300


def _run_config(server_data: Path, *overrides: str) -> str:
    """Two rounds on the server's copy of the data; devices bring their own."""
    base = ["model.hidden=[16]", f"dataset.data_dir={server_data}", "client.lr=0.1"]
    extra = " ".join([*base, *overrides])
    return (
        "dataset='mnist' partition='iid' num_clients=2 num_rounds=2 "
        f"overrides='{extra}'"
    )


def _finish(fed: Federation, run: subprocess.Popen[bytes]) -> None:
    try:
        code = run.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"flwr run did not finish in {RUN_TIMEOUT} s:\n{fed.tail('flwr-run')}"
        )
    assert code == 0, fed.tail("flwr-run")


def _results(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_devices_with_their_own_data_run_a_federated_experiment(
    federation: Federation, tmp_path: Path
) -> None:
    fed = federation
    server_data, devices = device_folders(tmp_path, 2)
    fed.start_superlink()
    fed.register(0, 1)
    for i, folder in enumerate(devices):
        # no partition-id: each device is known by a number derived from its data
        fed.start_supernode(i, f'data-path="{folder}"')
    _finish(fed, fed.run(_run_config(server_data)))

    # no output_dir: results land in outputs/ of the SuperLink's working folder
    found = sorted(fed.server_dir.glob("outputs/*/*/results.json"))
    assert len(found) == 1, fed.tail("superlink")
    data = _results(found[0])
    assert data["status"] == "completed"
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    device_ids = sorted(
        data_identity(load("mnist", data_dir=str(d)).train) for d in devices
    )
    for record in data["rounds"][1:]:
        assert record["clients"] == device_ids
        assert record["num_replies"] == 2
        assert record["num_failures"] == record["num_timeouts"] == 0
    assert {c["partition_id"] for c in data["clients"]} == set(device_ids)
    first, last = data["rounds"][0], data["rounds"][-1]
    assert last["test_accuracy"] > first["test_accuracy"] + 0.2
    for name in ("metrics.csv", "accuracy.png"):
        assert (found[0].parent / name).is_file()


def test_unregistered_keys_and_unknown_certificates_are_refused(
    federation: Federation, tmp_path: Path
) -> None:
    fed = federation
    _, devices = device_folders(tmp_path, 1)
    node_config = f'data-path="{devices[0]}"'
    fed.start_superlink()
    good, no_ca = fed.register(0, 2)
    stranger_key = create(tmp_path / "stranger", num_nodes=1).node_key(0)
    accepted = fed.start_supernode(0, node_config)
    unregistered = fed.start_supernode(
        1, node_config, name="unregistered", key=stranger_key
    )
    without_ca = fed.start_supernode(2, node_config, name="without-ca", with_ca=False)
    for proc, name in ((unregistered, "unregistered"), (without_ca, "without-ca")):
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {name} SuperNode kept running:\n{fed.tail(name)}")
        assert code != 0, fed.tail(name)
    assert "Failed to activate SuperNode" in fed.log("unregistered").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in fed.log("without-ca").read_text()
    # the same setup with a registered key and the CA is accepted
    fed.wait_for_line("supernode-0", f"SuperNode ID: {good}", timeout=90)
    assert accepted.poll() is None
    # the stranger never became a node; the CA-less one never came online
    assert fed.nodes() == {good: "online", no_ca: "registered"}


def test_a_device_that_disappears_mid_round_is_a_failure_and_the_run_goes_on(
    federation: Federation, tmp_path: Path
) -> None:
    fed = federation
    server_data, devices = device_folders(tmp_path, 2)
    fed.start_superlink()
    fed.register(0, 1)
    nodes = [
        fed.start_supernode(i, f'data-path="{folder}" partition-id={i}')
        for i, folder in enumerate(devices)
    ]
    out = tmp_path / "results"
    run = fed.run(_run_config(server_data, f"output_dir={out}"))
    # device 1 loses power while it trains in round 1: the SuperNode and every
    # process under it die at once, without saying goodbye to the SuperLink
    fed.wait_for_line("supernode-1", "Receiving: train", timeout=RUN_TIMEOUT)
    kill_tree(nodes[1], signal.SIGKILL)
    _finish(fed, run)

    data = _results(out / "results.json")
    assert data["status"] == "completed"
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    for record in data["rounds"][1:]:
        assert record["clients"] == [0, 1]
        assert record["num_replies"] == 1
        # Flower reports the silent node as unavailable once its heartbeat lapses
        assert record["num_failures"] == 1 and record["num_timeouts"] == 0
    assert data["rounds"][2]["test_accuracy"] > data["rounds"][0]["test_accuracy"] + 0.2
    assert nodes[0].poll() is None
