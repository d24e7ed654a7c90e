"""The pfnm strategy: its aggregation against pfnm_mlp, slices, failures, runs."""

from __future__ import annotations

import itertools
import json
import pickle
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import strategies  # noqa: F401  (registers every strategy)
from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.inprocess import InProcessGrid
from fedsim.matching import permute_state_dict, pfnm_mlp
from fedsim.params import record_to_state, state_to_record
from fedsim.runner import run
from fedsim.strategy import STRATEGIES, StrategyContext
from strategies import _pfnm_parts
from strategies.pfnm import PFNMStrategy, match_seed

D, K = 20, 3  # inputs and classes of the fabricated MLPs
NODES = [1000 + 7 * i for i in range(3)]  # InProcessGrid's node ids
State = dict[str, np.ndarray]


# ------------------------------------------------------------------ harness
def make(hidden: Sequence[int] = (6,), **options) -> PFNMStrategy:
    context = StrategyContext(
        num_clients=3,
        num_rounds=3,
        model_name="mlp",
        model_kwargs={"input_shape": [D], "num_classes": K, "hidden": list(hidden)},
        num_classes=K,
        fraction_train=options.pop("fraction_train", 1.0),
        federated_evaluation=options.pop("federated_evaluation", False),
    )
    strat = STRATEGIES.build("pfnm", context=context, **options)
    assert isinstance(strat, PFNMStrategy)
    return strat


def mlp_state(rng: np.random.Generator, sizes: Sequence[int], scale=1.0) -> State:
    out: State = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        out[f"layers.{i}.weight"] = rng.normal(0, scale, (b, a)).astype(np.float32)
        out[f"layers.{i}.bias"] = rng.normal(0, scale, b).astype(np.float32)
    return out


def permuted(state: State, perms: Sequence[np.ndarray]) -> State:
    out = {k: v.copy() for k, v in state.items()}
    for c, p in enumerate(perms):
        out[f"layers.{c}.weight"] = out[f"layers.{c}.weight"][p]
        out[f"layers.{c}.bias"] = out[f"layers.{c}.bias"][p]
        out[f"layers.{c + 1}.weight"] = out[f"layers.{c + 1}.weight"][:, p]
    return out


def as_numpy(record: ArrayRecord) -> State:
    return {k: v.numpy() for k, v in record_to_state(record).items()}


def initial(strat: PFNMStrategy) -> ArrayRecord:
    return state_to_record(strat.template().state_dict())


def configure(strat: PFNMStrategy, rnd: int, arrays: ArrayRecord) -> dict[int, State]:
    """The round's messages, as the state each client (partition id) is sent."""
    grid = InProcessGrid(ClientApp(), 3)
    messages = strat.configure_train(rnd, arrays, ConfigRecord(), grid)
    return {
        NODES.index(m.metadata.dst_node_id): as_numpy(m.content["arrays"])
        for m in messages
    }


def reply(pid: int, state: State, counts: Sequence[int], n: float = 10.0) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in state.items()}),
            "metrics": MetricRecord(
                {"num-examples": n, "train_loss": 0.5, "label-counts": list(counts)}
            ),
        }
    )
    message = Message(content, dst_node_id=NODES[pid], message_type="train")
    message.metadata.__dict__["_src_node_id"] = NODES[pid]
    return message


