"""GroupSort activations, Björck and l_1-ball layers, the groupsort_mlp model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

from fedsim import models
from fedsim.certify import certified_radius, margin_certified
from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models._lipschitz import (
    bjorck,
    bjorck_coefficients,
    group_sort,
    max_min,
    project_l1_rows,
)
from fedsim.models.groupsort import GroupSortMLP
from tests.fedsim.models._helpers import adam_steps, digit_images
from tests.support import max_output_change, perturb_state

DIGITS = {"input_shape": (1, 8, 8), "num_classes": 10}


def _matrix_with_singular_values(
    s: torch.Tensor, rows: int, cols: int, gen: torch.Generator
) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U, V (float64)."""
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    k = len(s)
    return u[:, :k] @ torch.diag(s) @ v[:, :k].T


def _randomise_raw_weights(model: torch.nn.Module, seed: int, noise: float) -> None:
    """Move raw weights away from their (already constrained) initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _input_gradients(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(batch, outputs, inputs) Jacobian of the model at each row of ``x``."""
    return vmap(jacrev(lambda v: model(v[None])[0]))(x)


# --- activations ------------------------------------------------------------


@pytest.mark.parametrize("g", [2, 3, 4])
def test_group_sort_sorts_each_block_as_a_permutation_of_it(g: int) -> None:
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    out = group_sort(x, g)
    for row_in, row_out in zip(x, out, strict=True):
        for start in range(0, 12, g):
            block_in, block_out = row_in[start : start + g], row_out[start : start + g]
            assert torch.all(block_out[1:] >= block_out[:-1])
            assert any(
                torch.equal(block_in[list(p)], block_out)
                for p in itertools.permutations(range(g))
            )


def test_full_group_equals_torch_sort_and_works_on_channels() -> None:
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(group_sort(x, 10), torch.sort(x, dim=1).values)
    fmap = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(2))
    expected = torch.sort(fmap.reshape(2, 3, 2, 3, 3), dim=2).values.reshape(fmap.shape)
    assert torch.equal(group_sort(fmap, 2, dim=1), expected)


def test_group_sort_ignores_the_order_inside_a_group() -> None:
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    within = torch.cat([torch.randperm(4) + 4 * b for b in range(3)])
    assert torch.equal(group_sort(x[:, within], 4), group_sort(x, 4))


@pytest.mark.parametrize("act", ["sorted", "maxmin"])
def test_jacobian_is_a_permutation_matrix(act: str) -> None:
    x = torch.randn(12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def fn(v: torch.Tensor) -> torch.Tensor:
        return max_min(v) if act == "maxmin" else group_sort(v, 3)

    jac = torch.autograd.functional.jacobian(fn, x)
    assert torch.all((jac == 0) | (jac == 1))
    assert torch.equal(jac.sum(0), torch.ones(12, dtype=jac.dtype))
    assert torch.equal(jac.sum(1), torch.ones(12, dtype=jac.dtype))


def test_max_min_is_pairwise_max_then_min() -> None:
    x = torch.tensor([[1.0, 5.0, 4.0, -2.0, 0.5, 0.5]])
    assert torch.equal(max_min(x), torch.tensor([[5.0, 4.0, 0.5, 1.0, -2.0, 0.5]]))
    y = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    pairs = group_sort(y, 2)
    assert torch.equal(max_min(y), torch.cat([pairs[:, 1::2], pairs[:, 0::2]], 1))


def test_group_size_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="divisor"):
        group_sort(torch.zeros(2, 10), 4)
    with pytest.raises(ValueError, match="even"):
        max_min(torch.zeros(2, 5))


# --- Björck -----------------------------------------------------------------


def test_bjorck_coefficients_are_the_taylor_series() -> None:
    assert bjorck_coefficients(1) == (1.5, -0.5)
    assert bjorck_coefficients(2) == (15 / 8, -5 / 4, 3 / 8)
    assert bjorck_coefficients(3) == (35 / 16, -35 / 16, 21 / 16, -5 / 16)
    assert bjorck_coefficients(4) == (
        315 / 128,
        -105 / 32,
        189 / 64,
        -45 / 32,
        35 / 128,
    )
    with pytest.raises(ValueError, match="order 5"):
        bjorck_coefficients(5)


