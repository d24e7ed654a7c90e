"""Faults, bad updates, and checkpoint/resume on the in-process engine."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.checkpoint import load_checkpoint
from fedsim.config import compose, from_dictconfig
from fedsim.inprocess import InProcessGrid
from fedsim.runner import open_results, resume, run
from fedsim.server import ServerLoop
from fedsim.server_app import prepare

FAST = [
    "dataset=digits",
    "model.hidden=[16]",
    "simulation.engine=inprocess",
    "client.lr=0.1",
]


def test_crashes_stragglers_and_corrupt_updates_are_counted(tmp_path: Path) -> None:
    results = run(
        [
            *FAST,
            "num_clients=10",
            "num_rounds=2",
            "simulation.faults.crash=0.2",
            "simulation.faults.straggle=0.2",
            "simulation.faults.corrupt=0.2",
            "simulation.faults.straggle_seconds=1.0",
            "simulation.round_timeout=0.8",
            f"output_dir={tmp_path / 'f'}",
        ],
        progress=lambda r: None,
    )
    assert results.status == "completed"
    for rec in results.rounds[1:]:
        faults = rec["injected_faults"]
        assert {k: len(v) for k, v in faults.items()} == {
            "crash": 2,
            "straggle": 2,
            "corrupt": 2,
        }
        assert rec["num_failures"] == 2
        assert rec["num_timeouts"] == 2
        assert rec["num_rejected"] == 2
        assert rec["num_replies"] == 4
    # the 4 honest updates still train the model
    assert results.rounds[-1]["test_accuracy"] > results.rounds[0]["test_accuracy"]
    # the same seed fails the same clients
    again = run(
        [
            *FAST,
            "num_clients=10",
            "num_rounds=1",
            "simulation.faults.crash=0.2",
            "simulation.faults.straggle=0.2",
            "simulation.faults.corrupt=0.2",
            "simulation.faults.straggle_seconds=1.0",
            "simulation.round_timeout=0.8",
            f"output_dir={tmp_path / 'g'}",
        ],
        progress=lambda r: None,
    )
    assert again.rounds[1]["injected_faults"] == results.rounds[1]["injected_faults"]


def test_no_valid_reply_keeps_the_previous_model(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        results = run(
            [
                *FAST,
                "num_clients=3",
                "num_rounds=2",
                "simulation.faults.crash=1.0",
                f"output_dir={tmp_path / 'c'}",
            ],
            progress=lambda r: None,
        )
    for rec in results.rounds[1:]:
        assert rec["kept_previous_model"] is True and rec["num_failures"] == 3
        assert rec["test_loss"] == results.rounds[0]["test_loss"]
    assert "keeping the previous global model" in caplog.text


BAD_KINDS = [
    "nan",
    "inf",
    "shape",
    "dtype",
    "missing",
    "extra",
    "zero_examples",
    "absurd_examples",
    "no_arrays",
]


def _bad_app(good_node: int) -> ClientApp:
    app = ClientApp()

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord(
            {
                "partition-id": pid,
                "num-partitions": len(BAD_KINDS) + 1,
                "num-examples": 10,
                "label-counts": [1] * 10,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        first = next(iter(arrays))
        n = 10.0
        if pid == good_node:
            arrays = {k: v + 1.0 for k, v in arrays.items()}
        else:
            kind = BAD_KINDS[pid if pid < good_node else pid - 1]
            if kind == "nan":
                arrays[first][...] = np.nan
            elif kind == "inf":
                arrays[first].flat[0] = np.inf
            elif kind == "shape":
                arrays[first] = np.zeros((3, 3), dtype=np.float32)
            elif kind == "dtype":
                arrays[first] = arrays[first].astype(np.float64)
            elif kind == "missing":
                del arrays[first]
            elif kind == "extra":
                arrays["sneaky.weight"] = np.zeros(2, dtype=np.float32)
            elif kind == "zero_examples":
                n = 0.0
            elif kind == "absurd_examples":
                n = 1e12
            elif kind == "no_arrays":
                content = RecordDict({"metrics": MetricRecord({"num-examples": n})})
                return Message(content, reply_to=msg)
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
            }
        )
        return Message(content, reply_to=msg)

    return app


def test_every_kind_of_bad_update_is_rejected(tmp_path: Path, caplog) -> None:
    num = len(BAD_KINDS) + 1
    exp = from_dictconfig(
        compose(
            [
                *FAST,
                f"num_clients={num}",
                "num_rounds=1",
                f"output_dir={tmp_path / 'b'}",
            ]
        )
    )
    ready = prepare(exp)
    before = {k: v.clone() for k, v in ready.model.state_dict().items()}
    results = open_results(exp, ready.splits)
    loop = ServerLoop(
        exp, ready.strategy, ready.splits, ready.model, results, progress=lambda r: None
    )
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        loop.run(InProcessGrid(_bad_app(good_node=4), num))
    rec = results.rounds[1]
    assert rec["num_rejected"] == len(BAD_KINDS) and rec["num_replies"] == 1
    # the global model is exactly the one honest update (weights + 1)
    after = loop.model.state_dict()
    for key, value in before.items():
        if value.is_floating_point():
            torch.testing.assert_close(after[key], value + 1.0)
    for reason in (
        "NaN or Inf",
        "has shape",
        "has dtype",
        "lacks tensor",
        "unknown tensor",
        "num-examples=0 is not in (0, 10]",
        "num-examples=1e+12 is not",
        "no 'arrays' record",
    ):
        assert reason in caplog.text, reason


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", "run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


RESUMABLE = [
    "model.hidden=[64]",
    "simulation.engine=inprocess",
    "strategy=fedadam",  # server optimiser moments must survive the restart
    "num_clients=5",
    "num_rounds=6",
    "fraction_train=0.6",
]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    full = _cli(*RESUMABLE, "output_dir=full", cwd=tmp_path)
    assert full.wait(timeout=600) == 0, full.stderr.read() if full.stderr else ""
    victim = _cli(*RESUMABLE, "output_dir=killed", cwd=tmp_path)
    results_file = tmp_path / "killed" / "results.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if results_file.exists():
            rounds = json.loads(results_file.read_text())["rounds"]
            if len(rounds) >= 3:  # round 2 is recorded
                break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    stopped = load_checkpoint(tmp_path / "killed").server_round
    assert 2 <= stopped < 6, "the run should have been killed mid-way"
    resumed = resume(tmp_path / "killed", progress=lambda r: None)
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "killed")
    assert a.server_round == b.server_round == 6
    for key, value in a.global_state.items():
        assert torch.equal(value, b.global_state[key]), key
    full_rounds = json.loads((tmp_path / "full" / "results.json").read_text())["rounds"]
    for x, y in zip(full_rounds, resumed.rounds, strict=True):
        assert x["test_accuracy"] == y["test_accuracy"]
        assert x["clients"] == y["clients"] if "clients" in x else True
    assert resumed.final["status"] == "completed"


STATEFUL = {
    # server optimiser moments
    "fedadam": ["model.hidden=[16]"],
    # every client's Fisher and weights, by partition
    "fedcurv": ["model.hidden=[16]", "strategy.fisher_samples=32"],
    # the averaged Fisher
    "fedavg_wpl": ["model.hidden=[16]", "strategy.fisher_samples=32"],
    # each client's assignment to the global units, and the widths
    "pfnm": ["model.hidden=[16]", "client.epochs=2"],
    "fedma": ["model=cnn", "model.channels=[8,16]", "model.hidden=[32]"],
    # PFNM's state and each client's Fisher in its own units
    "pfnm_wpl": ["model.hidden=[16]", "strategy.fisher_samples=32"],
}


@pytest.mark.parametrize("strategy", sorted(STATEFUL))
def test_a_resumed_run_equals_an_uninterrupted_one_under_new_node_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """A strategy's per-client state must survive a restart in its checkpoint,
    keyed by partition id: a resumed run's nodes have new ids, as under
    Flower's runtimes."""
    common = [
        "dataset=digits",
        "simulation.engine=inprocess",
        "num_clients=3",
        "client.lr=0.05",
        "seed=5",
        f"strategy={strategy}",
        *STATEFUL[strategy],
    ]
    run([*common, "num_rounds=3", f"output_dir={tmp_path / 'full'}"])
    run([*common, "num_rounds=2", f"output_dir={tmp_path / 'cut'}"])
    monkeypatch.setattr(InProcessGrid, "first_node_id", 5003)
    resumed = resume(tmp_path / "cut", num_rounds=3, progress=lambda r: None)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert a.server_round == b.server_round == 3
    assert a.global_state.keys() == b.global_state.keys()
    for key, value in a.global_state.items():
        assert torch.equal(value, b.global_state[key]), key
    full = json.loads((tmp_path / "full" / "results.json").read_text())["rounds"]
    for x, y in zip(full, resumed.rounds, strict=True):
        assert x["test_accuracy"] == y["test_accuracy"]
        assert x.get("widths") == y.get("widths")


def test_resume_refuses_a_finished_run_and_a_non_run(tmp_path: Path) -> None:
    from fedsim.exceptions import ConfigError

    run(
        [*FAST, "num_clients=2", "num_rounds=1", f"output_dir={tmp_path / 'r'}"],
        progress=lambda r: None,
    )
    with pytest.raises(ConfigError, match="already finished round 1"):
        resume(tmp_path / "r")
    extended = resume(tmp_path / "r", num_rounds=2, progress=lambda r: None)
    assert [r["round"] for r in extended.rounds] == [0, 1, 2]
    with pytest.raises(ConfigError, match="not a fedsim run folder"):
        resume(tmp_path / "nothing")
