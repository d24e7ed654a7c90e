"""fedavg_wpl and fedcurv: their records, their aggregation, end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import strategies  # noqa: F401
from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.inprocess import InProcessGrid
from fedsim.matching.permspec import select_units
from fedsim.params import record_to_state, state_to_record
from fedsim.plasticity import (
    ANCHORS_RECORD,
    FEDCURV_CONST,
    FEDCURV_LAMBDA,
    FISHER_RECORD,
    FISHER_SAMPLES,
    WPL_ALPHA,
)
from fedsim.runner import run
from fedsim.strategy import STRATEGIES, StrategyContext

W0 = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
# (weights, examples, Fisher) of three clients
CLIENTS = [
    ({"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([1.0])}, 10,
     {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0])}),
    ({"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([-1.0])}, 30,
     {"a": torch.tensor([5.0, 1.0]), "b": torch.tensor([0.0])}),
    ({"a": torch.tensor([4.0, -4.0]), "b": torch.tensor([2.0])}, 20,
     {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([4.0])}),
]  # fmt: skip


def strategy(name: str, **options):
    context = StrategyContext(num_clients=3, client_lr=0.1)
    return STRATEGIES.build(name, context=context, **options)


def replies(clients=CLIENTS) -> list[Message]:
    out = []
    for i, (weights, n, fisher) in enumerate(clients):
        content = RecordDict(
            {
                "arrays": state_to_record(weights),
                "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5}),
                FISHER_RECORD: state_to_record(fisher),
            }
        )
        message = Message(content, dst_node_id=1000 + 7 * i, message_type="train")
        message.metadata.__dict__["_src_node_id"] = 1000 + 7 * i
        out.append(message)
    return out


def configure(strat, rnd: int) -> list[Message]:
    grid = InProcessGrid(ClientApp(), 3)
    messages = list(
        strat.configure_train(rnd, state_to_record(W0), ConfigRecord(), grid)
    )
    assert len(messages) == 3
    return messages


def test_fedavg_wpl_averages_weights_and_fisher_then_sends_the_decayed_mean() -> None:
    strat = strategy("fedavg_wpl", alpha=0.2, decay=0.25, normalize="mean")
    first = configure(strat, 1)
    config = first[0].content["config"]
    assert config[WPL_ALPHA] == 0.2 and config[FISHER_SAMPLES] == 256
    assert FISHER_RECORD not in first[0].content  # no Fisher before round 1
    sent = replies()
    arrays, _ = strat.aggregate_train(1, sent)
    assert all(FISHER_RECORD not in r.content for r in sent)
    got = record_to_state(arrays)
    assert got["a"].tolist() == pytest.approx([(20 + 0 + 80) / 60, (0 + 30 - 80) / 60])
    # Fisher mean weighted by examples: a = [(10+150+0)/60, (30+30+40)/60],
    # b = [(20+0+80)/60]; entries 8/3, 5/3, 5/3 have mean 2
    fisher = record_to_state(configure(strat, 2)[0].content[FISHER_RECORD])
    assert fisher["a"].tolist() == pytest.approx([4 / 3, 5 / 6])
    assert fisher["b"].tolist() == pytest.approx([5 / 6])
    # round 2: every client reports F = (1, 1, 1): F <- 0.25 F + 0.75 * 1
    ones = {"a": torch.ones(2), "b": torch.ones(1)}
    strat.aggregate_train(2, replies([(w, n, ones) for w, n, _ in CLIENTS]))
    fisher = record_to_state(configure(strat, 3)[0].content[FISHER_RECORD])
    assert fisher["a"].tolist() == pytest.approx(
        [0.25 * 4 / 3 + 0.75, 0.25 * 5 / 6 + 0.75]
    )


def test_fedavg_wpl_refuses_bad_options() -> None:
    with pytest.raises(ConfigError, match=r"strategy.decay=1.0 must be in \[0, 1\)"):
        strategy("fedavg_wpl", decay=1.0)
    with pytest.raises(ConfigError, match="normalize='median'"):
        strategy("fedavg_wpl", normalize="median")


def test_fedavg_wpl_shrinks_its_fisher_with_pruned_units() -> None:
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[6])
    spec = models.permutation_spec(model)
    strat = strategy("fedavg_wpl")
    strat.fisher = {k: torch.rand_like(v) for k, v in model.named_parameters()}
    keep = np.array([0, 2, 5])
    expected = select_units(strat.fisher, spec, "hidden.0", keep)
    strat.select_units(spec, "hidden.0", keep)
    assert all(torch.equal(strat.fisher[k], expected[k]) for k in expected)
    assert strat.fisher["layers.0.weight"].shape == (3, 64)


def test_fedcurv_sends_each_client_the_others_sums() -> None:
    strat = strategy("fedcurv", lam=0.5)
    first = configure(strat, 1)
    assert first[0].content["config"][FEDCURV_LAMBDA] == 0.5
    assert ANCHORS_RECORD not in first[0].content
    sent = replies()
    strat.aggregate_train(1, sent)
    assert all(FISHER_RECORD not in r.content for r in sent)
    for message in configure(strat, 2):
        node = message.metadata.dst_node_id
        k = (node - 1000) // 7
        others = [c for j, c in enumerate(CLIENTS) if j != k]
        u = record_to_state(message.content[FISHER_RECORD])
        v = record_to_state(message.content[ANCHORS_RECORD])
        for key in ("a", "b"):
            assert u[key].dtype == torch.float32
            assert torch.allclose(u[key], sum(f[key] for _, _, f in others))
            assert torch.allclose(v[key], sum(f[key] * w[key] for w, _, f in others))
        const = sum(float((f[n] * w[n] ** 2).sum()) for w, _, f in others for n in w)
        assert message.content["config"][FEDCURV_CONST] == pytest.approx(const)


FAST = [
    "dataset=digits",
    "model.hidden=[32]",
    "num_clients=4",
    "num_rounds=3",
    "simulation.engine=inprocess",
    "client.lr=0.1",
    "evaluation.per_class=true",
]


@pytest.mark.parametrize("name", ["fedavg_wpl", "fedcurv"])
def test_end_to_end_in_process(tmp_path: Path, name: str) -> None:
    base = run([*FAST, f"output_dir={tmp_path / 'avg'}"], progress=lambda r: None)
    results = run(
        [*FAST, f"output_dir={tmp_path / name}", f"strategy={name}"],
        progress=lambda r: None,
    )
    rounds = results.rounds
    assert results.final["status"] == "completed"
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.3
    assert all(r["num_rejected"] == 0 and r["num_failures"] == 0 for r in rounds[1:])
    assert 0.0 <= rounds[-1]["test_worst_class_accuracy"] <= rounds[-1]["test_accuracy"]
    assert len(rounds[-1]["test_class_accuracy"]) == 10
    # round 1 is FedAvg (no Fisher yet); later rounds carry it both ways
    assert rounds[1]["test_accuracy"] == base.rounds[1]["test_accuracy"]
    assert rounds[1]["bytes_received"] > 1.9 * base.rounds[1]["bytes_received"]
    extra = 1.9 if name == "fedavg_wpl" else 2.9
    assert rounds[2]["bytes_sent"] > extra * base.rounds[2]["bytes_sent"]
    assert rounds[2]["test_accuracy"] != base.rounds[2]["test_accuracy"]
