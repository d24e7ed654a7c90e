"""i-ResNet classifier and flow: Lipschitz bounds, inverses, log-determinants, FL."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian
from torch.func import functional_call, grad, vmap

from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import (
    PermutationSpec,
    permute_state_dict,
    random_permutations,
    select_units,
)
from fedsim.models._iresnet_layers import (
    ActNorm,
    InvertibleBlock,
    SpectralNormConv2d,
    squeeze,
    unsqueeze,
)
from fedsim.models.iresnet import IResNet, IResNetFlow, bits_per_dim
from tests.fedsim.models._helpers import adam_steps, digit_images
from tests.support import max_output_change, perturb_state

SMALL = {"input_shape": (1, 8, 8), "num_classes": 10}
COEFF = 0.9
F64 = torch.float64


def _build(name: str, seed: int = 0, **options: Any) -> Any:
    torch.manual_seed(seed)
    return models.build(name, **SMALL, **options).double()


def _stress(model: IResNet | IResNetFlow) -> None:
    """Scale every conv up 3x, so that every normalisation is active."""
    with torch.no_grad():
        for _, conv in model.spectral_convs():
            conv.weight_orig.mul_(3.0)
    model.reestimate_spectral_norms()


def _matrix(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``fn`` at one unbatched ``x`` as a (d_out, d_in) matrix."""
    jac = jacobian(fn, x, vectorize=True)
    return jac.reshape(-1, x.numel())


def _operator_norm(conv: SpectralNormConv2d) -> float:
    """The conv's exact operator norm at its input shape (SVD of its Jacobian)."""
    x0 = torch.zeros(conv.weight_orig.shape[1], *conv.input_hw, dtype=F64)
    jac = _matrix(lambda t: conv(t[None])[0], x0)
    return float(torch.linalg.matrix_norm(jac, ord=2))


def _aligned_block() -> InvertibleBlock:
    """A block whose branch is ``c^3 * identity`` on positive inputs (its bound)."""
    block = InvertibleBlock(
        channels=4,
        hidden=(4, 4),
        input_hw=(4, 4),
        input_activation=True,
        coeff=COEFF,
        train_iterations=0,
        init_iterations=0,
    ).double()
    with torch.no_grad():
        for conv in block.branch.convs():
            conv.weight_orig.zero_()
            conv.bias.zero_()
            k = conv.kernel_size // 2
            conv.weight_orig[:, :, k, k] = torch.eye(4)
            conv.reestimate(50)
    return block.eval()


# --- (1) spectral normalisation and the branch Lipschitz constant ------------


@pytest.mark.parametrize("stressed", [False, True])
def test_every_branch_conv_has_operator_norm_at_most_coeff(stressed: bool) -> None:
    model = _build("iresnet")
    if stressed:
        _stress(model)
    norms = [_operator_norm(conv) for _, conv in model.spectral_convs()]
    assert max(norms) <= COEFF * (1 + 1e-3)
    if stressed:  # the normalisation is active, so the bound is attained
        assert min(norms) >= COEFF * (1 - 1e-3)


def test_branch_lipschitz_constant_is_below_one() -> None:
    model = _build("iresnet_flow")
    _stress(model)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _, block in model.named_blocks():
        shape = (block.actnorm.loc.numel(), *block.input_hw)
        for _ in range(3):
            a = torch.randn(shape, generator=gen, dtype=F64)
            jac = _matrix(lambda t, b=block: b.branch(t[None])[0], a)
            worst = max(worst, float(torch.linalg.matrix_norm(jac, ord=2)))
    assert worst <= COEFF**3 * (1 + 1e-3) < 1.0
    # the bound is tight: a branch aligned with its singular vectors reaches c^3
    block = _aligned_block()
    a = torch.rand(4, 4, 4, generator=gen, dtype=F64) + 0.1
    jac = _matrix(lambda t: block.branch(t[None])[0], a)
    torch.testing.assert_close(jac, COEFF**3 * torch.eye(64, dtype=F64))


