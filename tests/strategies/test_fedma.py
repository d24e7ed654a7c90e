"""The fedma strategy: its multi-phase rounds, end to end and with a failing client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from clients.client_app import build_client_app
from fedsim import models, tasks
from fedsim.config import compose, from_dictconfig
from fedsim.exceptions import ConfigError
from fedsim.faults import FAULT_KEY
from fedsim.grid import FedsimGrid
from fedsim.inprocess import InProcessGrid
from fedsim.matching.fedma import ASSIGN_RECORD
from fedsim.models import tensor_roles
from fedsim.params import record_to_state, split_roles, state_to_record
from fedsim.runner import run
from fedsim.server_app import prepare
from fedsim.train import evaluate
from strategies.fedma import FedMA

SMALL = [
    "dataset=digits",
    "model=cnn",
    "model.channels=[8,16]",
    "model.hidden=[32]",
    "strategy=fedma",
    "simulation.engine=inprocess",
    "client.lr=0.05",
]
GROUPS = ["conv.0", "conv.1", "hidden.0"]


def test_two_clients_fedma_run_grows_and_learns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, str | None, int]] = []  # type, group, messages
    plain = FedsimGrid.send_and_receive

    def spy(self: FedsimGrid, messages: Any, **kw: Any) -> Any:
        messages = list(messages)
        if messages:
            config = messages[0].content.get("config")
            group = config.get("fedma-group") if config is not None else None
            kind = str(messages[0].metadata.message_type)
            sent.append((kind, None if group is None else str(group), len(messages)))
        return plain(self, messages, **kw)

    monkeypatch.setattr(FedsimGrid, "send_and_receive", spy)
    results = run(
        [*SMALL, "num_clients=2", "num_rounds=2", f"output_dir={tmp_path / 'r'}"],
        progress=lambda r: None,
    )
    one_round = [
        ("train.fedma_local", None, 2),
        *[("train.fedma_layer", g, 2) for g in GROUPS],
    ]
    assert sent == one_round * 2  # local training, then one phase per layer
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    start = {"conv.0": 8, "conv.1": 16, "hidden.0": 32}
    for rec in rounds[1:]:
        assert rec["num_replies"] > 0 and rec["num_failures"] == 0
        widths = rec["widths"]
        assert all(start[g] <= widths[g] <= 2 * start[g] for g in GROUPS)
        # phase 0 alone sends the whole model to both clients; the layer
        # phases add the frozen tensors
        model_bytes = 4 * rounds[0]["num_params"]
        assert rec["bytes_sent"] > 2 * model_bytes
    assert rounds[-1]["num_params"] >= rounds[0]["num_params"]
    assert results.final["test_accuracy"] > 0.8  # chance is 0.1


def _setup(tmp_path: Path, num_clients: int, crash: dict[int, int]) -> dict[str, Any]:
    """A strategy, an in-process grid and the initial arrays, outside the loop.

    ``crash`` maps a partition id to the FedMA phase in which it fails.
    """
    exp = from_dictconfig(
        compose([*SMALL, f"num_clients={num_clients}", f"output_dir={tmp_path / 'x'}"])
    )
    ready = prepare(exp)
    inner = InProcessGrid(build_client_app(exp), exp.num_clients)

    def fail(message: Message) -> None:
        pid = inner.contexts[message.metadata.dst_node_id].node_config["partition-id"]
        config = message.content.get("config")
        phase = int(config.get("fedma-phase", 0)) if config is not None else -1
        if (
            message.metadata.message_type.startswith("train.fedma")
            and crash.get(int(pid)) == phase
        ):
            content = RecordDict(dict(message.content))
            content["config"] = ConfigRecord({**dict(config), FAULT_KEY: "crash"})
            message.content = content

    grid = FedsimGrid(inner, expected_nodes=exp.num_clients, decorate=fail)
    grid.discover()
    parts = split_roles(ready.model.state_dict(), tensor_roles(ready.model))
    grid.server_state = state_to_record(parts["server"])
    return {
        "strategy": ready.strategy,
        "grid": grid,
        "inner": inner,
        "arrays": state_to_record(parts["average"]),
        "model": ready.model,
        "splits": ready.splits,
    }


def test_a_round_runs_one_phase_per_group_and_survives_a_failing_client(
    tmp_path: Path,
) -> None:
    setup = _setup(tmp_path, num_clients=3, crash={1: 2})
    strategy: FedMA = setup["strategy"]
    arrays, metrics = strategy.run_round(
        1, setup["arrays"], ConfigRecord(), setup["grid"]
    )
    assert arrays is not None and metrics is not None and "train_loss" in metrics
    phases = [(h["phase"], h["group"], h["clients"]) for h in strategy.history]
    # client 1 crashes in phase 2 (conv.1) and takes no further part
    assert phases == [
        (0, None, 3),
        (1, "conv.0", 3),
        (2, "conv.1", 2),
        (3, "hidden.0", 2),
    ]
    widths = {h["group"]: h["width"] for h in strategy.history if h["group"]}
    state = record_to_state(arrays)
    merged = models.fit_to_state(setup["model"], state)
    assert models.permutation_spec(merged).widths() == widths
    merged.load_state_dict({**merged.state_dict(), **state})
    test = setup["splits"].test
    accuracy = evaluate(merged, test.x, test.y, _task())["accuracy"]
    assert accuracy > 0.5  # one round, chance is 0.1
    # the server keeps the survivors' whole assignments; the crashed client,
    # which missed part of the matching, has none
    inner = setup["inner"]
    assert {p: set(own) for p, own in strategy.assignments.items()} == {
        0: set(GROUPS),
        2: set(GROUPS),
    }
    # and sends each its own with the next round's first message
    grid = setup["grid"]
    for pid in (0, 1, 2):
        content = strategy._local_content(arrays, ConfigRecord(), pid)
        sent = content.get(ASSIGN_RECORD)
        assert (sent is not None) == (pid != 1)
        if sent is not None:
            for group in GROUPS:
                np.testing.assert_array_equal(
                    sent[group].numpy(), strategy.assignments[pid][group]
                )
    assert [grid.partition_of(n) for n in grid.get_node_ids()] == [0, 1, 2]
    # next round: the survivors train their own slices, the crashed client the
    # whole global model; all three are matched again
    setup["grid"].decorate = None
    arrays2, _ = strategy.run_round(2, arrays, ConfigRecord(), setup["grid"])
    assert arrays2 is not None
    second = [h for h in strategy.history if h["round"] == 2]
    assert [h["clients"] for h in second] == [3, 3, 3, 3]
    sent_back = {
        int(inner.contexts[node].node_config["partition-id"]): w
        for node, w in second[0]["client_widths"].items()
    }
    start = {"conv.0": 8, "conv.1": 16, "hidden.0": 32}
    assert sent_back[0] == sent_back[2] == start
    assert sent_back[1] == widths != start  # the matching grew the model
    assert sorted(strategy.assignments) == [0, 1, 2]
    for pid, own in strategy.assignments.items():
        for group in GROUPS:  # each of the client's units to its own global unit
            a = own[group]
            assert len(np.unique(a)) == len(a) == sent_back[pid][group]


def test_a_round_where_every_client_fails_keeps_the_model(tmp_path: Path) -> None:
    setup = _setup(tmp_path, num_clients=2, crash={0: 1, 1: 1})
    strategy: FedMA = setup["strategy"]
    arrays, metrics = strategy.run_round(
        1, setup["arrays"], ConfigRecord(), setup["grid"]
    )
    assert arrays is None and metrics is None
    assert strategy.tag == 0  # the global model was not replaced
    assert strategy.assignments == {}


def test_bad_options_fail_with_one_sentence() -> None:
    for override, word in (
        ("strategy.gamma=0", "gamma"),
        ("strategy.retrain_epochs=0", "retrain_epochs"),
        ("strategy.max_growth=0.5", "max_growth"),
        ("strategy.popularity=odd", "popularity"),
    ):
        exp = from_dictconfig(compose([*SMALL, override]))
        with pytest.raises(ConfigError, match=word):
            prepare(exp)


def _task() -> Any:
    return tasks.build("classification")
