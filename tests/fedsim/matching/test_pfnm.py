"""PFNM matching: closed forms, brute-force oracles and invariants (spec section 8)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from fedsim.exceptions import AggregationError, ConfigError
from fedsim.matching.bbp import (
    MatchResult,
    match_units,
    reference_max_new,
    rematch_scores,
)
from fedsim.matching.pfnm import pfnm_mlp, pfnm_mlp_with_assignments
from tests.fedsim.matching.pfnm_oracle import (
    OracleState,
    entry_score,
    loop_scores,
    new_slot_score,
    oracle_match,
    oracle_pfnm_mlp,
)

Net = list[np.ndarray]


# ------------------------------------------------------------------- helpers
def random_mlp(
    rng: np.random.Generator, sizes: Sequence[int], scale: float = 0.1
) -> Net:
    """Weights (out, in) and biases of an MLP with layer sizes ``sizes``."""
    net: Net = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        net += [rng.normal(0, scale, (fan_out, fan_in)), rng.normal(0, scale, fan_out)]
    return net


def permuted(net: Net, perms: Sequence[np.ndarray]) -> Net:
    """The same function with hidden layer ``c`` reordered as ``perms[c]``."""
    out = [w.copy() for w in net]
    for c, p in enumerate(perms):
        out[2 * c] = out[2 * c][p]
        out[2 * c + 1] = out[2 * c + 1][p]
        out[2 * c + 2] = out[2 * c + 2][:, p]
    return out


def forward(net: Net, x: np.ndarray) -> np.ndarray:
    for i in range(0, len(net) - 2, 2):
        x = np.maximum(x @ net[i].T + net[i + 1], 0.0)
    return x @ net[-2].T + net[-1]


def atom_of_unit(assignment: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """``out[u]``: global atom of original unit ``u`` of a client permuted ``perm``."""
    out = np.empty_like(assignment)
    out[perm] = assignment
    return out


def same_assignments(a: Sequence[Sequence[int]], b: Sequence[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x), y) for x, y in zip(a, b, strict=True)
    )


def check_partition(res: MatchResult, sizes: Sequence[int]) -> None:
    """Every unit placed once, injective per client, counts consistent and > 0."""
    seen = np.zeros(res.width, dtype=np.int64)
    for a, size in zip(res.assignments, sizes, strict=True):
        assert a.shape == (size,)
        assert len(np.unique(a)) == size
        assert a.min() >= 0 and a.max() < res.width
        seen[a] += 1
    np.testing.assert_array_equal(seen, res.counts)
    assert res.counts.min() >= 1
    assert res.counts.sum() == sum(sizes)


# --------------------------------------------- 1. permutation recovery (§8.1)
@pytest.fixture(scope="module")
def copies() -> tuple[Net, list[np.ndarray], list[Net]]:
    rng = np.random.default_rng(0)
    net = random_mlp(rng, [784, 100, 10])
    perms = [rng.permutation(100) for _ in range(5)]
    return net, perms, [permuted(net, [p]) for p in perms]


def test_vague_prior_recovers_the_network_up_to_one_permutation(copies) -> None:
    net, perms, clients = copies
    res = pfnm_mlp_with_assignments(clients, np.full((5, 10), 7), sigma0_2=1e8)
    assert res.widths == [100]
    # one global order: every client's permutation is inverted onto it
    glob = atom_of_unit(res.assignments[0][0], perms[0])
    for a, p in zip(res.assignments[0], perms, strict=True):
        np.testing.assert_array_equal(atom_of_unit(a, p), glob)
    w = res.weights
    back = np.argsort(glob)  # original unit of each global atom
    np.testing.assert_allclose(w[0], net[0][back], atol=1e-6)
    np.testing.assert_allclose(w[1], net[1][back], atol=1e-6)
    np.testing.assert_allclose(w[2], net[2][:, back], atol=1e-6)
    np.testing.assert_allclose(w[3], net[3], atol=1e-6)
    x = np.random.default_rng(1).normal(size=(64, 784))
    np.testing.assert_allclose(forward(w, x), forward(net, x), atol=1e-6)


def test_unit_variances_give_the_closed_forms(copies) -> None:
    net, perms, clients = copies
    res = pfnm_mlp_with_assignments(clients, np.full((5, 10), 3))
    assert res.widths == [100]
    back = np.argsort(atom_of_unit(res.assignments[0][0], perms[0]))
    n = 5
    w = res.weights
    np.testing.assert_allclose(w[0], n / (n + 1) * net[0][back], rtol=1e-12)
    np.testing.assert_allclose(w[1], (0.1 + n * net[1][back]) / (n + 1), rtol=1e-12)
    np.testing.assert_allclose(w[2], net[2][:, back] / 2, rtol=1e-12)
    np.testing.assert_allclose(w[3], (0.1 + net[3]) / 2, rtol=1e-12)


# ------------------------------------------------ 2. disjoint clients (§8.2)
def test_disjoint_clients_each_open_their_own_atoms() -> None:
    rng = np.random.default_rng(2)
    v = [5.0 + rng.normal(size=(20, 50)), -5.0 + rng.normal(size=(30, 50))]
    s = [np.full(50, 2.0), np.full(50, 0.5)]
    mu0, p0 = np.full(50, 0.3), np.full(50, 1.5)
    res = match_units(v, s, mu0, p0, gamma=1.0, iters=3, rng=rng)
    assert res.width == 50
    np.testing.assert_array_equal(res.counts, np.ones(50))
    for vj, sj, a in zip(v, s, res.assignments, strict=True):
        expected = (p0 * mu0 + sj * vj) / (p0 + sj)
        np.testing.assert_allclose(res.atoms[a], expected, rtol=1e-12)
        np.testing.assert_allclose(
            res.precisions[a], np.broadcast_to(p0 + sj, vj.shape)
        )


# ----------------------------------------------------- 3. score oracle (§8.3)
def crowd(rng: np.random.Generator, n_clients: int, dim: int, constant: bool):
    """Noisy copies of 12 prototypes (so counts pass the cap of 10) plus odd units.

    With ``constant`` every entry has the same precision pattern, so the matcher
    factors them out of the GEMM; otherwise each entry has its own.
    """
    proto = rng.normal(size=(12, dim))
    v, s = [], []
    for _ in range(n_clients):
        pick = rng.choice(12, size=int(rng.integers(6, 12)), replace=False)
        units = proto[pick] + rng.normal(0, 0.05, (len(pick), dim))
        v.append(np.vstack([units, rng.normal(0, 3, (2, dim))]))
        s.append(
            np.full(dim, rng.uniform(0.5, 2)) if constant else rng.uniform(0, 2, dim)
        )
    p0 = np.full(dim, 0.6) if constant else rng.uniform(0.2, 1.0, dim)
    return v, s, rng.normal(0, 0.1, dim), p0


def oracle_state(res, v, s, mu0, p0, client: int) -> OracleState:
    """The oracle's atoms rebuilt from ``res`` with ``client`` removed."""
    _, _, _, assign, _ = oracle_match(
        v,
        s,
        mu0,
        p0,
        gamma=1.0,
        iters=0,
        rng=np.random.default_rng(),
        init=res.assignments,
    )
    state = OracleState(p0 * mu0, p0, len(mu0))
    state.h = np.outer(np.ones(res.width), p0 * mu0)
    state.tau = np.outer(np.ones(res.width), p0)
    state.counts = [0] * res.width
    for j, a in enumerate(assign):
        for u, i in enumerate(a):
            state.h[i] += s[j] * v[j][u]
            state.tau[i] += s[j]
            state.counts[i] += 1
    state.remove_client(client, s[client] * v[client], s[client], assign)
    return state