def test_one_bjorck_step_maps_each_singular_value_in_closed_form() -> None:
    gen = torch.Generator().manual_seed(6)
    s = torch.tensor([1.6, 1.2, 0.9, 0.5, 0.1], dtype=torch.float64)
    w = _matrix_with_singular_values(s, 5, 8, gen)
    out = bjorck(w, iters=1, order=1, safe_scaling=False)
    expected = (1.5 * s - 0.5 * s**3).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(out), expected)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bjorck_never_exceeds_one_inside_its_safe_range(order: int) -> None:
    gen = torch.Generator().manual_seed(order)
    top = math.sqrt(3) - 1e-3 if order == 1 else 1.0
    for iters in (1, 2, 3, 7):
        s = torch.rand(6, generator=gen, dtype=torch.float64) * top
        s[0] = top
        w = _matrix_with_singular_values(s, 6, 9, gen)
        sigma = torch.linalg.svdvals(
            bjorck(w, iters=iters, order=order, safe_scaling=False)
        )
        assert sigma.max() <= 1 + 1e-5


def test_safe_scaling_bounds_any_raw_weight() -> None:
    w = 50.0 * torch.randn(16, 24, generator=torch.Generator().manual_seed(7))
    assert torch.linalg.svdvals(w).max() > math.sqrt(3)
    for iters in (0, 1, 5):
        out = bjorck(w.double(), iters=iters, order=3, safe_scaling=True)
        assert torch.linalg.svdvals(out).max() <= 1 + 1e-5


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bjorck_orthonormalises_in_30_iterations(order: int) -> None:
    gen = torch.Generator().manual_seed(8)
    wide = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    out = bjorck(wide, iters=30, order=order)
    torch.testing.assert_close(
        out @ out.T, torch.eye(32, dtype=torch.float64), atol=1e-4, rtol=0
    )
    tall = bjorck(wide.T, iters=30, order=order)
    torch.testing.assert_close(
        tall.T @ tall, torch.eye(32, dtype=torch.float64), atol=1e-4, rtol=0
    )


def test_bjorck_commutes_with_row_and_column_permutations() -> None:
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(12, 20, generator=gen, dtype=torch.float64)
    p = torch.eye(12, dtype=torch.float64)[torch.randperm(12, generator=gen)]
    q = torch.eye(20, dtype=torch.float64)[torch.randperm(20, generator=gen)]
    for order in (1, 3):
        torch.testing.assert_close(
            bjorck(p @ w @ q, iters=10, order=order),
            p @ bjorck(w, iters=10, order=order) @ q,
        )


# --- l_1 ball projection ----------------------------------------------------