def failed(pid: int) -> Message:
    """An error reply from client ``pid`` (its ClientApp raised)."""
    sent = Message(RecordDict(), dst_node_id=NODES[pid], message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{pid}"
    message = Message(Error(code=12, reason="crash"), reply_to=sent)
    message.metadata.__dict__["_src_node_id"] = NODES[pid]
    return message


def net_list(state: State) -> list[np.ndarray]:
    n = len(state) // 2
    return [state[f"layers.{i}.{p}"] for i in range(n) for p in ("weight", "bias")]


COUNTS = [[5, 0, 3], [2, 6, 1], [1, 2, 9]]


# ------------------------------------------------ aggregation against pfnm_mlp
@pytest.mark.parametrize(
    "widths",
    [[[6]] * 3, [[6, 5]] * 3, [[6], [4], [9]], [[6, 5], [3, 8], [7, 2]]],
    ids=["1-hidden", "2-hidden", "1-hidden-unequal", "2-hidden-unequal"],
)
def test_aggregation_is_pfnm_mlp_of_the_replies(widths) -> None:
    strat = make(widths[0], gamma=2.0, missing="zero_precision")
    configure(strat, 1, initial(strat))
    rng = np.random.default_rng(0)
    states = [mlp_state(rng, [D, *w, K], 0.3) for w in widths]
    arrays, metrics = strat.aggregate_train(
        1, [reply(p, s, COUNTS[p]) for p, s in enumerate(states)]
    )
    assert arrays is not None and metrics is not None
    want = pfnm_mlp(
        [net_list(s) for s in states],
        np.array(COUNTS),
        gamma=2.0,
        missing="zero_precision",
        seed=match_seed(0, 1),
    )
    got = net_list(as_numpy(arrays))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, w.astype(np.float32))
    hidden = range(len(widths[0]))
    assert strat.widths == {f"hidden.{c}": want[2 * c].shape[0] for c in hidden}
    for c in hidden:
        assert strat.widths[f"hidden.{c}"] >= max(w[c] for w in widths)
    assert metrics["train_loss"] == pytest.approx(0.5)


@pytest.mark.parametrize("init", ["independent", "reference"])
def test_round_one_sends_each_client_its_own_seeded_model(init) -> None:
    strat = make(client_init=init)
    sent = configure(strat, 1, initial(strat))
    assert sorted(sent) == [0, 1, 2]
    for a, b in itertools.combinations(sent.values(), 2):
        assert not np.allclose(a["layers.0.weight"], b["layers.0.weight"])
    again = configure(make(client_init=init), 1, initial(strat))  # same seeds
    for pid, state in sent.items():
        for k, v in state.items():
            np.testing.assert_array_equal(v, again[pid][k])
    if init == "reference":
        weights = np.concatenate([s["layers.0.weight"].ravel() for s in sent.values()])
        assert abs(weights.std() - 0.1) < 0.01 and abs(weights.mean()) < 0.01
        assert all((s["layers.0.bias"] == np.float32(0.1)).all() for s in sent.values())


def test_shared_init_sends_the_global_model() -> None:
    strat = make(client_init="shared")
    arrays = initial(strat)
    for state in configure(strat, 1, arrays).values():
        for k, v in as_numpy(arrays).items():
            np.testing.assert_array_equal(state[k], v)


# ------------------------------------------------------------- round 2 slices
def test_round_two_slices_are_the_assigned_rows_and_columns() -> None:
    strat = make([6, 5], gamma=3.0)
    configure(strat, 1, initial(strat))
    rng = np.random.default_rng(1)
    widths = [[6, 5], [4, 7], [8, 3]]
    states = [mlp_state(rng, [D, *w, K], 0.5) for w in widths]
    arrays, _ = strat.aggregate_train(
        1, [reply(p, s, COUNTS[p]) for p, s in enumerate(states)]
    )
    assert arrays is not None
    g = as_numpy(arrays)
    assert strat.widths["hidden.0"] >= 8 and strat.widths["hidden.1"] >= 7
    sent = configure(strat, 2, arrays)
    for pid, state in sent.items():
        a0, a1 = strat.assignments[pid]["hidden.0"], strat.assignments[pid]["hidden.1"]
        assert [len(a0), len(a1)] == widths[pid]  # every client keeps its widths
        np.testing.assert_array_equal(
            state["layers.0.weight"], g["layers.0.weight"][a0]
        )
        np.testing.assert_array_equal(state["layers.0.bias"], g["layers.0.bias"][a0])
        np.testing.assert_array_equal(
            state["layers.1.weight"], g["layers.1.weight"][a1][:, a0]
        )
        np.testing.assert_array_equal(state["layers.1.bias"], g["layers.1.bias"][a1])
        np.testing.assert_array_equal(
            state["layers.2.weight"], g["layers.2.weight"][:, a1]
        )
        np.testing.assert_array_equal(state["layers.2.bias"], g["layers.2.bias"])