@pytest.mark.parametrize("constant", [True, False], ids=["factored", "general"])
@pytest.mark.parametrize("popularity", ["reference", "consistent"])
def test_vectorised_scores_equal_the_loop_oracle(constant: bool, popularity) -> None:
    rng = np.random.default_rng(3)
    v, s, mu0, p0 = crowd(rng, 14, 48, constant)
    res = match_units(v, s, mu0, p0, gamma=2.0, iters=1, rng=rng, popularity=popularity)
    assert res.counts.max() > 10  # the popularity cap is exercised
    for client in (0, 7):
        fast = rematch_scores(
            res, v, s, mu0, p0, client, gamma=2.0, popularity=popularity
        )
        state = oracle_state(res, v, s, mu0, p0, client)
        n_atoms, n_local = len(state.h), len(v[client])
        k_new = min(n_local, max(700 - n_atoms, 1))
        assert fast.shape == (n_local, n_atoms + k_new)
        x = s[client] * v[client]
        slow = loop_scores(
            x, s[client], state.h, state.tau, state.counts, p0 * mu0, p0,
            n_clients=14, gamma=2.0, n_new=k_new, popularity=popularity,
        )  # fmt: skip
        np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-9)
        # a scalar double loop over a corner of the matrix, straight from §1
        for u, i in itertools.product(range(3), range(n_atoms)):
            want = entry_score(
                x[u],
                s[client],
                state.h[i],
                state.tau[i],
                state.counts[i],
                14,
                popularity,
            )
            assert math.isclose(fast[u, i], want, rel_tol=1e-10, abs_tol=1e-9)
        for u, k in itertools.product(range(3), range(1, k_new + 1)):
            want = new_slot_score(x[u], s[client], p0 * mu0, p0, k, 2.0, 14)
            assert math.isclose(fast[u, n_atoms + k - 1], want, rel_tol=1e-12)