def test_a_conv_whose_weight_was_zero_recovers_its_norm() -> None:
    conv = SpectralNormConv2d(
        in_channels=3,
        out_channels=5,
        kernel_size=3,
        input_hw=(4, 4),
        coeff=COEFF,
        init_iterations=0,
    ).double()
    weight = conv.weight_orig.detach().clone() * 4.0
    with torch.no_grad():
        conv.weight_orig.zero_()
        conv.power_iteration(5)  # u, v would be zero forever without the restart
        conv.weight_orig.copy_(weight)
    conv.power_iteration(3)
    conv.reestimate(64)
    assert _operator_norm(conv) == pytest.approx(COEFF, rel=1e-6)


# --- (2) inverses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-4)]
)
def test_flow_inverse_reconstructs_the_input(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    flow = models.build("iresnet_flow", **SMALL).to(dtype)
    _stress(flow)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 8, 8, generator=gen, dtype=dtype) - 0.5
    flow.train()
    flow(x)  # data-dependent ActNorm initialisation, so ActNorm is not identity
    flow.eval()
    with torch.no_grad():
        back = flow.inverse(flow.encode(x))
        assert float((back - x).abs().max()) < tol
        # sampling inverts prior draws: encoding the samples gives the draws back
        samples = flow.sample(4, torch.Generator().manual_seed(2))
        eps = torch.randn(
            4, 64, generator=torch.Generator().manual_seed(2), dtype=dtype
        )
        z = flow.prior_mean + flow.prior_log_std.exp() * eps
        assert float((flow.encode(samples) - z).abs().max()) < 10 * tol


def test_classifier_features_invert_with_injective_padding() -> None:
    model = _build("iresnet", pad_channels=3)
    _stress(model)
    model.eval()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    features = model.features(x)
    assert features.shape == (5, 64, 2, 2)  # (1 + 3) channels, squeezed twice
    back = model.invert_features(features)
    assert float((back - x).abs().max()) < 1e-6


# --- (3) log-determinants ----------------------------------------------------


def _random_block() -> tuple[InvertibleBlock, torch.Tensor]:
    model = _build("iresnet_flow")
    _stress(model)
    with torch.no_grad():
        for _, block in model.named_blocks():
            block.actnorm.loc.normal_(0.0, 0.3)
            block.actnorm.log_scale.normal_(0.0, 0.3)
    model.eval()
    x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    return model.stage(0)[1], x


def _series(block: InvertibleBlock, x: torch.Tensor, terms: int) -> torch.Tensor:
    log_det = block.forward_with_log_det(
        x, terms=terms, estimator="exact", generator=None
    )[1]
    return log_det.detach()


def _slogdet(block: InvertibleBlock, x: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [torch.linalg.slogdet(_matrix(lambda t: block(t[None])[0], xb))[1] for xb in x]
    )


