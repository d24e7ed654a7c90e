"""LegoNet: Lego convolution maths, mask learning, federated masks, training."""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.func import functional_call, grad, vmap

from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import (
    AxisRef,
    PermGroup,
    PermutationSpec,
    permute_state_dict,
)
from fedsim.models._lego import LegoConv2d
from fedsim.models.lego_cnn import LegoCNN, lego_cnn
from tests.fedsim.models._helpers import digit_images
from tests.support import max_output_change, perturb_state

CONFIG = Path(__file__).parents[3] / "configs" / "model" / "lego_cnn.yaml"
SMALL = {"input_shape": (1, 8, 8), "num_classes": 10, "stem": 8, "widths": [8, "M", 6]}


def lego_layer(
    *, c: int = 6, n: int = 5, m: int = 3, o: int = 2, d: int = 3, balance: float = 0.0
) -> LegoConv2d:
    torch.manual_seed(0)
    layer = LegoConv2d(
        in_channels=c, out_channels=n, legos=m, fragments=o, kernel=d, balance=balance
    )
    return layer.double()


def assembled_filters(layer: LegoConv2d, index: torch.Tensor) -> torch.Tensor:
    """F_j = concat_i(A[i, j, k*] B[k*]), built entry by entry."""
    o, n, _ = layer.coef.shape
    width = layer.lego.shape[1]
    filters = torch.zeros(n, o * width, *layer.lego.shape[2:], dtype=layer.lego.dtype)
    for i in range(o):
        for j in range(n):
            k = int(index[i, j])
            filters[j, i * width : (i + 1) * width] = (
                layer.coef[i, j, k] * layer.lego[k]
            )
    return filters