def test_new_slot_columns_follow_the_700_rule() -> None:
    rng = np.random.default_rng(4)
    big = rng.normal(size=(690, 3))
    small = big[:30] + 0.01
    v, s = [big, small], [np.ones(3), np.ones(3)]
    res = match_units(v, s, np.zeros(3), np.ones(3), gamma=1.0, iters=0, rng=rng)
    assert res.width == 690
    # client 1 against 690 atoms: min(30, 700 - 690) = 10 slots, -2 log k apart
    score = rematch_scores(res, v, s, np.zeros(3), np.ones(3), 1, gamma=1.0)
    assert score.shape == (30, 700)
    steps = -2 * np.log(np.arange(2, 11) / np.arange(1, 10))
    np.testing.assert_allclose(np.diff(score[:, 690:], axis=1), np.tile(steps, (30, 1)))
    # a width of 700 or more leaves one slot
    wide = [rng.normal(size=(705, 3)), small]
    res = match_units(wide, s, np.zeros(3), np.ones(3), gamma=1.0, iters=0, rng=rng)
    assert rematch_scores(
        res, wide, s, np.zeros(3), np.ones(3), 1, gamma=1.0
    ).shape == (30, 706)
    assert reference_max_new(30, 705) == 1 and reference_max_new(30, 100) == 30