def test_exact_trace_series_matches_slogdet() -> None:
    block, x = _random_block()
    torch.testing.assert_close(
        _series(block, x, 50), _slogdet(block, x), atol=1e-6, rtol=0
    )
    # aligned block: J_g = c^3 I, so log det = d ln(1 + c^3) in closed form
    aligned = _aligned_block()
    xa = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    closed = torch.full((2,), 64 * math.log1p(COEFF**3), dtype=F64)
    torch.testing.assert_close(
        _series(aligned, xa + 0.1, 50), closed, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(_slogdet(aligned, xa + 0.1), closed, atol=1e-9, rtol=0)


def _truncation_bound(lip: float, terms: int, dim: int) -> float:
    return -dim * (math.log(1 - lip) + sum(lip**k / k for k in range(1, terms + 1)))


def test_five_term_truncation_error_is_within_the_bound() -> None:
    block, x = _random_block()
    error = (_series(block, x, 5) - _slogdet(block, x)).abs()
    a = block.actnorm(x)
    for b in range(3):
        lip = float(
            torch.linalg.matrix_norm(
                _matrix(lambda t: block.branch(t[None])[0], a[b].detach()), ord=2
            )
        )
        assert float(error[b]) <= _truncation_bound(lip, 5, 64)
    aligned = _aligned_block()
    xa = torch.full((1, 4, 4, 4), 0.5, dtype=F64)
    err = abs(float(_series(aligned, xa, 5)[0]) - 64 * math.log1p(COEFF**3))
    assert 0.5 < err <= _truncation_bound(COEFF**3, 5, 64)  # ~1.0 against ~4.5


@pytest.mark.parametrize("which", ["random", "aligned"])
def test_hutchinson_mean_is_within_three_standard_errors(which: str) -> None:
    if which == "random":
        block, x = _random_block()
        x = x[:1]
    else:
        block, x = _aligned_block(), torch.full((1, 4, 4, 4), 0.5, dtype=F64)
    n = 4000
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        estimates = block.forward_with_log_det(
            x.expand(n, -1, -1, -1), terms=5, estimator="hutchinson", generator=gen
        )[1]
        exact = float(_series(block, x, 5)[0])
    stderr = float(estimates.std()) / math.sqrt(n)
    assert abs(float(estimates.mean()) - exact) < 3 * stderr
    assert float(estimates.std()) > 1e-3  # the probes really are random


def test_flow_log_prob_is_the_change_of_variables() -> None:
    flow = _build("iresnet_flow", log_det="exact", terms=50)
    _stress(flow)
    with torch.no_grad():
        flow.prior_mean.normal_(0.0, 0.2)
        flow.prior_log_std.normal_(0.0, 0.2)
    flow.eval()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=F64)
    z = flow.encode(x)
    prior = torch.distributions.Normal(flow.prior_mean, flow.prior_log_std.exp())
    log_dets = torch.stack(
        [
            torch.linalg.slogdet(_matrix(lambda t: flow.encode(t[None])[0], xb))[1]
            for xb in x
        ]
    )
    expected = prior.log_prob(z).sum(1) + log_dets
    torch.testing.assert_close(flow(x), expected, atol=1e-6, rtol=0)


# --- (4) ActNorm, squeeze and bits per dimension ------------------------------


def test_actnorm_initialises_from_data_and_inverts_exactly() -> None:
    norm = ActNorm(channels=3).double()
    gen = torch.Generator().manual_seed(7)
    scale = torch.tensor([0.5, 2.0, 3.0], dtype=F64)[None, :, None, None]
    x = torch.randn(16, 3, 4, 4, generator=gen, dtype=F64) * scale + 1.5
    y = norm(x)  # train mode: first batch initialises
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=F64))
    torch.testing.assert_close(
        y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=F64)
    )
    torch.testing.assert_close(norm.inverse(y), x, atol=1e-12, rtol=0)
    jac = _matrix(lambda t: norm(t[None])[0], x[0])
    torch.testing.assert_close(norm.log_det(4, 4), torch.linalg.slogdet(jac)[1])


def test_squeeze_is_an_exact_reordering() -> None:
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    s = squeeze(x)
    assert s.shape == (1, 8, 2, 2)
    # channel 4c + 2i + j holds pixels (2r + i, 2q + j) of input channel c
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(s[0, 4 * c + 2 * i + j], x[0, c, i::2, j::2])
    assert torch.equal(unsqueeze(s), x)


def test_bits_per_dim_of_a_standard_gaussian_matches_the_closed_form() -> None:
    flow = _build("iresnet_flow")
    with torch.no_grad():  # W3 = 0: every branch is zero, the flow a pure reordering
        for name, conv in flow.spectral_convs():
            if name.endswith("conv3"):
                conv.weight_orig.zero_()
                conv.bias.zero_()
    flow.eval()
    n = 4000
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(8), dtype=F64)
    with torch.no_grad():
        bpd = bits_per_dim(flow(x), 64)
    closed = (0.5 * x.flatten(1).pow(2).sum(1) + 32 * math.log(2 * math.pi)) / (
        64 * math.log(2)
    ) + 8
    torch.testing.assert_close(bpd, closed, atol=1e-10, rtol=0)
    entropy = 0.5 * math.log2(2 * math.pi * math.e) + 8  # E[bpd] per dimension
    assert abs(float(bpd.mean()) - entropy) < 3 * float(bpd.std()) / math.sqrt(n)


# --- (5) FedAvg + server_update, (6) ActNorm state travels -------------------


