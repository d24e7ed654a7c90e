"""Poisson problems and the Graph Element Network (``gen``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from fedsim import models
from fedsim.data.poisson import generate_poisson, solve_poisson
from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import PermutationSpec
from fedsim.models.gen import GEN
from tests.fedsim.models._helpers import adam_steps, digit_images
from tests.support import max_output_change, perturb_state

FIELD = {"input_shape": (1, 8, 8), "num_classes": 64}
DIGITS = {"input_shape": (1, 8, 8), "num_classes": 10}


def _interior(n: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(1, n + 1) / (n + 1)
    x, y = np.meshgrid(coords, coords)
    return x, y


def _small_gen(**options: object) -> GEN:
    torch.manual_seed(0)
    model = models.build("gen", **{**FIELD, **options})
    assert isinstance(model, GEN)
    return model


# --- Poisson problems -------------------------------------------------------


def test_poisson_solver_converges_at_second_order_to_the_analytic_solution() -> None:
    errors = []
    for n in (15, 31):
        x, y = _interior(n)
        exact = np.sin(np.pi * x) * np.sin(np.pi * y)
        errors.append(np.abs(solve_poisson(2 * np.pi**2 * exact) - exact).max())
    assert errors[1] < 1e-3
    assert 3.5 < errors[0] / errors[1] < 4.5  # h halves, error falls ~4x


def test_poisson_solution_satisfies_the_five_point_stencil() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 6))
    h = 0.3
    u = solve_poisson(f, h=h)
    padded = np.pad(u, 1)  # zero Dirichlet boundary
    for i in range(6):
        for j in range(6):
            a, b = i + 1, j + 1
            neighbours = (
                padded[a - 1, b]
                + padded[a + 1, b]
                + padded[a, b - 1]
                + padded[a, b + 1]
            )
            assert (4 * padded[a, b] - neighbours) / h**2 == pytest.approx(f[i, j])
    # the solution scales with h^2, and the default spacing is 1 / (n + 1)
    np.testing.assert_allclose(solve_poisson(f, h=2 * h), 4 * u)
    np.testing.assert_allclose(solve_poisson(f), solve_poisson(f, h=1 / 7))


def test_generated_problems_are_reproducible_and_solved() -> None:
    sources, solutions = generate_poisson(5, grid=6, rng=np.random.default_rng(1))
    assert sources.shape == (5, 1, 6, 6) and sources.dtype == np.float32
    assert solutions.shape == (5, 36) and solutions.dtype == np.float32
    again, _ = generate_poisson(5, grid=6, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(sources, again)
    for f, u in zip(sources, solutions, strict=True):
        expected = solve_poisson(f[0].astype(np.float64)).reshape(-1)
        np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-5)
    assert 0.1 < np.abs(solutions).max(axis=1).mean() < 20  # order-one solutions


def test_bad_poisson_inputs_fail_early() -> None:
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        solve_poisson(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="h must be positive"):
        solve_poisson(np.zeros((4, 4)), h=0.0)
    with pytest.raises(ValueError, match="grid"):
        generate_poisson(3, grid=1, rng=np.random.default_rng(0))


# --- the model's pieces -----------------------------------------------------


def test_soft_assignment_is_a_distribution_peaked_at_the_nearest_node() -> None:
    model = _small_gen()
    points = torch.rand(200, 2, generator=torch.Generator().manual_seed(2))
    positions = model.node_positions()
    r = model.assignment(points, positions).detach()
    assert torch.all(r >= 0)
    torch.testing.assert_close(r.sum(1), torch.ones(200))
    nearest = torch.cdist(points, positions.detach()).argmin(1)
    assert torch.equal(r.argmax(1), nearest)


def test_node_states_start_as_the_weighted_sum_of_encoded_points() -> None:
    model = _small_gen().double()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    p = model.node_positions()
    pts = model.points
    h = model.encoder(torch.cat([pts.expand(2, -1, -1), x.reshape(2, 64, 1)], dim=2))
    r = model.assignment(pts, p)
    expected = torch.stack(
        [sum(r[i, v] * h[:, i] for i in range(64)) for v in range(16)], dim=1
    )
    torch.testing.assert_close(model.encode(x, p), expected)
    assert r.sum(0).max() > 1.5  # a sum, not a mean, of the points' latents


def test_each_node_receives_from_its_nearest_neighbours() -> None:
    model = _small_gen(neighbours=3)
    p = model.node_positions().detach()
    src, dst = model.edges(p)
    assert len(src) == 16 * 3
    dist = torch.cdist(p, p) + torch.eye(16) * 10
    for v in range(16):
        got = set(src[dst == v].tolist())
        assert got == set(dist[v].argsort()[:3].tolist())


@pytest.mark.parametrize("build", [FIELD, DIGITS])
def test_relabelling_nodes_leaves_predictions_unchanged(build: dict) -> None:
    torch.manual_seed(0)
    model = models.build("gen", **build).double()
    perturb_state(model)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4)).double()
    with torch.no_grad():
        before = model(x)
        relabel = torch.randperm(16, generator=torch.Generator().manual_seed(5))
        model.positions.copy_(model.positions[relabel])
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-10, rtol=0)


@pytest.mark.parametrize("build", [FIELD, DIGITS])
def test_every_declared_axis_is_needed(build: dict) -> None:
    """Each axis of each group, when left out, breaks the symmetry."""
    torch.manual_seed(0)
    model = models.build("gen", **build, encoder_hidden=[6], latent=5).double()
    perturb_state(model)
    spec = models.permutation_spec(model)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    assert max_output_change(model, spec, x, seed=0) < 1e-10
    for group in spec:
        if len(group.axes) == 1:
            continue  # the nodes: moving the positions alone is the symmetry
        for i in range(len(group.axes)):
            partial = dataclasses.replace(
                group, axes=group.axes[:i] + group.axes[i + 1 :]
            )
            change = max_output_change(model, PermutationSpec((partial,)), x, seed=1)
            assert change > 1e-6, f"{group.name} without {group.axes[i]}"


def test_widths_rebuild_from_the_spec() -> None:
    model = _small_gen(encoder_hidden=[8, 8])
    spec = models.permutation_spec(model)
    assert spec.widths()["latent"] == 32 and spec.widths()["nodes"] == 16
    kwargs = models.rebuild_kwargs(
        model.fedsim_kwargs, spec, {"latent": 40, "encoder.1": 12, "message": 20}
    )
    grown = models.build("gen", **kwargs)
    assert grown.norm.weight.shape == (40,)
    assert grown.encoder.layers[1].weight.shape == (12, 8)
    assert grown.node.layers[0].weight.shape == (32, 60)
    with pytest.raises(ValueError, match="nodes"):
        models.rebuild_kwargs(model.fedsim_kwargs, spec, {"nodes": 20})


# --- positions --------------------------------------------------------------


def test_loss_has_a_gradient_in_positions_and_sharpness() -> None:
    model = _small_gen()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    model(x).pow(2).mean().backward()
    assert model.positions.grad is not None and model.positions.grad.abs().min() > 0
    assert model.log_sharpness.grad is not None and model.log_sharpness.grad != 0


def test_clamp_passes_only_gradients_that_lead_back_inside() -> None:
    model = _small_gen()
    with torch.no_grad():
        model.positions[:3] = torch.tensor([[-0.2, 0.5], [1.3, 0.5], [0.5, 0.5]])
    p = model.node_positions()
    assert torch.equal(
        p[:3].detach(), torch.tensor([[0.0, 0.5], [1.0, 0.5], [0.5, 0.5]])
    )
    inward = torch.tensor([[0.3, 0.5], [0.7, 0.5], [0.4, 0.5]])  # targets inside
    (g_in,) = torch.autograd.grad((p[:3] - inward).pow(2).sum(), model.positions)
    assert g_in[0, 0] < 0 and g_in[1, 0] > 0 and g_in[2, 0] > 0
    outward = torch.tensor([[-1.0, 0.5], [2.0, 0.5], [0.4, 0.5]])  # targets outside
    p = model.node_positions()
    (g_out,) = torch.autograd.grad((p[:3] - outward).pow(2).sum(), model.positions)
    assert g_out[0, 0] == 0 and g_out[1, 0] == 0 and g_out[2, 0] > 0


def test_positions_stay_in_the_unit_square_while_training() -> None:
    model = _small_gen(steps=1)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.SGD([model.positions], lr=5.0)
    corner = torch.tensor([1.5, -0.5])  # the loss pulls every node out of the square
    for _ in range(20):
        loss = (model.node_positions() - corner).pow(2).sum() + model(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        p = model.node_positions().detach()
        assert torch.all((p >= 0) & (p <= 1))
    assert torch.allclose(p, torch.tensor([1.0, 0.0]).expand(16, 2), atol=1e-3)
    assert (model.positions.detach() - p).abs().max() > 0.1  # the raw values left


# --- roles, options ---------------------------------------------------------


@pytest.mark.parametrize("role", ["local", "server"])
def test_positions_are_never_averaged(role: str) -> None:
    model = _small_gen(positions=role)
    roles = models.tensor_roles(model)
    assert roles["positions"] == role
    assert {k for k, v in roles.items() if v != "average"} == {"positions"}
    assert roles["log_sharpness"] == "average"


def test_head_follows_num_classes_unless_told() -> None:
    assert _small_gen().head == "field"
    assert _small_gen(num_classes=10).head == "classes"
    assert _small_gen(head="classes").head == "classes"
    assert _small_gen(head="classes")(torch.zeros(2, 1, 8, 8)).shape == (2, 64)
    assert _small_gen()(torch.zeros(2, 1, 8, 8)).shape == (2, 64)
    colour = _small_gen(input_shape=(3, 5, 7), num_classes=35)
    assert colour.head == "field"
    assert colour(torch.zeros(2, 3, 5, 7)).shape == (2, 35)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"head": "field", "num_classes": 10}, "num_classes is 10"),
        ({"head": "mean"}, "'mean'"),
        ({"positions": "shared"}, "'shared'"),
        ({"grid": 1}, "grid"),
        ({"latent": 0}, "latent"),
    ],
)
def test_bad_options_fail_early(options: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        models.build("gen", **{**FIELD, **options})


# --- training ---------------------------------------------------------------


def test_vmapped_clients_match_separate_autograd() -> None:
    clients = [models.build("gen", **FIELD, seed=s, steps=2) for s in range(3)]
    params, _ = stack_module_state(clients)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 1, 8, 8, generator=gen)
    y = torch.randn(3, 4, 64, generator=gen)

    def loss(
        p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
    ) -> torch.Tensor:
        return torch.nn.functional.mse_loss(functional_call(clients[0], p, (xb,)), yb)

    grads = vmap(grad(loss))(params, x, y)
    for i, client in enumerate(clients):
        torch.nn.functional.mse_loss(client(x[i]), y[i]).backward()
        for name, p in client.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-6, rtol=1e-4)


def test_training_on_poisson_problems_lowers_the_mse_tenfold() -> None:
    sources, solutions = generate_poisson(16, grid=8, rng=np.random.default_rng(0))
    x, y = torch.from_numpy(sources), torch.from_numpy(solutions)
    model = _small_gen()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = torch.nn.functional.mse_loss(model(x), y).item()
    start = model.positions.detach().clone()
    for _ in range(400):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = torch.nn.functional.mse_loss(model(x), y).item()
    assert last < first / 10
    assert (model.positions.detach() - start).abs().max() > 0.01  # the nodes moved


def test_trains_on_digits() -> None:
    x, y = digit_images()
    x = (x - x.mean()) / x.std()
    torch.manual_seed(0)
    model = models.build("gen", **DIGITS, steps=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(model(x), y).item()
    adam_steps(model, x, y, steps=300, batch=64, lr=2e-3, generator=gen)
    with torch.no_grad():
        out = model(x)
    last = torch.nn.functional.cross_entropy(out, y).item()
    assert last < 0.5 * first
    assert (out.argmax(1) == y).float().mean() > 0.5