def test_send_global_gives_every_client_the_whole_model() -> None:
    strat = make(send="global")
    configure(strat, 1, initial(strat))
    rng = np.random.default_rng(2)
    states = [mlp_state(rng, [D, 6, K]) for _ in range(3)]
    arrays, _ = strat.aggregate_train(
        1, [reply(p, s, COUNTS[p]) for p, s in enumerate(states)]
    )
    assert arrays is not None
    for state in configure(strat, 2, arrays).values():
        for k, v in as_numpy(arrays).items():
            np.testing.assert_array_equal(state[k], v)


# ------------------------------------------------ failed and unsampled clients
def copies_of_one_net(seed: int, extra: int = 0) -> tuple[list[State], list[list]]:
    """Three permuted copies of one net; client 2 has ``extra`` units of its own."""
    rng = np.random.default_rng(seed)
    base = mlp_state(rng, [D, 6 + extra, K])
    perms = [[rng.permutation(6 + extra)] for _ in range(3)]
    states = [permuted(base, p) for p in perms]
    for pid in (0, 1):  # clients 0 and 1 lack the extra units
        keep = np.flatnonzero(perms[pid][0] < 6)
        s = states[pid]
        s["layers.0.weight"] = s["layers.0.weight"][keep]
        s["layers.0.bias"] = s["layers.0.bias"][keep]
        s["layers.1.weight"] = s["layers.1.weight"][:, keep]
        perms[pid] = [perms[pid][0][keep]]
    return states, perms


def base_unit_atoms(assignment: np.ndarray, perm: np.ndarray) -> dict[int, int]:
    return {int(b): int(a) for b, a in zip(perm, assignment, strict=True)}


def test_a_failed_client_keeps_its_assignment_in_the_new_numbering() -> None:
    strat = make(sigma0_2=1e8)
    configure(strat, 1, initial(strat))
    states, perms = copies_of_one_net(3)
    counts = [[4, 4, 4]] * 3
    arrays, _ = strat.aggregate_train(
        1, [reply(p, s, counts[p]) for p, s in enumerate(states)]
    )
    assert arrays is not None and strat.widths == {"hidden.0": 6}
    sent = configure(strat, 2, arrays)
    # round 2: client 1 fails, the others send back what they got
    arrays2, _ = strat.aggregate_train(
        2, [reply(0, sent[0], counts[0]), failed(1), reply(2, sent[2], counts[2])]
    )
    assert arrays2 is not None
    atoms = base_unit_atoms(strat.assignments[0]["hidden.0"], perms[0][0])
    for pid in (1, 2):  # carried over (1) and matched (2): same base unit, same atom
        assert (
            base_unit_atoms(strat.assignments[pid]["hidden.0"], perms[pid][0]) == atoms
        )
    third = configure(strat, 3, arrays2)
    g = as_numpy(arrays2)
    a1 = strat.assignments[1]["hidden.0"]
    np.testing.assert_array_equal(third[1]["layers.0.weight"], g["layers.0.weight"][a1])


def test_a_client_wider_than_the_new_global_layer_gets_the_whole_model() -> None:
    strat = make(sigma0_2=1e8, gamma=1e-3)
    configure(strat, 1, initial(strat))
    states, _ = copies_of_one_net(4, extra=2)  # client 2: 8 units, 2 its own
    counts = [[4, 4, 4]] * 3
    arrays, _ = strat.aggregate_train(
        1, [reply(p, s, counts[p]) for p, s in enumerate(states)]
    )
    assert arrays is not None and strat.widths == {"hidden.0": 8}
    sent = configure(strat, 2, arrays)
    arrays2, _ = strat.aggregate_train(
        2, [reply(0, sent[0], counts[0]), reply(1, sent[1], counts[1]), failed(2)]
    )
    assert arrays2 is not None and strat.widths == {"hidden.0": 6}
    assert 2 not in strat.assignments  # 8 units do not fit 6 atoms
    third = configure(strat, 3, arrays2)
    for k, v in as_numpy(arrays2).items():
        np.testing.assert_array_equal(third[2][k], v)