def set_selection(layer: LegoConv2d, index: torch.Tensor) -> None:
    """Logits whose argmax is ``index`` (noise below a clear margin)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        noise = 0.1 * torch.randn(
            layer.logits.shape, generator=gen, dtype=torch.float64
        )
        hot = torch.nn.functional.one_hot(index, layer.legos).to(torch.float64)
        layer.logits.copy_(noise + 3.0 * hot)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a - b).abs().max())


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digit_images()
    return x / 16.0, y


# --- (1) parameter count -------------------------------------------------------


@pytest.mark.parametrize(
    ("fragments", "ratio", "lego_params"),
    [(2, 0.5, 34_560), (4, 0.25, 8_640)],
)
def test_parameter_count_matches_formula(
    fragments: int, ratio: float, lego_params: int
) -> None:
    model = models.build(
        "lego_cnn",
        input_shape=(1, 28, 28),
        num_classes=10,
        fragments=fragments,
        ratio=ratio,
    )
    d, c, o, classes = 3, 32, fragments, 10
    expected = 1 * c * d * d + 2 * c  # stem conv + BN
    legos = 0
    for n in (32, 64, 64, 128):
        m = int(ratio * n)
        legos += m * (c // o) * d * d
        expected += 2 * o * n * m + 2 * n  # logits N, coefficients A, BN
        c = n
    expected += legos + c * classes + classes
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(layer.lego.numel() for layer in model.layers) == lego_params == legos
    standard = sum(n * c * d * d for c, n in ((32, 32), (32, 64), (64, 64), (64, 128)))
    assert standard == 138_240


# --- (2) split-transform-merge -------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("frozen", [False, True])
def test_split_transform_merge_equals_assembled_conv(kernel: int, frozen: bool) -> None:
    layer = lego_layer(c=6, n=5, m=4, o=3, d=kernel)
    if frozen:
        layer.freeze_masks(torch.tensor([[3, 0, 1, 2, 3], [1, 1, 0, 2, 2], [0] * 5]))
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    filters = assembled_filters(layer, layer.selection())
    direct = torch.nn.functional.conv2d(x, filters, padding=kernel // 2)
    assert torch.allclose(layer(x), direct, atol=1e-10)
    single = layer.float()
    assert torch.allclose(single(x.float()), direct.float(), atol=1e-5)


# --- (3) straight-through gradient with the balance rule ----------------------


def test_logit_gradient_is_dl_dm_plus_balance() -> None:
    strength = 0.01
    layer = lego_layer(c=4, n=5, m=3, o=2, balance=strength)
    # usage counts 6, 3, 1 around o*n/m = 10/3: Lego 0 over ceil=4, Lego 2 under floor=3
    index = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 2]])
    set_selection(layer, index)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 6, 6, generator=gen, dtype=torch.float64)
    weights = torch.randn(3, 5, 6, 6, generator=gen, dtype=torch.float64)

    def loss_of(y: torch.Tensor) -> torch.Tensor:
        return (y * weights).sum() + y.pow(2).mean()

    # reference: the mask M is a leaf of an explicit sum over every Lego k
    mask = torch.nn.functional.one_hot(index, 3).double().requires_grad_()
    coef = layer.coef.detach().clone().requires_grad_()
    lego = layer.lego.detach().clone().requires_grad_()
    parts = x.reshape(6, 2, 6, 6)
    responses = torch.nn.functional.conv2d(parts, lego, padding=1).reshape(
        3, 2, 3, 6, 6
    )
    reference = torch.einsum("bomhw,onm->bnhw", responses, mask * coef)
    d_mask, d_coef, d_lego = torch.autograd.grad(loss_of(reference), (mask, coef, lego))
    balance = torch.tensor([2 * strength, 0.0, -2 * strength], dtype=torch.float64)

    loss_of(layer(x)).backward()
    assert layer.logits.grad is not None and layer.coef.grad is not None
    assert max_error(layer.logits.grad, d_mask + balance) < 1e-10
    assert d_mask[mask.detach() == 0].abs().min() > 0  # unselected entries too
    assert max_error(layer.coef.grad, d_coef) < 1e-10
    assert max_error(layer.lego.grad, d_lego) < 1e-10

    # a functional step (torch.func.grad) sees the same straight-through gradient
    params = {k: v.detach() for k, v in layer.named_parameters()}
    buffers = dict(layer.named_buffers())

    def functional_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_of(functional_call(layer, (p, buffers), (x,)))

    grads = grad(functional_loss)(params)
    assert max_error(grads["logits"], d_mask + balance) < 1e-10


@pytest.mark.parametrize("frozen", [False, True])
def test_vmapped_client_gradients_match_one_by_one(frozen: bool) -> None:
    """Both paths also run vmapped over a cohort (buffers shared, as server-owned)."""
    layer = lego_layer(c=6, n=5, m=3, o=2, balance=0.01)
    if frozen:
        layer.freeze_masks()
    buffers = dict(layer.named_buffers())
    gen = torch.Generator().manual_seed(3)
    stacked = {
        k: v.detach() + torch.randn(2, *v.shape, generator=gen, dtype=v.dtype)
        for k, v in layer.named_parameters()
    }
    x = torch.randn(2, 4, 6, 5, 5, generator=gen, dtype=torch.float64)

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, (p, buffers), (xb,)).pow(2).mean()

    batched = vmap(grad(loss))(stacked, x)
    selections = [stacked["logits"][c].argmax(2) for c in range(2)]
    assert not torch.equal(*selections)  # the two clients select differently
    assert batched["logits"].any() != frozen  # frozen logits get no gradient
    for client in range(2):
        one = grad(loss)({k: v[client] for k, v in stacked.items()}, x[client])
        for key, value in one.items():
            assert max_error(batched[key][client], value) < 1e-12


# --- (4) frozen masks ----------------------------------------------------------


def test_masks_are_frozen_after_warm_up() -> None:
    torch.manual_seed(0)
    model = lego_cnn(**SMALL)
    x, y = digits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):  # warm-up with open masks
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
        optimizer.step()
    first = model.layers[0]
    assert isinstance(first, LegoConv2d) and not first.is_frozen
    model.eval()
    before = model(x[:8]).detach()
    with torch.no_grad():  # control: while open, the logits decide the output
        first.logits.neg_()
    assert (model(x[:8]) - before).abs().max() > 1e-3
    with torch.no_grad():
        first.logits.neg_()

    model.freeze_masks()
    chosen = [layer.selection().clone() for layer in model.layers]
    with torch.no_grad():
        first.logits.neg_()
    assert torch.equal(model(x[:8]).detach(), before)
    model.train()
    for _ in range(6):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
        assert all(layer.logits.grad is None for layer in model.layers)
        optimizer.step()
    assert all(
        torch.equal(layer.selection(), c) and torch.equal(layer.frozen_index, c)
        for layer, c in zip(model.layers, chosen, strict=True)
    )


def test_freeze_rejects_an_index_outside_the_legos() -> None:
    layer = lego_layer(m=3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        layer.freeze_masks(torch.full((2, 5), 3))
    with pytest.raises(ValueError, match="shape"):
        layer.freeze_masks(torch.zeros(5, 2, dtype=torch.long))


# --- (5) balance rule ----------------------------------------------------------


def usage_after_training(strength: float, steps: int) -> list[int]:
    """Lego usage after SGD on the logits, starting with every pair on Lego 0.

    All Lego filters and coefficients are equal, so the task gradient shifts the
    three logits of a pair equally and cannot change any selection: only the
    balance rule can.
    """
    layer = lego_layer(c=4, n=5, m=3, o=2, balance=strength)
    with torch.no_grad():
        layer.lego.copy_(layer.lego[:1].expand_as(layer.lego))
        layer.coef.copy_(layer.coef[..., :1].expand_as(layer.coef))
        layer.logits.mul_(0.1)
        layer.logits[..., 0] += 0.5
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 4, 6, 6, generator=gen, dtype=torch.float64)
    target = torch.randn(8, 5, 6, 6, generator=gen, dtype=torch.float64)
    optimizer = torch.optim.SGD([layer.logits], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        (layer(x) - target).pow(2).mean().backward()
        optimizer.step()
    return torch.bincount(layer.selection().flatten(), minlength=3).tolist()


def test_balance_rule_moves_usage_towards_the_mean() -> None:
    # o*n/m = 10/3: balanced means every count in [3, 4]
    assert usage_after_training(0.0, steps=80) == [10, 0, 0]
    usage = usage_after_training(0.05, steps=80)
    assert sum(usage) == 10 and all(3 <= f <= 4 for f in usage), usage


# --- (6) federated settlement of the masks -------------------------------------


def fedavg(
    server: torch.nn.Module, clients: list[torch.nn.Module], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Role-aware weighted averaging, as the federated plumbing applies it.

    Averaged float tensors are weighted means; server-owned tensors (and integer
    BatchNorm counters) keep the server's values.
    """
    roles = models.tensor_roles(server)
    states = [c.state_dict() for c in clients]
    out = dict(server.state_dict())
    for key, role in roles.items():
        if role == "average" and out[key].is_floating_point():
            total = sum(w * s[key] for w, s in zip(weights, states, strict=True))
            out[key] = total / sum(weights)
    return out


