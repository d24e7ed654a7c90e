"""Clients prune with AOFP and a matching strategy merges their widths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import strategies  # noqa: F401  (registers every strategy)
from fedsim import models
from fedsim.checkpoint import load_checkpoint
from fedsim.compare_plan import plan
from fedsim.exceptions import ConfigError
from fedsim.pruning.flops import count_flops
from fedsim.runner import run

CHANNELS, HIDDEN = [8, 12], [16]
WIDTHS = {"conv.0": 8, "conv.1": 12, "hidden.0": 16}
FAST = [
    "dataset=digits",
    "model=cnn",
    f"model.channels=[{CHANNELS[0]},{CHANNELS[1]}]",
    f"model.hidden=[{HIDDEN[0]}]",
    "num_clients=4",
    "num_rounds=3",
    "simulation.engine=inprocess",
    "client.lr=0.05",
    "client.epochs=2",
    "client.pruning.name=aofp",
    "client.pruning.side=client",
    "client.pruning.k=3",
    "client.pruning.warmup=2",
]


def cnn_at(widths: dict[str, int]) -> Any:
    return models.build(
        "cnn",
        input_shape=(1, 8, 8),
        num_classes=10,
        channels=[widths["conv.0"], widths["conv.1"]],
        hidden=[widths["hidden.0"]],
    )


def client_widths(strategy: Any, name: str) -> dict[int, list[dict[str, int]]]:
    """Per round, the widths of the models the clients sent back."""
    if name == "pfnm":  # the last round's local models
        template = strategy.template()
        cohort = [c.widths(template) for c in strategy.local_models.values()]
        return {strategy.context.num_rounds: cohort}
    return {
        h["round"]: list(h["client_widths"].values())
        for h in strategy.history
        if h["phase"] == 0
    }


@pytest.mark.parametrize("name", ["pfnm", "fedma"])
def test_pruned_clients_of_different_widths_are_merged(
    tmp_path: Path, name: str
) -> None:
    out = tmp_path / name
    results = run(
        [*FAST, f"strategy={name}", f"output_dir={out}"], progress=lambda r: None
    )
    rounds = results.rounds
    assert results.final["status"] == "completed"
    assert all(r["num_rejected"] == 0 and r["num_failures"] == 0 for r in rounds[1:])
    strategy = load_checkpoint(out).strategy
    cohorts = client_widths(strategy, name)
    assert len(cohorts) == (1 if name == "pfnm" else 3)
    for rnd, cohort in cohorts.items():
        assert len(cohort) == 4
        # every client pruned something, and they did not all end alike
        assert all(sum(w.values()) < sum(WIDTHS.values()) for w in cohort)
        assert len({tuple(sorted(w.items())) for w in cohort}) > 1
        for group in WIDTHS:  # a client's units map to distinct global units
            assert rounds[rnd]["widths"][group] >= max(w[group] for w in cohort)
    # each record describes the global model actually built at its widths
    for record in rounds[1:]:
        model = cnn_at(record["widths"])
        assert record["num_params"] == sum(p.numel() for p in model.parameters())
        assert record["flops"] == count_flops(model)
    assert rounds[-1]["num_params"] < rounds[0]["num_params"]
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.3
    if name == "pfnm":  # round 2 sends each client its slice at its own width
        assert rounds[2]["bytes_sent"] < rounds[1]["bytes_sent"]


def test_the_experiment_plans_every_documented_comparison(tmp_path: Path) -> None:
    common = ["experiment=pruned_matching", "seeds=[0]"]
    matched = plan([*common, f"compare_dir={tmp_path / 'm'}"])
    assert [r.strategy for r in matched.runs] == ["pfnm", "fedma"]
    assert all(r.exp.client.pruning.side == "client" for r in matched.runs)
    common_width = plan(
        [
            *common,
            "strategies=[fedavg]",
            "client.pruning.side=server",
            "client.pruning.warmup=1",
            f"compare_dir={tmp_path / 'c'}",
        ]
    )
    assert common_width.runs[0].exp.client.pruning.side == "server"
    unpruned = plan(
        [
            *common,
            "strategies=[fedavg]",
            "client.pruning.name=none",
            f"compare_dir={tmp_path / 'u'}",
        ]
    )
    assert unpruned.runs[0].exp.client.pruning.name == "none"
    # why the comparison is split: fedavg cannot merge clients' own widths
    with pytest.raises(ConfigError, match="'fedavg' cannot aggregate"):
        plan([*common, "strategies=[fedavg]", f"compare_dir={tmp_path / 'x'}"])