def test_a_client_that_never_trained_gets_the_whole_model_and_joins() -> None:
    strat = make(fraction_train=2 / 3, gamma=5.0)
    rng = np.random.default_rng(5)
    random.seed(1)  # Flower samples cohorts with the global random module
    arrays = initial(strat)
    trained: set[int] = set()
    joined = 0
    for rnd in (1, 2, 3, 4):
        sent = configure(strat, rnd, arrays)
        assert len(sent) == 2
        for pid, state in sent.items():
            if rnd > 1 and pid not in trained:  # the whole global model
                joined += 1
                for k, v in as_numpy(arrays).items():
                    np.testing.assert_array_equal(state[k], v)
        replies = []
        for pid, state in sent.items():
            moved = {
                k: v + rng.normal(0, 0.05, v.shape).astype(np.float32)
                for k, v in state.items()
            }
            replies.append(reply(pid, moved, COUNTS[pid]))
        new, _ = strat.aggregate_train(rnd, replies)
        assert new is not None
        arrays = new
        trained |= set(sent)
        width = strat.widths["hidden.0"]
        for units in strat.assignments.values():
            assert len(np.unique(units["hidden.0"])) == len(units["hidden.0"])
            assert units["hidden.0"].max() < width
        assert set(strat.assignments) == trained
    assert joined == 1 and strat.widths["hidden.0"] > 6


# ------------------------------------------------------------ missing classes
def test_a_class_missing_at_one_client_does_not_move_its_output() -> None:
    rng = np.random.default_rng(6)
    states = [mlp_state(rng, [D, 6, K]) for _ in range(3)]
    outputs = []
    for scale in (1.0, 50.0):
        strat = make(gamma=2.0)
        configure(strat, 1, initial(strat))
        changed = {k: v.copy() for k, v in states[0].items()}
        changed["layers.1.weight"][1] *= scale  # client 0 has no class 1
        changed["layers.1.bias"][1] *= scale
        sent = [changed, states[1], states[2]]
        arrays, _ = strat.aggregate_train(
            1, [reply(p, s, COUNTS[p]) for p, s in enumerate(sent)]
        )
        assert arrays is not None
        outputs.append(as_numpy(arrays))
    for k in outputs[0]:
        np.testing.assert_array_equal(outputs[0][k], outputs[1][k])


def test_a_class_no_client_has_is_weighted_equally_without_dividing_by_zero() -> None:
    strat = make()
    configure(strat, 1, initial(strat))
    rng = np.random.default_rng(7)
    states = [mlp_state(rng, [D, 6, K]) for _ in range(3)]
    counts = [[5, 0, 3], [2, 0, 1], [1, 0, 9]]  # nobody has class 1
    arrays, _ = strat.aggregate_train(
        1, [reply(p, s, counts[p]) for p, s in enumerate(states)]
    )
    assert arrays is not None
    out = as_numpy(arrays)
    assert all(np.isfinite(v).all() for v in out.values())
    # sigma2 = sigma0_2 = 1, shares 1/3 each: b = (0.1 + mean_j b_j) / 2
    mean_bias = np.mean([s["layers.1.bias"][1] for s in states])
    assert out["layers.1.bias"][1] == pytest.approx((0.1 + mean_bias) / 2, rel=1e-6)