def _bisection_projection(row: np.ndarray) -> np.ndarray:
    """Projection onto the unit l_1 ball by bisection on the threshold."""
    if np.abs(row).sum() <= 1:
        return row
    lo, hi = 0.0, float(np.abs(row).max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.maximum(np.abs(row) - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.sign(row) * np.maximum(np.abs(row) - lo, 0)


def test_l1_projection_matches_bisection_and_keeps_inner_rows() -> None:
    rng = np.random.default_rng(10)
    w = rng.normal(size=(40, 15)) * rng.uniform(0.01, 1.0, size=(40, 1))
    w[0] = 0.0
    out = project_l1_rows(torch.from_numpy(w)).numpy()
    inside = np.abs(w).sum(1) <= 1
    assert inside.sum() >= 5 and (~inside).sum() >= 5
    assert np.all(np.abs(out).sum(1) <= 1 + 1e-6)
    np.testing.assert_array_equal(out[inside], w[inside])
    np.testing.assert_allclose(np.abs(out[~inside]).sum(1), 1.0, atol=1e-12)
    expected = np.stack([_bisection_projection(r) for r in w])
    np.testing.assert_allclose(out, expected, atol=1e-12)
    again = project_l1_rows(torch.from_numpy(out)).numpy()
    np.testing.assert_allclose(again, out, atol=1e-15)


# --- the network is L-Lipschitz ---------------------------------------------


@pytest.mark.parametrize(
    ("options", "lipschitz"),
    [
        ({}, 1.0),
        ({"layout": "maxmin", "bjorck_order": 2}, 1.0),
        ({"group_size": 4}, 3.0),
    ],
)
def test_l2_gradient_and_difference_bounds(options: dict, lipschitz: float) -> None:
    torch.manual_seed(0)
    model = models.build(
        "groupsort_mlp", **DIGITS, hidden=[64, 32], lipschitz=lipschitz, **options
    ).double()
    _randomise_raw_weights(model, seed=1, noise=0.5)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 64, generator=gen, dtype=torch.float64)
    per_logit = _input_gradients(model, x).norm(dim=2)
    assert per_logit.max() <= lipschitz * (1 + 1e-3)
    assert per_logit.max() >= 0.5 * lipschitz  # the bound is not vacuous
    y = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * torch.rand(
        1000, 1, generator=gen, dtype=torch.float64
    )
    with torch.no_grad():
        change = (model(x) - model(y)).norm(dim=1)
    assert torch.all(change <= (1 + 1e-4) * lipschitz * (x - y).norm(dim=1))


class _ReluTwin(torch.nn.Module):
    """The same constrained layers with ReLU instead of GroupSort."""

    def __init__(self, net: GroupSortMLP) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net.layers[:-1]:
            x = torch.relu(layer(x))
        return self.net.layers[-1](x)


def test_scalar_output_preserves_gradient_norm_where_relu_does_not() -> None:
    torch.manual_seed(0)
    net = GroupSortMLP(
        in_features=16, hidden=[16, 8], num_classes=1, bjorck_iters=30, bjorck_order=2
    ).double()
    _randomise_raw_weights(net, seed=3, noise=0.1)
    x = torch.randn(
        500, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    gs_norm = _input_gradients(net, x).norm(dim=(1, 2))
    assert torch.all((gs_norm - 1).abs() < 1e-3)
    relu_norm = _input_gradients(_ReluTwin(net), x).norm(dim=(1, 2))
    assert (relu_norm - 1).abs().max() > 0.1


def test_linf_rows_gradient_and_difference_bounds() -> None:
    torch.manual_seed(0)
    lipschitz = 2.0
    model = models.build(
        "groupsort_mlp", **DIGITS, hidden=[32, 32], norm="linf", lipschitz=lipschitz
    ).double()
    for layer in model.layers:
        assert torch.all(layer.constrained_weight().abs().sum(1) <= 1 + 1e-6)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 64, generator=gen, dtype=torch.float64)
    l1 = _input_gradients(model, x).abs().sum(dim=2)
    assert l1.max() <= lipschitz * (1 + 1e-4)
    y = x + 0.3 * torch.rand(x.shape, generator=gen, dtype=torch.float64) - 0.15
    with torch.no_grad():
        change = (model(x) - model(y)).abs().amax(dim=1)
    assert torch.all(change <= (1 + 1e-4) * lipschitz * (x - y).abs().amax(dim=1))


def test_bounds_hold_after_averaging_two_models_raw_weights() -> None:
    for norm in ("l2", "linf"):
        built = []
        for seed in (11, 12):
            torch.manual_seed(seed)
            m = models.build("groupsort_mlp", **DIGITS, hidden=[32, 32], norm=norm)
            _randomise_raw_weights(m.double(), seed=seed, noise=0.3)
            built.append(m)
        states = [m.state_dict() for m in built]
        averaged = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
        model = built[0]
        model.load_state_dict(averaged)
        raw_first = averaged["layers.0.weight"]
        if norm == "l2":
            # raw average is not orthonormal; the forward pass re-projects it
            assert (torch.linalg.svdvals(raw_first) - 1).abs().max() > 0.1
        else:
            assert raw_first.abs().sum(1).max() > 1.5
        x = torch.randn(
            300, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64
        )
        jac = _input_gradients(model, x)
        dual = jac.norm(dim=2) if norm == "l2" else jac.abs().sum(dim=2)
        assert dual.max() <= 1 + 1e-3


# --- certificates -----------------------------------------------------------


def test_certificate_on_each_side_of_the_bound() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.5], [3.0, 1.0, 0.5], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0, 0])  # margins 2, 2, -2
    # l_inf: certified iff margin > 2 L eps; L = 0.5 makes the bound eps
    got = margin_certified(logits, labels, lipschitz=0.5, eps=1.9, norm="linf")
    assert got.tolist() == [True, True, False]
    got = margin_certified(logits, labels, lipschitz=0.5, eps=2.1, norm="linf")
    assert got.tolist() == [False, False, False]
    assert not margin_certified(
        logits[:1], labels[:1], lipschitz=0.5, eps=2.0, norm="linf"
    )
    # l_2: certified iff margin > sqrt(2) L eps, i.e. eps < sqrt 2 for L = 1
    assert margin_certified(
        logits, labels, lipschitz=1.0, eps=1.41, norm="l2"
    ).tolist() == [
        True,
        True,
        False,
    ]
    assert not margin_certified(
        logits[:1], labels[:1], lipschitz=1.0, eps=1.42, norm="l2"
    )
    torch.testing.assert_close(
        certified_radius(logits, labels, lipschitz=1.0, norm="l2"),
        torch.tensor([math.sqrt(2), math.sqrt(2), -math.sqrt(2)]),
    )
    with pytest.raises(ConfigError, match="'l3'"):
        margin_certified(logits, labels, lipschitz=1.0, eps=0.1, norm="l3")


