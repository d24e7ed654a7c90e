"""Spec-driven matching: PFNM equivalence, permutation recovery, growth, caps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedsim import models
from fedsim.exceptions import AggregationError, ConfigError
from fedsim.matching import match
from fedsim.matching.match import global_model, slice_for_client
from fedsim.matching.permspec import permute_state_dict, random_permutations
from fedsim.matching.pfnm import pfnm_mlp_with_assignments
from tests.support import (
    SMALL_BUILD,
    example_input,
    outputs,
    perturb_state,
    to_float64,
)

CNN = {"input_shape": (1, 8, 8), "num_classes": 5}


def small_cnn(seed: int, channels=(6, 8), hidden=(10,)) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build("cnn", **CNN, channels=list(channels), hidden=list(hidden))
    model = model.double()
    perturb_state(model, seed)
    return model.eval()


def permuted_copies(
    model: torch.nn.Module, n: int, seed: int, skip: set[str] = frozenset()
) -> tuple[list[torch.nn.Module], list[dict[str, np.ndarray]]]:
    """``n`` copies of ``model``, each with every group (but ``skip``) reordered."""
    spec = models.permutation_spec(model)
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    clients, perms = [], []
    for _ in range(n):
        perm = {
            g: p for g, p in random_permutations(spec, rng).items() if g not in skip
        }
        clone = copy.deepcopy(model)
        clone.load_state_dict(permute_state_dict(state, spec, perm))
        clients.append(clone)
        perms.append(perm)
    return clients, perms


def max_diff(a: torch.nn.Module, b: torch.nn.Module, x: object) -> float:
    with torch.no_grad():
        return max(
            float((p - q).abs().max())
            for p, q in zip(outputs(a, x), outputs(b, x), strict=True)
        )


# ---------------------------------------------------------------- PFNM on MLPs
@pytest.mark.parametrize("missing", ["zero_precision", "patch"])
@pytest.mark.parametrize("gamma", [1.0, 50.0])
def test_mlp_gives_exactly_pfnm_mlp(missing: str, gamma: float) -> None:
    torch.manual_seed(0)
    widths = [[20, 15, 9], [18, 15, 10], [20, 12, 9], [7, 8, 9]]
    nets = [
        models.build("mlp", input_shape=(1, 4, 4), num_classes=5, hidden=w).double()
        for w in widths
    ]
    counts = np.random.default_rng(1).integers(0, 30, (4, 5))
    counts[:, 0] += 1
    arrays = [[v.numpy() for v in net.state_dict().values()] for net in nets]
    ref = pfnm_mlp_with_assignments(
        arrays, counts, missing=missing, gamma=gamma, sigma0_2=3.0, seed=3
    )
    state, found = match(
        nets, class_counts=counts, missing=missing, gamma=gamma, sigma0_2=3.0, seed=3
    )
    if gamma > 1:
        assert ref.widths[0] > 20  # the case exercises growth
    assert list(state) == [k for k in nets[0].state_dict()]
    for want, got in zip(ref.weights, state.values(), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-13)
    for c in range(3):
        for a, b in zip(ref.assignments[c], found[f"hidden.{c}"], strict=True):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------- permutation recovery
def test_cnn_with_batchnorm_recovers_permuted_copies() -> None:
    original = small_cnn(0)
    clients, perms = permuted_copies(original, 4, seed=1)
    counts = np.full((4, 5), 10.0)
    state, found = match(clients, class_counts=counts, sigma0_2=1e8)
    spec = models.permutation_spec(original)
    for group in spec:
        # unit u of client j is original unit perms[j][u]: every client must send
        # each original unit to the same atom
        atom_of = []
        for j, perm in enumerate(perms):
            inverse = np.empty(group.size, dtype=np.int64)
            inverse[perm[group.name]] = found[group.name][j]
            atom_of.append(inverse)
        assert all(np.array_equal(a, atom_of[0]) for a in atom_of)
        assert sorted(atom_of[0]) == list(range(group.size))  # no growth
    merged = global_model(original, state).eval()
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    assert max_diff(merged, original, x) < 1e-6
    # BatchNorm running statistics come back in the same global order
    atoms = np.empty(8, dtype=np.int64)
    atoms[perms[0]["conv.1"]] = found["conv.1"][0]
    for stat in ("running_mean", "running_var"):
        want = original.state_dict()[f"bns.1.{stat}"].numpy()
        got = state[f"bns.1.{stat}"].numpy()[atoms]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # slicing the global model by an assignment gives that client back
    for j, client in enumerate(clients):
        own = slice_for_client(state, models.permutation_spec(merged), found, j)
        for key, value in client.state_dict().items():
            np.testing.assert_allclose(own[key].numpy(), value.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_recovers_permuted_copies(name: str) -> None:
    torch.manual_seed(0)
    original = models.build(name, **SMALL_BUILD).double()
    perturb_state(original)
    original.eval()
    roles = models.tensor_roles(original)
    spec = models.permutation_spec(original)
    # a group that moves only clients' own ("local") tensors is invisible to the
    # server (GEN's node positions): clients never disagree about it
    local_only = {
        g.name for g in spec if all(roles[r.tensor] == "local" for r in g.axes)
    }
    clients, _ = permuted_copies(original, 3, seed=5, skip=local_only)
    state, found = match(
        clients, class_counts=np.ones((3, SMALL_BUILD["num_classes"])), sigma0_2=1e8
    )
    merged = global_model(original, state).double().eval()
    assert models.permutation_spec(merged).widths() == spec.widths()
    x = to_float64(example_input(original, batch=5))
    with torch.no_grad():
        scale = max(float(t.abs().max()) for t in outputs(original, x))
    assert max_diff(merged, original, x) < 1e-6 * (1.0 + scale)
    # slicing the global model by each client's assignment gives that client
    # back, unit-index tensors (selective pointers, Lego indices) included
    merged_spec = models.permutation_spec(merged)
    for j, client in enumerate(clients):
        own = slice_for_client(state, merged_spec, found, j)
        for key, value in client.state_dict().items():
            if roles[key] == "local":
                continue
            if value.is_floating_point():
                torch.testing.assert_close(
                    own[key].double(), value, atol=1e-6, rtol=1e-6
                )
            else:
                assert torch.equal(own[key], value), key


# ------------------------------------------------------------------- growth
def test_disjoint_filters_grow_the_layer_with_closed_form_atoms() -> None:
    a = small_cnn(3, channels=(4,), hidden=())
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.convs[0].weight += 5.0  # every filter far from all of a's
        b.bns[0].running_mean += 1.0
    counts = np.array([[3.0, 1, 0, 2, 2], [1.0, 1, 4, 0, 2]])
    state, found = match([a, b], class_counts=counts, gamma=1.0)
    # no filter is shared: eight atoms with one member each
    both = np.concatenate(found["conv.0"]).tolist()
    assert sorted(both) == list(range(8))
    merged = global_model(a, state)
    assert merged.channels == [8]
    share = counts / counts.sum(0)
    sa, sb = a.state_dict(), b.state_dict()
    # sigma2 = sigma0_2 = 1, one member per atom: (p0 mu0 + v) / (p0 + 1)
    for client, atoms, own in (
        (0, found["conv.0"][0], sa),
        (1, found["conv.0"][1], sb),
    ):
        for u, atom in enumerate(atoms):
            w = state["convs.0.weight"][atom].numpy()
            np.testing.assert_allclose(w, own["convs.0.weight"][u].numpy() / 2)
            np.testing.assert_allclose(
                state["bns.0.bias"][atom].item(),
                (0.1 + own["bns.0.bias"][u].item()) / 2,
            )
            np.testing.assert_allclose(  # buffers are carried, not shrunk
                state["bns.0.running_mean"][atom].item(),
                own["bns.0.running_mean"][u].item(),
            )
            cols = slice(16 * atom, 16 * atom + 16)  # a 4x4 map per channel
            head = state["fcs.0.weight"][:, cols].numpy()
            mine = own["fcs.0.weight"][:, 16 * u : 16 * u + 16].numpy()
            pi = share[client][:, None]
            np.testing.assert_allclose(head, pi * mine / (1 + pi))
    bias = (0.1 + (share * np.stack([sa["fcs.0.bias"], sb["fcs.0.bias"]])).sum(0)) / 2
    np.testing.assert_allclose(state["fcs.0.bias"].numpy(), bias)


def test_max_growth_caps_every_growable_group() -> None:
    clients = [small_cnn(10 + j, channels=(4, 6), hidden=(5,)) for j in range(4)]
    with torch.no_grad():  # unrelated clients: every unit far from the others
        for j, c in enumerate(clients):
            for p in c.parameters():
                p.add_(3.0 * j)
    free, _ = match(clients, class_counts=np.ones((4, 5)), gamma=1e6, iters=1)
    capped, found = match(
        clients, class_counts=np.ones((4, 5)), gamma=1e6, iters=1, max_growth=1.5
    )
    grown = models.permutation_spec(global_model(clients[0], free)).widths()
    widths = models.permutation_spec(global_model(clients[0], capped)).widths()
    for group, largest in (("conv.0", 4), ("conv.1", 6), ("hidden.0", 5)):
        assert grown[group] > int(1.5 * largest)  # without the cap it grows past it
        assert largest <= widths[group] <= int(1.5 * largest)
        for a in found[group]:
            assert len(set(a.tolist())) == len(a) and a.max() < widths[group]


# ------------------------------------------------------ different widths, BN
def test_a_narrower_client_matches_into_the_wider_one() -> None:
    wide = small_cnn(4, channels=(6, 8), hidden=(10,))
    spec = models.permutation_spec(wide)
    keep = {"conv.0": [0, 2, 3, 5], "conv.1": [1, 2, 4, 5, 7], "hidden.0": [0, 3, 4, 9]}
    moves = {g: [np.asarray(u)] for g, u in keep.items()}
    state = slice_for_client(wide.state_dict(), spec, moves, 0)
    narrow = small_cnn(5, channels=(4, 5), hidden=(4,))
    narrow.load_state_dict(state)
    narrow_perm = {
        g: np.random.default_rng(6).permutation(len(u)) for g, u in keep.items()
    }
    shuffled = permute_state_dict(
        narrow.state_dict(), models.permutation_spec(narrow), narrow_perm
    )
    narrow.load_state_dict(shuffled)
    merged_state, found = match(
        [narrow, wide], class_counts=np.ones((2, 5)), sigma0_2=1e8
    )
    merged = global_model(wide, merged_state)
    assert models.permutation_spec(merged).widths() == spec.widths()
    for group, units in keep.items():
        wide_atoms = found[group][1]
        narrow_units = np.asarray(units)[narrow_perm[group]]
        np.testing.assert_array_equal(found[group][0], wide_atoms[narrow_units])
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    assert max_diff(merged.double().eval(), wide, x) < 1e-6


def test_batchnorm_statistics_are_example_weighted_by_assignment() -> None:
    a = small_cnn(7, channels=(4,), hidden=())
    b, perms = permuted_copies(a, 1, seed=8)
    b = b[0]
    with torch.no_grad():
        b.bns[0].running_mean += 2.0
        b.bns[0].running_var *= 3.0
    counts = np.array([[30.0, 0, 0, 0, 0], [0, 0, 10.0, 0, 0]])  # 30 vs 10 examples
    state, found = match([a, b], class_counts=counts, sigma0_2=1e8)
    inverse = np.empty(4, dtype=np.int64)
    inverse[perms[0]["conv.0"]] = np.arange(4)  # b's unit of each original unit
    for stat in ("running_mean", "running_var"):
        va = a.state_dict()[f"bns.0.{stat}"].numpy()
        vb = b.state_dict()[f"bns.0.{stat}"].numpy()[inverse]
        got = state[f"bns.0.{stat}"].numpy()[found["conv.0"][0]]
        np.testing.assert_allclose(got, (30 * va + 10 * vb) / 40, rtol=1e-12)
    # the buffers played no part in the matching: the weights still line up
    np.testing.assert_array_equal(found["conv.0"][1][inverse], found["conv.0"][0])
    assert (
        state["bns.0.num_batches_tracked"]
        == a.state_dict()["bns.0.num_batches_tracked"]
    )


# ------------------------------------------------------------------ bad input
def test_bad_inputs_fail_with_one_sentence() -> None:
    net = small_cnn(0)
    with pytest.raises(ConfigError, match="order"):
        match([net, net], order="sideways")
    with pytest.raises(ConfigError, match="max_growth"):
        match([net, net], max_growth=0.5)
    with pytest.raises(ConfigError, match="sigma2"):
        match([net, net], sigma2=0.0)
    with pytest.raises(AggregationError, match="spec"):
        match([net.state_dict(), net.state_dict()])
    broken = copy.deepcopy(net)
    with torch.no_grad():
        broken.fcs[0].weight[0, 0] = float("nan")
    with pytest.raises(AggregationError, match="NaN"):
        match([net, broken])
    with pytest.raises(AggregationError, match="class_counts"):
        match([net, net], class_counts=np.ones((3, 5)))
    mlp = models.build("mlp", **CNN, hidden=[4])
    with pytest.raises(AggregationError):
        match([net.float(), mlp])