# ---------------------------------------------------------- options and models
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"send": "all"}, "strategy.send='all' is not one of: slice, global"),
        ({"client_init": "zeros"}, "client_init='zeros'"),
        ({"missing": "drop"}, "missing='drop'"),
        ({"popularity": "x"}, "popularity='x'"),
        ({"iters": -1}, "iters=-1"),
        ({"max_width_factor": 0.5}, "max_width_factor=0.5"),
        ({"select": True}, "evaluation=federated"),
        ({"sigma2": 0.0}, "sigma2=0.0"),
        ({"select_grid": {"lr": [1.0]}}, "select_grid has key 'lr'"),
    ],
)
def test_bad_options_are_refused(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make(**options)


def cnn_context() -> StrategyContext:
    return StrategyContext(
        num_clients=3,
        model_name="cnn",
        model_kwargs={"input_shape": [1, 8, 8], "num_classes": K},
        num_classes=K,
    )


def test_other_models_go_through_the_general_matcher(monkeypatch) -> None:
    """With a stand-in ``fedsim.matching.match``: the mean, every group reversed."""
    calls = []

    def fake_match(nets, spec, counts, *, template, **hyper):
        assert isinstance(template, torch.nn.Module)
        calls.append((len(nets), counts.copy(), hyper))
        states = [n.state_dict() for n in nets]
        mean = {
            k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]
        }
        return mean, {g.name: [np.arange(g.size)[::-1]] * len(nets) for g in spec}

    monkeypatch.setattr(_pfnm_parts, "spec_match", fake_match)
    strat = STRATEGIES.build("pfnm", context=cnn_context(), gamma=4.0)
    model = strat.template()
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    sent = configure(strat, 1, state_to_record(floats))
    arrays, _ = strat.aggregate_train(
        1, [reply(p, s, COUNTS[p]) for p, s in sent.items()]
    )
    assert arrays is not None and len(calls) == 1
    assert calls[0][0] == 3 and calls[0][2]["gamma"] == 4.0
    np.testing.assert_array_equal(calls[0][1], COUNTS)
    glob = as_numpy(arrays)
    assert set(glob) == set(floats)
    np.testing.assert_allclose(
        glob["fcs.0.weight"],
        np.mean([s["fcs.0.weight"] for s in sent.values()], axis=0),
        rtol=1e-6,
    )
    spec = models.permutation_spec(model)
    reverse = {g.name: np.arange(g.size)[::-1].copy() for g in spec}
    want = permute_state_dict(
        {k: torch.from_numpy(v) for k, v in glob.items()}, spec, reverse
    )
    for state in configure(strat, 2, arrays).values():  # every slice: reversed
        for k, v in want.items():
            np.testing.assert_array_equal(state[k], v.numpy())