def test_certified_points_survive_linf_pgd() -> None:
    torch.manual_seed(0)
    lipschitz, eps = 8.0, 0.002
    model = models.build(
        "groupsort_mlp", **DIGITS, hidden=[32, 32], norm="linf", lipschitz=lipschitz
    )
    x = torch.rand(400, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        labels = model(x).argmax(1)
        safe = margin_certified(
            model(x), labels, lipschitz=lipschitz, eps=eps, norm="linf"
        )
    assert 50 <= int(safe.sum()) < 350

    def margin(v: torch.Tensor) -> torch.Tensor:
        out = model(v)
        own = out.gather(1, labels[:, None])[:, 0]
        return own - out.scatter(1, labels[:, None], -math.inf).amax(1)

    adv = x.clone()
    for _ in range(30):
        adv.requires_grad_(True)
        (step,) = torch.autograd.grad(margin(adv).sum(), adv)
        adv = (adv.detach() - eps / 4 * step.sign()).clamp(x - eps, x + eps)
    with torch.no_grad():
        flipped = model(adv).argmax(1) != labels
        assert margin(adv).mean() < margin(x).mean()  # the attack does bite
    assert flipped.any()
    assert not flipped[safe].any()


# --- symmetry, options, training --------------------------------------------


@pytest.mark.parametrize(
    "options", [{"layout": "maxmin"}, {"group_size": 4}, {"norm": "linf"}]
)
def test_declared_group_symmetry_holds_and_single_units_do_not(options: dict) -> None:
    torch.manual_seed(0)
    model = models.build("groupsort_mlp", **DIGITS, hidden=[16, 8], **options).double()
    perturb_state(model)
    spec = models.permutation_spec(model)
    x = torch.randn(
        5, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    assert max_output_change(model, spec, x, seed=0) < 1e-9
    # moving single rows across groups (block 1 everywhere) is not a symmetry
    layer = "layers.0.weight"
    units = PermGroup(
        "units",
        16,
        (AxisRef(layer, 0), AxisRef("layers.0.bias", 0), AxisRef("layers.1.weight", 1)),
    )
    assert max_output_change(model, PermutationSpec((units,)), x, seed=0) > 1e-4


def test_rows_inside_a_group_reorder_freely() -> None:
    torch.manual_seed(0)
    model = models.build("groupsort_mlp", **DIGITS, hidden=[12], group_size=3).double()
    perturb_state(model)
    x = torch.randn(
        5, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    before = model(x)
    rows = torch.cat(
        [
            torch.randperm(3, generator=torch.Generator().manual_seed(b)) + 3 * b
            for b in range(4)
        ]
    )
    state = dict(model.state_dict())
    state["layers.0.weight"] = state["layers.0.weight"][rows]
    state["layers.0.bias"] = state["layers.0.bias"][rows]
    model.load_state_dict(state)
    torch.testing.assert_close(model(x), before)


def test_widths_rebuild_in_units_of_groups() -> None:
    model = models.build("groupsort_mlp", **DIGITS, hidden=[16, 8], group_size=4)
    spec = models.permutation_spec(model)
    assert spec.widths() == {"hidden.0": 4, "hidden.1": 2}
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, {"hidden.0": 6})
    assert kwargs["hidden"] == [24, 8]
    grown = models.build("groupsort_mlp", **kwargs)
    assert grown.layers[0].weight.shape == (24, 64)
    assert models.permutation_spec(grown).widths() == {"hidden.0": 6, "hidden.1": 2}


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"norm": "l1"}, "'l1'"),
        ({"layout": "pairs"}, "'pairs'"),
        ({"group_size": 3, "hidden": [16]}, "16"),
        ({"group_size": 4, "layout": "maxmin"}, "maxmin"),
        ({"bjorck_order": 5}, "5"),
        ({"lipschitz": 0.0}, "0.0"),
    ],
)
def test_bad_options_fail_early(options: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        models.build("groupsort_mlp", **DIGITS, **options)


def test_functional_step_matches_autograd() -> None:
    torch.manual_seed(0)
    model = models.build("groupsort_mlp", **DIGITS, hidden=[16, 16])
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    y = torch.arange(8)
    params = dict(model.named_parameters())

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    functional = grad(loss)({k: v.detach() for k, v in params.items()})
    loss(params).backward()
    for k, p in params.items():
        torch.testing.assert_close(functional[k], p.grad)


def test_trains_on_digits() -> None:
    x, y = digit_images()
    x = x / 16.0
    torch.manual_seed(0)
    model = models.build("groupsort_mlp", **DIGITS, hidden=[64, 64], lipschitz=10.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(model(x), y).item()
    adam_steps(model, x, y, steps=200, batch=64, lr=1e-2, generator=gen)
    with torch.no_grad():
        out = model(x)
    last = torch.nn.functional.cross_entropy(out, y).item()
    accuracy = (out.argmax(1) == y).float().mean().item()
    assert last < 0.1 * first
    assert accuracy > 0.95
