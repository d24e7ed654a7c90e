"""pfnm_wpl: the Fisher moves with the matched units, in both directions."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import strategies  # noqa: F401  (registers every strategy)
from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.inprocess import InProcessGrid
from fedsim.matching.permspec import PermutationSpec, permute_state_dict
from fedsim.matching.permspec import select_units as select
from fedsim.params import record_to_state, state_to_record
from fedsim.plasticity import FISHER_RECORD, FISHER_SAMPLES, WPL_ALPHA, wpl_penalty
from fedsim.runner import run
from fedsim.strategy import STRATEGIES, StrategyContext
from strategies.pfnm import pfnm
from strategies.pfnm_wpl import PFNMWPL, pfnm_wpl

D, K, H = 20, 3, 6  # inputs, classes and hidden units of the fabricated MLPs
NODES = [1000 + 7 * i for i in range(3)]  # InProcessGrid's node ids
EXAMPLES = [10.0, 30.0, 20.0]
COUNTS = [[4, 4, 4]] * 3
State = dict[str, torch.Tensor]


def make(**options) -> PFNMWPL:
    context = StrategyContext(
        num_clients=3,
        num_rounds=3,
        model_name="mlp",
        model_kwargs={"input_shape": [D], "num_classes": K, "hidden": [H]},
        num_classes=K,
    )
    # a weak prior (sigma0_2) so that copies of one unit always share an atom
    options = {"sigma0_2": 1e8, "normalize": "none", "clip": None, **options}
    strat = STRATEGIES.build("pfnm_wpl", context=context, **options)
    assert isinstance(strat, PFNMWPL)
    return strat


def spec_at(width: int) -> PermutationSpec:
    with torch.random.fork_rng(devices=[]):
        model = models.build("mlp", input_shape=[D], num_classes=K, hidden=[width])
    return models.permutation_spec(model)


def net(gen: torch.Generator, width: int = H, low: float = -1.0) -> State:
    """An MLP-shaped state with entries uniform in [low, 1)."""
    shapes = {
        "layers.0.weight": (width, D),
        "layers.0.bias": (width,),
        "layers.1.weight": (K, width),
        "layers.1.bias": (K,),
    }
    return {
        k: low + (1 - low) * torch.rand(s, generator=gen) for k, s in shapes.items()
    }


def moved(state: State, perm: np.ndarray) -> State:
    """``state`` with its hidden units reordered: new unit k is old unit perm[k]."""
    return permute_state_dict(state, spec_at(len(perm)), {"hidden.0": perm})


def kept(state: State, units: np.ndarray) -> State:
    """``state`` with only hidden ``units`` (a client that pruned the others)."""
    return select(state, spec_at(H), "hidden.0", units)


def reply(pid: int, weights: State, fisher: State) -> Message:
    content = RecordDict(
        {
            "arrays": state_to_record(weights),
            "metrics": MetricRecord(
                {
                    "num-examples": EXAMPLES[pid],
                    "train_loss": 0.5,
                    "label-counts": COUNTS[pid],
                }
            ),
            FISHER_RECORD: state_to_record(fisher),
        }
    )
    message = Message(content, dst_node_id=NODES[pid], message_type="train")
    message.metadata.__dict__["_src_node_id"] = NODES[pid]
    return message


def configure(strat: PFNMWPL, rnd: int, arrays: ArrayRecord) -> dict[int, Message]:
    grid = InProcessGrid(ClientApp(), 3)
    messages = strat.configure_train(rnd, arrays, ConfigRecord(), grid)
    return {NODES.index(m.metadata.dst_node_id): m for m in messages}


def first_round(
    strat: PFNMWPL, weights: State, fisher: State, perms: Sequence[np.ndarray]
) -> ArrayRecord:
    """Round 1: client j sends the base net and Fisher permuted by ``perms[j]``."""
    configure(strat, 1, state_to_record(strat.template().state_dict()))
    replies = [
        reply(j, moved(weights, p), moved(fisher, p)) for j, p in enumerate(perms)
    ]
    arrays, _ = strat.aggregate_train(1, replies)
    assert arrays is not None and strat.widths == {"hidden.0": H}
    assert all(FISHER_RECORD not in r.content for r in replies)
    return arrays


def in_global(strat: PFNMWPL, base: State, perm0: np.ndarray) -> State:
    """``base`` (in the base net's unit order) in the global atom order, read off
    client 0, whose unit u is base unit perm0[u] and global atom a0[u]."""
    a0 = strat.assignments[0]["hidden.0"]
    order = np.empty(H, dtype=np.int64)
    order[a0] = perm0
    return moved(base, order)


def perms_of(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(H) for _ in range(3)]


def test_each_client_gets_back_the_fisher_of_its_own_units_in_its_order() -> None:
    gen = torch.Generator().manual_seed(0)
    weights, fisher = net(gen), net(gen, low=0.0)
    perms = perms_of(1)
    strat = make(alpha=0.3)
    arrays = first_round(strat, weights, fisher, perms)
    sent = configure(strat, 2, arrays)
    for pid, message in sent.items():
        config = message.content["config"]
        assert config[WPL_ALPHA] == 0.3 and config[FISHER_SAMPLES] == 256
        got = record_to_state(message.content[FISHER_RECORD])
        want = moved(fisher, perms[pid])
        assert set(got) == set(want)
        for k in want:  # exactly the client's own Fisher, moved with its units
            assert torch.equal(got[k], want[k]), k
    # the Fisher slice is cut exactly as the model slice is
    glob = record_to_state(arrays)
    strat.fisher = glob
    for message in configure(strat, 2, arrays).values():
        got = record_to_state(message.content[FISHER_RECORD])
        model = record_to_state(message.content["arrays"])
        assert all(torch.equal(got[k], model[k]) for k in got)


def test_permuting_weights_fisher_and_anchor_together_keeps_the_penalty() -> None:
    gen = torch.Generator().manual_seed(2)
    weights, fisher = net(gen), net(gen, low=0.0)
    perms = perms_of(3)
    strat = make()
    arrays = first_round(strat, weights, fisher, perms)
    sent = configure(strat, 2, arrays)
    trial = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in weights.items()
    }
    values = []
    received = {}
    for pid, message in sent.items():
        anchor = record_to_state(message.content["arrays"])
        f = record_to_state(message.content[FISHER_RECORD])
        received[pid] = (anchor, f)
        penalty = wpl_penalty(anchor, f, alpha=0.7)
        values.append(float(penalty(moved(trial, perms[pid]))))
    assert values[0] > 0
    assert values == pytest.approx([values[0]] * 3, rel=1e-6)
    # the check can fail: client 1's Fisher with client 0's anchor and weights
    mixed = wpl_penalty(received[0][0], received[1][1], alpha=0.7)
    assert float(mixed(moved(trial, perms[0]))) != pytest.approx(values[0], rel=1e-3)


def test_units_a_client_lacks_get_zero_importance_from_it() -> None:
    gen = torch.Generator().manual_seed(4)
    weights, fisher = net(gen), net(gen, low=0.0)
    perms = perms_of(5)
    strat = make()
    configure(strat, 1, state_to_record(strat.template().state_dict()))
    lacks = np.array([1, 4])  # base units client 2 does not have
    has = np.setdiff1d(np.arange(H), lacks)
    replies = [
        reply(j, moved(weights, perms[j]), moved(fisher, perms[j])) for j in (0, 1)
    ]
    replies.append(reply(2, kept(weights, has), kept(fisher, has)))
    strat.aggregate_train(1, replies)
    assert strat.widths == {"hidden.0": H} and strat.fisher is not None
    share = (EXAMPLES[0] + EXAMPLES[1]) / sum(EXAMPLES)
    scale = torch.ones(H)
    scale[lacks] = share
    want = dict(fisher)
    want["layers.0.weight"] = fisher["layers.0.weight"] * scale[:, None]
    want["layers.0.bias"] = fisher["layers.0.bias"] * scale
    want["layers.1.weight"] = fisher["layers.1.weight"] * scale[None, :]
    want = in_global(strat, want, perms[0])
    for k, v in want.items():
        torch.testing.assert_close(strat.fisher[k], v, rtol=1e-6, atol=0)


@pytest.mark.parametrize("pruned", [False, True], ids=["same-widths", "one-pruned"])
def test_the_memory_moves_with_the_units_and_decays(pruned: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    weights, fisher, fisher2 = net(gen), net(gen, low=0.0), net(gen, low=0.0)
    perms = perms_of(7)
    strat = make(decay=0.25)
    arrays = first_round(strat, weights, fisher, perms)
    sent = configure(strat, 2, arrays)
    has = np.array([0, 2, 3, 5])  # client 2's units it keeps when it prunes
    replies = []
    for pid, message in sent.items():
        back = record_to_state(message.content["arrays"])
        f2 = moved(fisher2, perms[pid])
        if pruned and pid == 2:
            back, f2 = kept(back, has), kept(f2, has)
        replies.append(reply(pid, back, f2))
    strat.aggregate_train(2, replies)
    assert strat.widths == {"hidden.0": H} and strat.fisher is not None
    fresh = dict(fisher2)
    if pruned:  # client 2 now lacks its units not in `has`: zero from it
        lacks = np.setdiff1d(np.arange(H), perms[2][has])
        scale = torch.ones(H)
        scale[lacks] = (EXAMPLES[0] + EXAMPLES[1]) / sum(EXAMPLES)
        fresh["layers.0.weight"] = fisher2["layers.0.weight"] * scale[:, None]
        fresh["layers.0.bias"] = fisher2["layers.0.bias"] * scale
        fresh["layers.1.weight"] = fisher2["layers.1.weight"] * scale[None, :]
    # the memory (fisher, carried by whoever came back at its widths) is the
    # same in every client's slice, so its mean is fisher in the new order
    want = {k: 0.25 * fisher[k] + 0.75 * fresh[k] for k in fisher}
    want = in_global(strat, want, perms[0])
    for k, v in want.items():
        torch.testing.assert_close(strat.fisher[k], v, rtol=1e-6, atol=1e-7)


def test_a_server_side_pruning_shrinks_the_fisher() -> None:
    strat = make()
    gen = torch.Generator().manual_seed(8)
    strat.fisher = net(gen, low=0.0)
    keep = np.array([0, 2, 5])
    want = kept(strat.fisher, keep)
    strat.select_units(spec_at(H), "hidden.0", keep)
    assert all(torch.equal(strat.fisher[k], want[k]) for k in want)
    assert strat.fisher["layers.0.weight"].shape == (3, D)


def test_pfnm_options_have_pfnm_defaults_and_bad_values_are_refused() -> None:
    ours = inspect.signature(pfnm_wpl).parameters
    for name, param in inspect.signature(pfnm).parameters.items():
        assert ours[name].default == param.default, name
    with pytest.raises(ConfigError, match=r"strategy.decay=1.0 must be in \[0, 1\)"):
        make(decay=1.0)
    with pytest.raises(ConfigError, match=r"strategy\.alpha=-1"):
        make(alpha=-1)
    with pytest.raises(ConfigError, match=r"strategy\.send='all' is not one of"):
        make(send="all")
    with pytest.raises(ConfigError, match="has no option 'mu'"):
        make(mu=0.1)


FAST = [
    "dataset=digits",
    "model=cnn",
    "model.channels=[8,12]",
    "model.hidden=[16]",
    "num_clients=4",
    "num_rounds=3",
    "simulation.engine=inprocess",
    "client.lr=0.05",
]


def test_end_to_end_in_process(tmp_path: Path) -> None:
    base = run(
        [*FAST, "strategy=pfnm", f"output_dir={tmp_path / 'pfnm'}"],
        progress=lambda r: None,
    )
    results = run(
        [*FAST, "strategy=pfnm_wpl", f"output_dir={tmp_path / 'wpl'}"],
        progress=lambda r: None,
    )
    rounds = results.rounds
    assert results.final["status"] == "completed"
    assert all(r["num_rejected"] == 0 and r["num_failures"] == 0 for r in rounds[1:])
    # round 1 is PFNM's (no Fisher yet; clients only add theirs to the reply)
    assert rounds[1]["test_accuracy"] == base.rounds[1]["test_accuracy"]
    assert rounds[1]["bytes_received"] > 1.9 * base.rounds[1]["bytes_received"]
    # later rounds send each client its Fisher slice with its model slice
    assert rounds[2]["bytes_sent"] > 1.9 * base.rounds[2]["bytes_sent"]
    assert rounds[2]["test_accuracy"] != base.rounds[2]["test_accuracy"]


def test_end_to_end_with_clients_pruning(tmp_path: Path) -> None:
    results = run(
        [
            *FAST,
            "strategy=pfnm_wpl",
            "client.epochs=2",
            "client.pruning.name=aofp",
            "client.pruning.k=3",
            "client.pruning.warmup=2",
            f"output_dir={tmp_path / 'pruned'}",
        ],
        progress=lambda r: None,
    )
    rounds = results.rounds
    assert results.final["status"] == "completed"
    assert all(r["num_rejected"] == 0 for r in rounds[1:])
    assert rounds[-1]["num_params"] < rounds[0]["num_params"]
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.3