def local_round(model: torch.nn.Module, seed: int, steps: int = 3) -> None:
    x, y = digits()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(y), (32,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()


def test_roles_make_the_selection_server_owned() -> None:
    model = lego_cnn(**SMALL)
    roles = models.tensor_roles(model)
    server = {k for k, role in roles.items() if role == "server"}
    assert server == {
        f"layers.{i}.{t}" for i in (0, 1) for t in ("frozen_index", "frozen")
    }
    assert roles["layers.0.logits"] == roles["layers.0.coef"] == "average"


def test_aggregation_never_averages_selections() -> None:
    torch.manual_seed(0)
    server = lego_cnn(**SMALL, mask_rounds=1)
    clients = [copy.deepcopy(server) for _ in range(3)]
    gen = torch.Generator().manual_seed(5)
    for seed, client in enumerate(clients):
        local_round(client, seed)
        with torch.no_grad():  # clients that learned clearly different masks
            for layer in client.layers:
                layer.logits.add_(torch.randn(layer.logits.shape, generator=gen))
    weights = [1.0, 2.0, 3.0]
    masks = [
        [
            torch.nn.functional.one_hot(layer.selection(), layer.legos)
            for layer in c.layers
        ]
        for c in clients
    ]
    mean_mask = sum(w * m[0] for w, m in zip(weights, masks, strict=True)) / 6
    assert ((mean_mask > 0) & (mean_mask < 1)).any()  # averaging masks is fractional

    server.load_state_dict(fedavg(server, clients, weights))
    server.server_update(1, 3)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float32)
    for i, layer in enumerate(server.layers):
        logits = sum(
            w * c.layers[i].logits.detach()
            for w, c in zip(weights, clients, strict=True)
        )
        assert layer.is_frozen and layer.frozen_index.dtype == torch.long
        assert torch.equal(layer.frozen_index, logits.argmax(2))
        assert 0 <= int(layer.frozen_index.min()) <= int(layer.frozen_index.max())
        assert int(layer.frozen_index.max()) < layer.legos
    first = server.layers[0]
    filters = assembled_filters(first, first.frozen_index)
    direct = torch.nn.functional.conv2d(x, filters, padding=1)
    assert torch.allclose(first(x), direct, atol=1e-5)

    # round 2: clients train the broadcast masks; a rogue client's copy is ignored
    settled = [layer.frozen_index.clone() for layer in server.layers]
    clients = [copy.deepcopy(server) for _ in range(3)]
    with torch.no_grad():
        clients[0].layers[0].frozen_index.add_(1).remainder_(4)
        clients[0].layers[0].frozen.fill_(False)
    for seed, client in enumerate(clients):
        local_round(client, 10 + seed)
    assert torch.equal(clients[1].layers[0].logits, server.layers[0].logits)
    server.load_state_dict(fedavg(server, clients, weights))
    server.server_update(2, 3)
    for layer, index in zip(server.layers, settled, strict=True):
        assert layer.is_frozen and torch.equal(layer.frozen_index, index)