def test_the_assignment_maximises_the_total_score() -> None:
    rng = np.random.default_rng(5)
    v = [rng.normal(size=(5, 6)), rng.normal(size=(3, 6))]
    s = [np.ones(6), np.full(6, 0.7)]
    res = match_units(v, s, np.zeros(6), np.ones(6), gamma=1.0, iters=0, rng=rng)
    score = rematch_scores(res, v, s, np.zeros(6), np.ones(6), 1, gamma=1.0)
    n_local, n_cols = score.shape
    best = max(
        sum(score[u, c] for u, c in enumerate(cols))
        for cols in itertools.permutations(range(n_cols), n_local)
    )
    rows, cols = linear_sum_assignment(-score)
    assert math.isclose(score[rows, cols].sum(), best, rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_fast_matcher_makes_the_oracle_assignments(seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    v, s, mu0, p0 = crowd(rng, 8, 40 if seed % 2 else 36, constant=seed < 2)
    opts = {
        "gamma": [0.7, 30.0, 3.0, 1e4][seed],
        "iters": 3,
        "popularity": ["reference", "consistent"][seed % 2],
        "max_atoms": [None, 16][seed // 2],
    }
    fast = match_units(v, s, mu0, p0, rng=np.random.default_rng(seed), **opts)
    atoms, tau, counts, assign, history = oracle_match(
        v, s, mu0, p0, rng=np.random.default_rng(seed), **opts
    )
    assert same_assignments(assign, fast.assignments)
    np.testing.assert_array_equal(fast.counts, counts)
    np.testing.assert_allclose(fast.atoms, atoms, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fast.precisions, tau, rtol=1e-12)
    np.testing.assert_array_equal(fast.history, np.array(history))


def test_fast_pfnm_equals_the_oracle_on_a_two_layer_net() -> None:
    rng = np.random.default_rng(6)
    nets = [random_mlp(rng, [30, 20, 15, 5], scale=0.3) for _ in range(4)]
    counts = rng.integers(0, 20, (4, 5)) + np.eye(4, 5, dtype=int)
    first_layer = {}
    for missing in ("patch", "zero_precision"):
        res = pfnm_mlp_with_assignments(nets, counts, gamma=3.0, missing=missing)
        weights, assign = oracle_pfnm_mlp(nets, counts, gamma=3.0, missing=missing)
        for layer, want in zip(res.assignments, assign, strict=True):
            assert same_assignments(want, layer)
        for got, want in zip(res.weights, weights, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        first_layer[missing] = res.weights[0]
    # the two ways of observing missing entries do give different matches
    assert not np.allclose(first_layer["patch"], first_layer["zero_precision"])


# ------------------------------------------------------- 4. gamma extremes (§8.4)
def test_tiny_gamma_opens_no_atom_beyond_the_seed() -> None:
    rng = np.random.default_rng(7)
    v = [rng.normal(0, 1.5, (n, 10)) for n in (40, 70, 55, 70)]
    s = [np.ones(10)] * 4
    res = match_units(v, s, np.zeros(10), np.ones(10), gamma=1e-12, iters=5, rng=rng)
    assert res.width == 70
    assert res.history[:, 1].sum() == 0
    # the same data opens atoms at gamma = 1
    res = match_units(v, s, np.zeros(10), np.ones(10), gamma=1.0, iters=5, rng=rng)
    assert res.width > 70


def test_huge_gamma_stops_near_700_with_one_new_atom_per_update() -> None:
    rng = np.random.default_rng(8)
    v = [rng.normal(size=(100, 8)) for _ in range(10)]
    s = [np.ones(8)] * 10
    res = match_units(
        v, s, np.zeros(8), np.ones(8), gamma=1e12, iters=5, rng=np.random.default_rng(0)
    )
    check_partition(res, [100] * 10)
    _, _, _, assign, history = oracle_match(
        v, s, np.zeros(8), np.ones(8), gamma=1e12, iters=5, rng=np.random.default_rng(0)
    )
    assert same_assignments(assign, res.assignments)
    np.testing.assert_array_equal(res.history, np.array(history))
    assert 700 <= res.width <= 710
    before, opened = res.history.T
    assert (opened[before >= 700] <= 1).all()
    # below 700 every offered slot is taken
    np.testing.assert_array_equal(
        opened[before < 700], np.minimum(100, 700 - before[before < 700])
    )


# ------------------------------------------------------ 5. unequal sizes (§8.5)
def test_unequal_sizes_are_placed_injectively() -> None:
    rng = np.random.default_rng(9)
    proto = rng.normal(size=(160, 12))
    sizes = [50, 100, 150]
    v = [
        proto[rng.choice(160, n, replace=False)] + rng.normal(0, 0.3, (n, 12))
        for n in sizes
    ]
    s = [np.ones(12)] * 3
    seeded = match_units(v, s, np.zeros(12), np.ones(12), gamma=1.0, iters=0, rng=rng)
    np.testing.assert_array_equal(seeded.assignments[2], np.arange(150))
    assert seeded.history[0, 0] == 150
    res = match_units(v, s, np.zeros(12), np.ones(12), gamma=1.0, iters=5, rng=rng)
    check_partition(res, sizes)
    assert res.width >= 150


def test_ties_in_size_seed_with_the_lowest_index() -> None:
    rng = np.random.default_rng(11)
    v = [rng.normal(size=(n, 6)) for n in (30, 40, 40)]
    s = [np.ones(6)] * 3
    res = match_units(v, s, np.zeros(6), np.ones(6), gamma=1.0, iters=0, rng=rng)
    np.testing.assert_array_equal(res.assignments[1], np.arange(40))
    assert not np.array_equal(res.assignments[2], np.arange(40))


# ------------------------------------------------ 6. noisy permuted copies (§8.6)
def test_noisy_copies_match_their_true_units_and_keep_the_accuracy() -> None:
    rng = np.random.default_rng(12)
    teacher = random_mlp(rng, [784, 100, 10])
    x = rng.normal(size=(4000, 784))
    logits = forward(teacher, x)
    labels = np.argmax(logits + rng.gumbel(size=logits.shape) * 0.3, axis=1)
    perms = [rng.permutation(100) for _ in range(10)]
    clients = [
        [w + rng.normal(0, 0.01, w.shape) for w in permuted(teacher, [p])]
        for p in perms
    ]
    res = pfnm_mlp_with_assignments(clients, np.full((10, 10), 50))
    assert res.widths == [100]
    # the true atom of original unit u: the global atom nearest to it
    w = res.weights
    cost = ((w[0][:, None, :] - teacher[0][None]) ** 2).sum(-1)
    atoms, units = linear_sum_assignment(cost)
    true_atom = np.empty(100, dtype=np.int64)
    true_atom[units] = atoms
    hits = [
        np.mean(a == true_atom[p])
        for a, p in zip(res.assignments[0], perms, strict=True)
    ]
    assert np.mean(hits) >= 0.99

    def accuracy(net: Net) -> float:
        return float(np.mean(forward(net, x).argmax(1) == labels))

    assert accuracy(w) >= accuracy(teacher) - 0.005


# ------------------------------------------------------------ 7. multilayer (§8.7)
@pytest.mark.parametrize("missing", ["patch", "zero_precision"])
def test_multilayer_recovers_the_function_top_down(missing) -> None:
    rng = np.random.default_rng(13)
    net = random_mlp(rng, [784, 100, 100, 10])
    perms = [[rng.permutation(100), rng.permutation(100)] for _ in range(4)]
    clients = [permuted(net, p) for p in perms]
    res = pfnm_mlp_with_assignments(
        clients, np.full((4, 10), 5), sigma0_2=1e8, missing=missing
    )
    assert res.widths == [100, 100]
    for c in range(2):
        glob = atom_of_unit(res.assignments[c][0], perms[0][c])
        for a, p in zip(res.assignments[c], perms, strict=True):
            np.testing.assert_array_equal(atom_of_unit(a, p[c]), glob)
    x = rng.normal(size=(64, 784))
    np.testing.assert_allclose(forward(res.weights, x), forward(net, x), atol=1e-6)


# -------------------------------------------------- 8. class-weighted output (§8.8)
@pytest.mark.parametrize(
    "sizes", [[12, 9, 4], [12, 7, 9, 4]], ids=["1-hidden", "2-hidden"]
)
def test_a_client_without_class_k_does_not_touch_output_k(sizes) -> None:
    rng = np.random.default_rng(14)
    nets = [random_mlp(rng, sizes, scale=0.5) for _ in range(3)]
    counts = np.array([[5, 0, 3, 2], [4, 6, 0, 1], [1, 2, 3, 9]])
    base = pfnm_mlp(nets, counts, gamma=2.0)
    changed = [w.copy() for w in nets[0]]
    changed[-2][1] = rng.normal(0, 50, changed[-2].shape[1])  # client 0 has no class 1
    changed[-1][1] = 123.0
    other = pfnm_mlp([changed, nets[1], nets[2]], counts, gamma=2.0)
    for got, want in zip(other, base, strict=True):
        np.testing.assert_array_equal(got, want)
    # touching a class the client has does change the output row
    changed[-2][0] += 1.0
    moved = pfnm_mlp([changed, nets[1], nets[2]], counts, gamma=2.0)
    assert not np.allclose(moved[-2][0], base[-2][0])


def test_output_bias_closed_form() -> None:
    rng = np.random.default_rng(15)
    nets = [random_mlp(rng, [6, 5, 3]) for _ in range(2)]
    nets[0][-1] = np.array([1.0, 2.0, 3.0])
    nets[1][-1] = np.array([-1.0, 0.5, 4.0])
    counts = np.array([[3, 0, 1], [1, 5, 3]])
    out = pfnm_mlp(nets, counts, sigma2=0.5, sigma0_2=2.0)
    # pi = [[3/4, 0, 1/4], [1/4, 1, 3/4]], sum_j pi_jk = 1
    pi = np.array([[0.75, 0.0, 0.25], [0.25, 1.0, 0.75]])
    num = 0.1 / 2.0 + (pi[0] * nets[0][-1] + pi[1] * nets[1][-1]) / 0.5
    np.testing.assert_allclose(out[-1], num / (1 / 2.0 + 1 / 0.5), rtol=1e-14)
    np.testing.assert_allclose(out[-1], [0.42, 0.42, 3.02], rtol=1e-14)


# ------------------------------------------------------------ caps and restarts
def test_max_atoms_is_never_exceeded() -> None:
    rng = np.random.default_rng(16)
    v = [rng.normal(size=(n, 8)) for n in (40, 60, 50, 60)]
    s = [np.ones(8)] * 4
    res = match_units(
        v, s, np.zeros(8), np.ones(8), gamma=1e6, iters=4, rng=rng, max_atoms=90
    )
    check_partition(res, [40, 60, 50, 60])
    assert res.width == 90  # a huge gamma fills the cap, and no more
    assert (res.history.sum(1) <= 90).all()
    with pytest.raises(ConfigError, match="max_atoms=59"):
        match_units(
            v, s, np.zeros(8), np.ones(8), gamma=1.0, iters=0, rng=rng, max_atoms=59
        )


def test_every_unit_finds_a_column_when_a_client_outgrows_700() -> None:
    # the reference offers min(L_j, max(700 - L, 1)) slots even when L + slots < L_j,
    # leaving units unassigned; fedsim always offers at least L_j - L
    rng = np.random.default_rng(17)
    big = rng.normal(size=(720, 3))
    v, s = [big, big[:10] + 0.01], [np.ones(3)] * 2
    res = match_units(v, s, np.zeros(3), np.ones(3), gamma=1.0, iters=2, rng=rng)
    check_partition(res, [720, 10])
    assert (10, 710) in [tuple(h) for h in res.history]


def test_restarting_from_assignments_reproduces_the_match() -> None:
    rng = np.random.default_rng(18)
    nets = [random_mlp(rng, [20, n, 8, 4], scale=0.4) for n in (10, 14, 12)]
    counts = rng.integers(1, 9, (3, 4))
    res = pfnm_mlp_with_assignments(nets, counts, gamma=2.0)
    again = pfnm_mlp_with_assignments(
        nets, counts, gamma=2.0, iters=0, init=res.assignments
    )
    assert again.widths == res.widths
    for got, want in zip(again.weights, res.weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # unused atom indices in init are dropped, keeping the order of the rest
    shifted = [[2 * a for a in layer] for layer in res.assignments]
    again = pfnm_mlp_with_assignments(nets, counts, gamma=2.0, iters=0, init=shifted)
    for got, want in zip(again.weights, res.weights, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ bad input
def good_input() -> tuple[list[Net], np.ndarray]:
    rng = np.random.default_rng(19)
    return [random_mlp(rng, [6, 5, 3]) for _ in range(2)], np.ones((2, 3))


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            lambda n, c: ([*n[:1], n[1][:2]], c),
            AggregationError,
            "client 1 has 2 arrays",
        ),
        (
            lambda n, c: ([n[0], [n[1][0][:, :5], *n[1][1:]]], c),
            AggregationError,
            "layer 0",
        ),
        (lambda n, c: (n, c[:, :2]), AggregationError, r"expected \(2, 3\)"),
        (lambda n, c: (n, c * [1, 0, 1]), AggregationError, "class 1 has no examples"),
        (
            lambda n, c: ([n[0], [n[1][0] * np.nan, *n[1][1:]]], c),
            AggregationError,
            "NaN",
        ),
        (lambda n, c: ([], c), AggregationError, "empty"),
        (lambda n, c: ([n[0][:2], n[1][:2]], c), AggregationError, "2 arrays"),
    ],
)
def test_bad_client_updates_are_refused(edit, error, match) -> None:
    nets, counts = edit(*good_input())
    with pytest.raises(error, match=match):
        pfnm_mlp(nets, counts)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"sigma2": 0.0}, "sigma2=0.0"),
        ({"sigma0_2": -1.0}, "sigma0_2=-1.0"),
        ({"gamma": float("inf")}, "gamma=inf"),
        ({"missing": "zeros"}, "missing='zeros'"),
        ({"popularity": "paper"}, "popularity='paper'"),
        ({"iters": -1}, "iters=-1"),
    ],
)
def test_bad_options_are_refused(option, match) -> None:
    with pytest.raises(ConfigError, match=match):
        pfnm_mlp(*good_input(), **option)


