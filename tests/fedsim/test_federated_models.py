"""One small in-process federated run per model family of the architecture
library: the results records, and the server-owned and client-local tensors
(``tensor_roles``) staying what the model says they are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from clients.client_app import LOCAL_STATE_KEY, build_client_app
from fedsim.config import compose, from_dictconfig
from fedsim.inprocess import InProcessGrid
from fedsim.models.nasbench import sample_specs
from fedsim.params import record_to_state
from fedsim.results import Results
from fedsim.runner import open_results
from fedsim.server import ServerLoop
from fedsim.server_app import prepare

FAST = [
    "dataset=digits",
    "partition=iid",
    "num_clients=2",
    "num_rounds=2",
    "simulation.engine=inprocess",
    "client.batch_size=64",
]

Tensors = dict[str, torch.Tensor]


@dataclass
class Run:
    """A finished run: its records, the global model's state after every round
    (index 0 = the initial model) and the in-process grid (the clients)."""

    results: Results
    states: list[Tensors]
    loop: ServerLoop
    grid: InProcessGrid

    def local_state(self, partition_id: int) -> Tensors:
        context = self.grid.contexts[self.grid.node_ids[partition_id]]
        record = context.state.get(LOCAL_STATE_KEY)
        return {} if record is None else record_to_state(record)  # type: ignore[arg-type]


def _run(tmp_path: Path, *overrides: str) -> Run:
    exp = from_dictconfig(compose([*FAST, *overrides, f"output_dir={tmp_path}/run"]))
    prepared = prepare(exp)
    results = open_results(exp, prepared.splits)
    grid = InProcessGrid(build_client_app(exp), exp.num_clients)
    states: list[Tensors] = []

    def snapshot(record: dict[str, Any]) -> None:
        states.append({k: v.clone() for k, v in loop.model.state_dict().items()})

    loop = ServerLoop(
        exp, prepared.strategy, prepared.splits, prepared.model, results, snapshot
    )
    loop.run(grid)
    return Run(results, states, loop, grid)


def _check_records(run: Run, metric: str = "test_accuracy") -> list[float]:
    rounds = run.results.rounds
    assert run.results.status == "completed"
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["num_replies"] == 2 and record["num_rejected"] == 0
        assert record["num_failures"] == 0
        assert torch.isfinite(torch.tensor(record["train_loss"]))
    values = [float(r[metric]) for r in rounds]
    assert all(torch.isfinite(torch.tensor(values)))
    assert len(run.states) == 3
    return values


def test_lego_cnn_masks_are_settled_by_the_server_after_round_one(
    tmp_path: Path,
) -> None:
    run = _run(
        tmp_path,
        "model=lego_cnn",
        "model.widths=[8,M,8]",
        "model.stem=8",
        "model.mask_rounds=1",
    )
    _check_records(run)
    layers = [k[: -len(".frozen")] for k in run.states[0] if k.endswith(".frozen")]
    assert layers
    for name in layers:
        assert not bool(run.states[0][f"{name}.frozen"].any())
        first = run.states[1]
        assert bool(first[f"{name}.frozen"].all())
        index = first[f"{name}.frozen_index"]
        assert not index.is_floating_point()
        legos = first[f"{name}.lego"].shape[0]
        assert int(index.min()) >= 0 and int(index.max()) < legos
        # frozen at the argmax of the averaged selection logits (a weighted vote)
        assert torch.equal(index, first[f"{name}.logits"].argmax(2))
        assert torch.equal(run.states[2][f"{name}.frozen_index"], index)
        assert bool(run.states[2][f"{name}.frozen"].all())


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=selective_resnet", "model.added=[8]", "model.bottleneck=[[[4,4]]]"),
        (
            "model=selective_densenet",
            "model.growth=[[4,4]]",
            "model.bottleneck=[[8,8]]",
            "model.stem=8",
        ),
    ],
    ids=["resnet", "densenet"],
)
def test_selective_gates_and_pointers_stay_a_valid_selection(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    run = _run(tmp_path, *overrides)
    _check_records(run)
    roles = run.loop.roles
    gates = [k for k, role in roles.items() if role == "server" and k.endswith(".g")]
    assert gates
    for state in run.states:
        for key in gates:
            assert set(state[key].unique().tolist()) <= {0.0, 1.0}
    for _, layer in run.loop.model.selective_layers():  # type: ignore[operator]
        layer.check_selection()
    # round 2 of 2 is past the re-allocation schedule: the server left the gates
    # and pointers alone, and the clients' copies never reached the global model
    server_keys = [k for k, role in roles.items() if role == "server"]
    for key in server_keys:
        assert torch.equal(run.states[2][key], run.states[1][key]), key


def test_etn_trains_federatedly(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        "model=etn",
        "model.ets=[rotation_scale]",
        "model.nf=[[8,8]]",
        "model.classifier_channels=[8,16]",
    )
    accuracy = _check_records(run)
    assert accuracy[-1] > accuracy[0]
    assert set(run.loop.roles.values()) == {"average"}  # nothing server-owned


def test_groupsort_stays_lipschitz_after_averaging(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        "model=groupsort_mlp",
        "model.hidden=[32,32]",
        "model.lipschitz=2.0",
        "task.certify_eps=0.1",
    )
    accuracy = _check_records(run)
    assert accuracy[-1] > 0.5
    certified = [r["test_certified_accuracy"] for r in run.results.rounds]
    assert all(c <= a for c, a in zip(certified, accuracy, strict=True))
    model = run.loop.model.double()
    x = torch.randn(256, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    out = model(x)
    for k in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)
        assert float(g.flatten(1).norm(dim=1).max()) <= 2.0 * (1 + 1e-3)


def test_gen_positions_stay_with_each_client_when_local(tmp_path: Path) -> None:
    run = _run(tmp_path, "model=gen", "model.grid=3", "model.positions=local")
    _check_records(run)
    assert run.loop.roles["positions"] == "local"
    initial = run.states[0]["positions"]
    for state in run.states:  # the server never touches the global copy
        assert torch.equal(state["positions"], initial)
    own = [run.local_state(i)["positions"] for i in range(2)]
    assert set(run.local_state(0)) == {"positions"}
    for positions in own:  # each client trained its own layout
        assert not torch.equal(positions, initial)
    assert not torch.equal(own[0], own[1])


def test_gen_positions_owned_by_the_server_are_shared_and_fixed(
    tmp_path: Path,
) -> None:
    run = _run(tmp_path, "model=gen", "model.grid=3", "model.positions=server")
    _check_records(run)
    initial = run.states[0]["positions"]
    assert all(torch.equal(s["positions"], initial) for s in run.states)
    assert run.local_state(0) == {} and run.local_state(1) == {}
    # everything else was averaged and moved
    key = "decoder.layers.0.weight"
    assert not torch.equal(run.states[2][key], run.states[0][key])


def test_gen_learns_poisson_fields_federatedly(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        "dataset=poisson",
        "dataset.num_problems=80",
        "dataset.grid=6",
        "task=regression",
        "model=gen",
        "model.grid=3",
        "client=adam",
        "client.lr=0.003",
        "client.epochs=3",
        "client.batch_size=8",
    )
    mse = _check_records(run, "test_mse")
    assert run.results.primary == "mse" and run.results.higher_is_better is False
    assert mse[-1] < mse[0]
    assert (tmp_path / "run" / "mse.png").is_file()


def test_nasbench_sampled_cell_trains_federatedly(tmp_path: Path) -> None:
    run = _run(
        tmp_path,
        "model=nasbench",
        "model.sample=1",
        "model.stem_channels=8",
        "model.channels=8",
        "model.num_stacks=2",
        "model.bn_momentum=0.1",
    )
    accuracy = _check_records(run)
    assert accuracy[-1] > accuracy[0]
    assert run.loop.model.spec == sample_specs(2, 0)[1]