def _train(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int
) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fedavg_then_server_update_keeps_the_lipschitz_bound() -> None:
    x, y = digit_images()
    x = (x / 16 - 0.5).double()
    server = _build("iresnet")
    clients = [copy.deepcopy(server) for _ in range(2)]
    for k, client in enumerate(clients):
        _train(client, x[k::2], y[k::2], steps=30)
    roles = models.tensor_roles(server)
    own = server.state_dict()
    states = [c.state_dict() for c in clients]
    average = {
        key: (states[0][key] + states[1][key]) / 2
        if roles[key] == "average" and value.is_floating_point()
        else value
        for key, value in own.items()
    }
    server.load_state_dict(average)
    before = copy.deepcopy(server)
    before.reestimate_spectral_norms()
    server.server_update(1, 10)
    assert max(_operator_norm(c) for _, c in server.spectral_convs()) <= COEFF * (
        1 + 1e-3
    )
    server.eval()
    before.eval()
    probe = x[:50]
    # projecting weight_orig onto the ball leaves the global function unchanged
    torch.testing.assert_close(server(probe), before(probe), atol=1e-10, rtol=0)
    for name, block in server.named_blocks():
        assert bool(block.actnorm.initialized)
        expected = (
            states[0][f"{name}.actnorm.data_loc"]
            + states[1][f"{name}.actnorm.data_loc"]
        ) / 2
        torch.testing.assert_close(block.actnorm.data_loc, expected)
    # convexity: the average of the clients' normalised weights is in the ball
    for (_, c0), (_, c1) in zip(
        clients[0].spectral_convs(), clients[1].spectral_convs(), strict=True
    ):
        c0.reestimate(100)
        c1.reestimate(100)
        mixed = copy.deepcopy(c0)
        with torch.no_grad():
            mixed.weight_orig.copy_(
                (c0.normalized_weight() + c1.normalized_weight()) / 2
            )
        mixed.reestimate(100)
        assert _operator_norm(mixed) <= COEFF * (1 + 1e-3)


def test_a_model_loading_trained_weights_does_not_reinitialise_actnorm() -> None:
    x, _ = digit_images()
    x = (x / 16 - 0.5).double()
    trained = _build("iresnet_flow")
    trained.train()
    trained(x[:64])
    fresh = _build("iresnet_flow", seed=1)
    fresh.load_state_dict(trained.state_dict())
    fresh.train()
    fresh(x[-64:])  # other data: would give other statistics
    control = _build("iresnet_flow", seed=1)
    control.train()
    control(x[-64:])
    state = trained.state_dict()
    blocks = zip(trained.named_blocks(), fresh.named_blocks(), strict=True)
    for (name, a), (_, b) in blocks:
        assert bool(state[f"{name}.actnorm.initialized"])
        assert torch.equal(a.actnorm.data_loc, b.actnorm.data_loc)
        assert torch.equal(a.actnorm.data_log_scale, b.actnorm.data_log_scale)
    # without the loaded flag the same data would have re-initialised it
    moved = control.stage(0)[0].actnorm.data_loc - trained.stage(0)[0].actnorm.data_loc
    assert float(moved.abs().max()) > 1e-3


# --- permutations, roles, widths, options -------------------------------------


def test_spec_holds_only_branch_hidden_channels_and_needs_u_v() -> None:
    model = _build("iresnet")
    spec = models.permutation_spec(model)
    assert len(spec) == 16  # 8 blocks x (W1, W2 outputs)
    assert all(".branch.conv" in ref.tensor for g in spec for ref in g.axes)
    perturb_state(model)
    model.eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(10), dtype=F64)
    assert max_output_change(model, spec, x) < 1e-10
    without_uv = PermutationSpec(
        tuple(
            dataclasses.replace(
                g, axes=tuple(r for r in g.axes if not r.tensor.endswith((".u", ".v")))
            )
            for g in spec
        )
    )
    assert max_output_change(model, without_uv, x) > 1e-4


def test_server_update_commutes_with_permutations() -> None:
    model = _build("iresnet")
    _stress(model)
    spec = models.permutation_spec(model)
    perms = random_permutations(spec, np.random.default_rng(0))
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state_dict(model.state_dict(), spec, perms))
    model.server_update(1, 1)
    other.server_update(1, 1)
    expected = permute_state_dict(model.state_dict(), spec, perms)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-9, rtol=0)