# ------------------------------------------------------------ pickling, runs
def test_pickling_mid_run_and_continuing_gives_the_same_models() -> None:
    def rounds(strat: PFNMStrategy, start: int, arrays: ArrayRecord) -> list[State]:
        out = []
        for rnd in range(start, 4):
            rng = np.random.default_rng(rnd)
            sent = configure(strat, rnd, arrays)
            replies = [
                reply(
                    p,
                    {
                        k: v + rng.normal(0, 0.1, v.shape).astype(np.float32)
                        for k, v in s.items()
                    },
                    COUNTS[p],
                )
                for p, s in sorted(sent.items())
            ]
            new, _ = strat.aggregate_train(rnd, replies)
            assert new is not None
            arrays = new
            out.append(as_numpy(arrays))
        return out

    strat = make(gamma=3.0)
    sent = configure(strat, 1, initial(strat))
    first, _ = strat.aggregate_train(
        1, [reply(p, s, COUNTS[p]) for p, s in sorted(sent.items())]
    )
    assert first is not None
    copy = pickle.loads(pickle.dumps(strat))
    for a, b in zip(rounds(strat, 2, first), rounds(copy, 2, first), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


FAST = [
    "dataset=digits",
    "model.hidden=[16]",
    "num_clients=3",
    "strategy=pfnm",
    "client.lr=0.1",
    "client.epochs=2",
    "partition=iid",
]


def test_one_shot_in_process_records_matched_widths(tmp_path: Path) -> None:
    out = tmp_path / "oneshot"
    results = run(
        [
            *FAST,
            "num_rounds=1",
            "simulation.engine=inprocess",
            "strategy.gamma=5.0",
            f"output_dir={out}",
        ],
        progress=lambda r: None,
    )
    data = json.loads((out / "results.json").read_text())
    record = data["rounds"][1]
    assert record["widths"]["hidden.0"] > 16  # gamma=5 opens new units
    width = record["widths"]["hidden.0"]
    assert record["num_params"] == width * 64 + width + 10 * width + 10
    assert results.final["test_accuracy"] > 0.5


def test_resume_after_round_two_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    common = [*FAST, "simulation.engine=inprocess"]
    full = run(
        [*common, "num_rounds=3", f"output_dir={tmp_path / 'full'}"],
        progress=lambda r: None,
    )
    run(
        [*common, "num_rounds=2", f"output_dir={tmp_path / 'cut'}"],
        progress=lambda r: None,
    )
    from fedsim.runner import resume

    resumed = resume(tmp_path / "cut", num_rounds=3, progress=lambda r: None)
    assert resumed.final["test_accuracy"] == full.final["test_accuracy"]
    assert resumed.final["test_loss"] == pytest.approx(
        full.final["test_loss"], rel=1e-9
    )
    assert resumed.rounds[-1]["widths"] == full.rounds[-1]["widths"]


def test_selection_scores_candidates_on_the_clients_held_out_data(
    tmp_path: Path,
) -> None:
    from fedsim.config import compose, from_dictconfig
    from fedsim.node import node_data

    overrides = [
        *FAST,
        "num_rounds=1",
        "simulation.engine=inprocess",
        "evaluation=federated",
        "strategy.select=true",
        "strategy.select_grid={sigma2:[1.0,0.2],sigma0_2:[1.0],gamma:[1.0,5.0]}",
        f"output_dir={tmp_path / 'sel'}",
    ]
    run(overrides, progress=lambda r: None)
    from fedsim.checkpoint import load_checkpoint

    strat = load_checkpoint(tmp_path / "sel").strategy
    assert len(strat.selection) == 4  # the start (1, 1, 1) is in the grid
    best = strat.hyper
    evaluated = [c for c in strat.selection if c.score is not None]
    assert all(c.ratio <= 3.0 for c in evaluated)
    assert max(c.score for c in evaluated) == next(
        c.score for c in strat.selection if c.hyper == best
    )
    # the score is the accuracy over the union of the clients' held-out splits
    exp = from_dictconfig(compose(overrides))
    clients = [strat.local_models[p] for p in sorted(strat.local_models)]
    matched = strat.match_clients(clients, hyper=best, server_round=1)
    model = models.build("mlp", input_shape=[1, 8, 8], num_classes=10, hidden=[16])
    model = models.fit_to_state(
        model, {k: torch.from_numpy(v) for k, v in matched.state.items()}
    )
    model.load_state_dict(
        {k: torch.from_numpy(v.astype(np.float32)) for k, v in matched.state.items()}
    )
    held = [node_data(exp, p) for p in range(3)]
    correct = sum(int((model(h.x_test).argmax(1) == h.y_test).sum()) for h in held)
    total = sum(len(h.y_test) for h in held)
    chosen = next(c for c in strat.selection if c.hyper == best)
    assert chosen.score == pytest.approx(correct / total)


@pytest.mark.ray
def test_ray_simulation_with_three_clients(tmp_path: Path) -> None:
    args = [*FAST, "num_rounds=2", "strategy.gamma=5.0"]
    results = run([*args, f"output_dir={tmp_path / 'ray'}"], progress=lambda r: None)
    data = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert data["status"] == "completed"
    for rec in data["rounds"][1:]:
        assert rec["num_replies"] == 3 and rec["clients"] == [0, 1, 2]
        assert rec["widths"]["hidden.0"] >= 16
    assert data["rounds"][1]["widths"]["hidden.0"] > 16
    assert results.final["test_accuracy"] > data["rounds"][0]["test_accuracy"]
    same = run(
        [*args, "simulation.engine=inprocess", f"output_dir={tmp_path / 'inprocess'}"],
        progress=lambda r: None,
    )
    assert same.final["test_accuracy"] == pytest.approx(results.final["test_accuracy"])
    assert same.rounds[-1]["widths"] == results.rounds[-1]["widths"]


def test_a_model_with_client_local_tensors_is_matched(tmp_path: Path) -> None:
    """GEN's node positions never reach the server; matching must not need them."""
    results = run(
        [
            "model=gen",
            "strategy=pfnm",
            "dataset=digits",
            "num_clients=3",
            "num_rounds=2",
            "simulation.engine=inprocess",
            f"output_dir={tmp_path / 'gen'}",
        ],
        progress=lambda r: None,
    )
    assert results.status == "completed"
    assert [r["num_replies"] for r in results.rounds[1:]] == [3, 3]