@pytest.mark.parametrize("mask_rounds", [0, 1, 2])
def test_masks_freeze_after_mask_rounds(mask_rounds: int) -> None:
    model = lego_cnn(**SMALL, mask_rounds=mask_rounds)
    frozen = [all(layer.is_frozen for layer in model.layers)]
    for server_round in (1, 2, 3):
        model.server_update(server_round, 3)
        frozen.append(all(layer.is_frozen for layer in model.layers))
    assert frozen == [r >= mask_rounds for r in range(4)]


# --- (7) training on digits ----------------------------------------------------


def test_training_on_digits_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = models.build(
        "lego_cnn", input_shape=(1, 8, 8), num_classes=10, stem=16, widths=[32, "M", 32]
    )
    x, y = digits()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    train, held_out = order[:1500], order[1500:]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy
    model.eval()
    with torch.no_grad():
        initial = float(loss_fn(model(x[train]), y[train]))
    model.train()
    for step in range(150):
        if step == 50:  # warm-up over: freeze the masks
            model.freeze_masks()
            settled = [layer.selection().clone() for layer in model.layers]
        batch = train[torch.randint(len(train), (32,), generator=gen)]
        optimizer.zero_grad()
        loss_fn(model(x[batch]), y[batch]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        final = float(loss_fn(model(x[train]), y[train]))
        accuracy = float((model(x[held_out]).argmax(1) == y[held_out]).float().mean())
    assert initial > 2.0 and final < 0.4, (initial, final)
    assert accuracy > 0.85, accuracy
    for layer, index in zip(model.layers, settled, strict=True):
        assert torch.equal(layer.selection(), index)


# --- permutation symmetries ----------------------------------------------------


def frozen_model() -> LegoCNN:
    """Float64 model whose frozen selection differs from its logits' argmax."""
    torch.manual_seed(0)
    model = lego_cnn(**SMALL).double()
    perturb_state(model)
    gen = torch.Generator().manual_seed(6)
    for layer in model.layers:
        shape = layer.frozen_index.shape
        layer.freeze_masks(torch.randint(layer.legos, shape, generator=gen))
    return model


def test_spec_is_an_invariance_with_frozen_masks() -> None:
    model = frozen_model()
    spec = model.permutation_spec()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    assert all(max_output_change(model, spec, x, seed) < 1e-8 for seed in range(3))
    # the frozen selection must be relabelled by value with its Lego index
    unlabelled = PermutationSpec(
        tuple(
            PermGroup(g.name, g.size, tuple(a for a in g.axes if not a.values))
            for g in spec
        )
    )
    assert max_output_change(model, unlabelled, x, seed=0) > 1e-4


def bn(name: str, **layout: int) -> tuple[AxisRef, ...]:
    stats = ("weight", "bias", "running_mean", "running_var")
    return tuple(AxisRef(f"{name}.{s}", 0, **layout) for s in stats)


def test_lego_inputs_move_only_in_bundles() -> None:
    model = frozen_model()  # stem 8, fragments 2: bundles {r, r + 4}
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    stem = model.permutation_spec().group("stem")
    assert stem.size == 4 and stem.width_scale == 2
    # permuting fragment 0's channels alone is no symmetry: fragment 1 shares B
    fragment_zero = PermGroup(
        "fragment0",
        4,
        (AxisRef("stem.weight", 0), *bn("stem_bn"), AxisRef("layers.0.lego", 1)),
    )
    assert max_output_change(model, PermutationSpec((fragment_zero,)), x) > 1e-4
    # reordering whole fragments is a symmetry (not declared: it moves the same axis)
    fragments = PermGroup(
        "fragments",
        2,
        (
            AxisRef("stem.weight", 0, block=4),
            *bn("stem_bn", block=4),
            *(AxisRef(f"layers.0.{t}", 0) for t in ("coef", "logits", "frozen_index")),
        ),
    )
    state = model.state_dict()
    model.eval()
    before = model(x)
    model.load_state_dict(
        permute_state_dict(state, PermutationSpec((fragments,)), {"fragments": [1, 0]})
    )
    assert torch.allclose(model(x), before, atol=1e-10)


def test_rebuild_at_new_widths_with_explicit_legos() -> None:
    model = models.build("lego_cnn", **SMALL, legos=[3, 5])
    spec = models.permutation_spec(model)
    assert spec.widths() == {
        "stem": 4,
        "lego.0.legos": 3,
        "lego.0.filters": 4,
        "lego.1.legos": 5,
        "lego.1.filters": 6,
    }
    wider = {"stem": 5, "lego.0.legos": 4, "lego.0.filters": 7, "lego.1.filters": 9}
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, wider)
    assert kwargs["widths"] == [14, "M", 9] and kwargs["stem"] == 10
    rebuilt = models.build("lego_cnn", **kwargs)
    assert models.permutation_spec(rebuilt).widths() == {**spec.widths(), **wider}