def test_roles_keep_u_v_and_the_actnorm_flag_on_the_server() -> None:
    roles = models.tensor_roles(_build("iresnet_flow"))
    server = {k for k, r in roles.items() if r == "server"}
    assert server == {
        k for k in roles if k.endswith((".u", ".v", ".actnorm.initialized"))
    }
    assert len(server) == 8 * 3 * 2 + 8
    assert roles["prior_mean"] == "average"


def test_pruned_state_rebuilds_at_the_new_width() -> None:
    model = _build("iresnet")
    spec = models.permutation_spec(model)
    state = select_units(model.state_dict(), spec, "stages.1.2.hidden.0", [5, 0, 9])
    rebuilt = models.fit_to_state(model, state)
    assert rebuilt.fedsim_kwargs["hidden"][1][4] == 3
    rebuilt.load_state_dict(state)  # strict: every shape fits
    assert models.permutation_spec(rebuilt).group("stages.1.2.hidden.0").size == 3


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("iresnet", {"coeff": 1.0}, "coeff=1.0"),
        ("iresnet", {"hidden": [[16, 16, 16]]}, "two positive widths"),
        ("iresnet", {"hidden": [[4, 4]] * 4}, "divisible by 16"),
        ("iresnet", {"server_iterations": 5}, "server_iterations=5"),
        ("iresnet", {"pad_channels": -1}, "pad_channels=-1"),
        ("iresnet_flow", {"log_det": "exactish"}, "log_det='exactish'"),
        ("iresnet_flow", {"terms": 0}, "terms=0"),
    ],
)
def test_bad_options_are_refused_in_one_sentence(
    name: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        models.build(name, **SMALL, **options)


def test_28x28_layout() -> None:
    flow = models.build("iresnet_flow", input_shape=(1, 28, 28), num_classes=10)
    assert flow.shapes == [(4, 14, 14), (8, 7, 7)]
    flow.eval()
    assert flow(torch.rand(2, 1, 28, 28)).shape == (2,)


# --- functional training and (7) short training runs ---------------------------


@pytest.mark.parametrize(
    ("name", "options"), [("iresnet", {}), ("iresnet_flow", {"log_det": "exact"})]
)
def test_functional_gradients_match_eager_and_vmap(
    name: str, options: dict[str, Any]
) -> None:
    model = _build(name, **options)
    model.train()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(11), dtype=F64)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}

    def loss(p: dict[str, Any], b: dict[str, Any], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**p, **b}, (xb,)).pow(2).mean()

    eager = copy.deepcopy(model)
    eager(x).pow(2).mean().backward()
    grads = grad(loss)(params, {k: v.clone() for k, v in buffers.items()}, x)
    for key, p in eager.named_parameters():
        torch.testing.assert_close(grads[key], p.grad)
    batched_params = {k: torch.stack([v, v]) for k, v in params.items()}
    batched_buffers = {k: torch.stack([v, v]) for k, v in buffers.items()}
    both = vmap(grad(loss), in_dims=(0, 0, None))(batched_params, batched_buffers, x)
    for key in grads:
        torch.testing.assert_close(both[key][1], grads[key])


def test_classifier_learns_digits() -> None:
    x, y = digit_images()
    x = x / 16 - 0.5
    torch.manual_seed(0)
    model = models.build("iresnet", **SMALL)
    gen = torch.Generator().manual_seed(0)
    losses = adam_steps(model, x, y, steps=200, batch=64, lr=3e-3, generator=gen)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.85


def test_flow_negative_log_likelihood_falls_on_digits() -> None:
    x, _ = digit_images()
    torch.manual_seed(0)
    flow = models.build("iresnet_flow", **SMALL)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    bpd = []
    for _ in range(100):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        # dequantise the 17 grey levels of the digits to [-0.5, 0.5)
        xb = (x[idx] + torch.rand(x[idx].shape, generator=gen)) / 17 - 0.5
        log_p = flow(xb)
        opt.zero_grad()
        (-log_p.mean()).backward()
        opt.step()
        bpd.append(float(bits_per_dim(log_p.detach(), 64, levels=17).mean()))
    assert np.mean(bpd[-10:]) < np.mean(bpd[:10]) - 0.5