def test_match_units_refuses_inconsistent_inputs() -> None:
    v, s = [np.zeros((3, 4)), np.zeros((2, 4))], [np.ones(4), np.ones(4)]
    mu0, p0 = np.zeros(4), np.ones(4)
    rng = np.random.default_rng(0)
    with pytest.raises(AggregationError, match="shape"):
        match_units([v[0], np.zeros((2, 5))], s, mu0, p0, gamma=1.0, iters=0, rng=rng)
    with pytest.raises(AggregationError, match=">= 0"):
        match_units(v, [np.ones(4), -np.ones(4)], mu0, p0, gamma=1.0, iters=0, rng=rng)
    with pytest.raises(AggregationError, match="positive"):
        match_units(v, s, mu0, np.zeros(4), gamma=1.0, iters=0, rng=rng)
    with pytest.raises(AggregationError, match="distinct"):
        match_units(
            v, s, mu0, p0, gamma=1.0, iters=0, rng=rng, init=[[0, 1, 1], [0, 1]]
        )
    init = [np.array([0, 1, 7]), np.array([2, 0])]
    with pytest.raises(ConfigError, match="init uses 4 atoms"):
        match_units(v, s, mu0, p0, gamma=1.0, iters=0, rng=rng, init=init, max_atoms=3)
    # 4 distinct atoms fit max_atoms=4 however sparse their indices
    res = match_units(
        v, s, mu0, p0, gamma=1.0, iters=0, rng=rng, init=init, max_atoms=4
    )
    assert [a.tolist() for a in res.assignments] == [[0, 1, 3], [2, 0]]


def test_pfnm_refuses_init_of_the_wrong_depth() -> None:
    nets, counts = good_input()
    one_layer = [[np.arange(5), np.arange(5)]]
    with pytest.raises(AggregationError, match="init has 2 layers"):
        pfnm_mlp_with_assignments(nets, counts, init=one_layer * 2)