def test_ratio_derived_lego_counts_fix_the_lego_widths() -> None:
    model = models.build("lego_cnn", **SMALL)
    spec = models.permutation_spec(model)
    assert spec.group("stem").width_key == "stem"
    fixed = [g.name for g in spec if g.width_key is None]
    assert fixed == ["lego.0.legos", "lego.0.filters", "lego.1.legos", "lego.1.filters"]
    with pytest.raises(ValueError, match=r"lego\.0\.filters"):
        models.rebuild_kwargs(model.fedsim_kwargs, spec, {"lego.0.filters": 5})
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, {"stem": 6})
    assert models.permutation_spec(models.build("lego_cnn", **kwargs)).widths() == {
        **spec.widths(),
        "stem": 6,
    }


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"widths": []}, "at least one Lego width"),
        ({"widths": [8, "X"]}, "'X'"),
        ({"widths": [0]}, "got 0"),
        ({"stem": 7}, "stem of 7"),
        ({"widths": [5, 8]}, "Lego width of 5"),
        ({"widths": ["M", "M", "M", "M", 8]}, "1x1"),
        ({"legos": [3]}, r"one positive count per Lego width \(2\)"),
        ({"ratio": 0.0}, "ratio"),
        ({"kernel": 2}, "kernel"),
        ({"mask_rounds": -1}, "mask_rounds"),
        ({"fragments": 0}, "fragments"),
    ],
)
def test_bad_options_fail_with_one_clear_sentence(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        models.build("lego_cnn", **{**SMALL, **options})


def test_config_file_lists_the_factory_defaults() -> None:
    options = yaml.safe_load(CONFIG.read_text())
    assert options.pop("name") == "lego_cnn"
    defaults = {
        name: p.default
        for name, p in inspect.signature(lego_cnn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert options.keys() == defaults.keys()
    for key, value in options.items():
        default = defaults[key]
        expected = list(default) if isinstance(default, tuple) else default
        assert value == expected, key
    model = models.build("lego_cnn", input_shape=(1, 28, 28), num_classes=10, **options)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert math.isclose(options["balance"], 1e-4)
