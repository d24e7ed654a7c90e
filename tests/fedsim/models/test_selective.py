"""Selective convolution and the selective DenseNet/ResNet."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import PermutationSpec, select_units
from fedsim.models._selective_conv import (
    SelectiveConv2d,
    expected_relu,
    shift_channels,
)
from fedsim.models.selective_densenet import SelectiveDenseNet
from fedsim.models.selective_resnet import SelectiveResNet
from tests.fedsim.models._helpers import adam_steps, digit_images
from tests.support import SMALL_BUILD, max_output_change, perturb_state

NAMES = ["selective_densenet", "selective_resnet"]


# ---------------------------------------------------------------- helpers
def _layers(model: torch.nn.Module) -> Iterator[SelectiveConv2d]:
    return (m for m in model.modules() if isinstance(m, SelectiveConv2d))


def _weaken(layer: SelectiveConv2d, channels: list[int]) -> None:
    """Make ``channels`` nearly silent: tiny BN scale, very negative BN bias."""
    with torch.no_grad():
        layer.bn.weight[channels] = 1e-3
        layer.bn.bias[channels] = -3.0


def _noisy_model(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> SelectiveDenseNet | SelectiveResNet:
    """Every float tensor perturbed, gates reset to 1, and the first two input
    channels of every selective conv weakened (so de-allocation closes them)."""
    torch.manual_seed(seed)
    model = models.build(name, **SMALL_BUILD).to(dtype)
    perturb_state(model, seed)
    for layer in _layers(model):
        layer.g.fill_(1.0)
        _weaken(layer, [0, 1])
    assert isinstance(model, SelectiveDenseNet | SelectiveResNet)
    return model


def _pointers_are_roots(layer: SelectiveConv2d) -> bool:
    assert layer.p is not None
    p = layer.p
    targets = p[p >= 0]
    return bool((targets < layer.in_channels).all() and (p[targets] == -1).all())


def _batch(seed: int, n: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SMALL_BUILD["input_shape"], generator=gen)


# ------------------------------------------------------------------- ECDM
def test_expected_relu_matches_closed_value_and_monte_carlo() -> None:
    mean, std = torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.2)
    closed = float(expected_relu(mean, std.double()))
    # hand value: 1.2 * phi(0.25) + 0.3 * Phi(0.25)
    assert closed == pytest.approx(0.64361, abs=5e-6)
    gen = torch.Generator().manual_seed(0)
    z = 0.3 + 1.2 * torch.randn(2_000_000, generator=gen, dtype=torch.float64)
    samples = z.clamp_min(0.0)
    stderr = float(samples.std()) / math.sqrt(samples.numel())
    assert abs(float(samples.mean()) - closed) < 4 * stderr
    # a negative BN scale acts like its absolute value; a zero scale gives max(m, 0)
    assert float(expected_relu(mean, -std.double())) == pytest.approx(closed)
    zero = torch.zeros(2)
    assert expected_relu(torch.tensor([0.7, -0.7]), zero).tolist() == pytest.approx(
        [0.7, 0.0]
    )


def test_ecdm_is_summed_weight_times_gate_times_expected_relu() -> None:
    torch.manual_seed(1)
    layer = SelectiveConv2d(in_channels=3, out_channels=2, kernel_size=3, top_k=0)
    with torch.no_grad():
        layer.bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0]))
        layer.bn.bias.copy_(torch.tensor([0.2, 0.1, -1.0]))
        layer.g[1] = 0.0
    w = layer.conv.weight.detach()
    damage = layer.channel_damage().detach()
    for o in range(2):
        for j in range(3):
            gamma = float(layer.bn.weight[j].detach())
            beta = float(layer.bn.bias[j].detach())
            t = beta / abs(gamma)
            e = abs(gamma) * math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
            e += beta * 0.5 * (1 + math.erf(t / math.sqrt(2)))
            want = float(w[o, j].sum()) * float(layer.g[j]) * e
            assert float(damage[o, j]) == pytest.approx(want, rel=1e-5)
    rows = layer.normalized_damage().sum(dim=1)
    torch.testing.assert_close(rows, torch.ones(2))


# ---------------------------------------------------- de-allocation (test 2)
@pytest.mark.parametrize("name", NAMES)
def test_deallocation_closes_the_longest_prefix_within_gamma(name: str) -> None:
    model = _noisy_model(name)
    closed_somewhere = 0
    for layer in _layers(model):
        with torch.no_grad():
            damage = layer.normalized_damage()
        closed = layer.deallocate()
        assert set(closed.tolist()) == set((layer.g == 0).nonzero().flatten().tolist())
        assert {0, 1} <= set(closed.tolist())
        assert float(damage[:, closed].sum(dim=1).max()) <= layer.gamma
        # the prefix is the longest: adding the next channel would break the budget
        order = torch.argsort(damage.max(dim=0).values, stable=True)
        assert order[: len(closed)].tolist() == closed.tolist()
        one_more = order[: len(closed) + 1]
        assert float(damage[:, one_more].sum(dim=1).max()) > layer.gamma
        if layer.p is not None:
            assert (layer.p[closed] == -1).all()
        closed_somewhere += len(closed)
    assert closed_somewhere > 0


# ---------------------------------------------------- re-allocation (test 3)
@pytest.mark.parametrize("name", NAMES)
def test_reallocation_keeps_function_budget_and_tensor_sizes(name: str) -> None:
    model = _noisy_model(name).eval()
    x = _batch(1)
    sizes = {k: t.numel() for k, t in model.state_dict().items()}
    budget_before = model.effective_weights()
    with torch.no_grad():
        model.deallocate()
        after_dealloc = model(x)
        pruned = {id(m): m.effective_weights() for m in _layers(model)}
        model.reallocate(torch.Generator().manual_seed(0))
        after_realloc = model(x)
    assert torch.equal(after_realloc, after_dealloc)
    assert {k: t.numel() for k, t in model.state_dict().items()} == sizes
    lost = 0
    copies = 0
    for layer in _layers(model):
        if layer.top_k > 0:
            assert (layer.g == 1).all()
            assert layer.p is not None
            copies += int((layer.p >= 0).sum())
        else:
            # prune-only layers keep exactly what de-allocation left them
            assert layer.effective_weights() == pruned[id(layer)]
            lost += layer.in_channels * layer.out_channels * 9 - pruned[id(layer)]
    assert copies > 0
    # copy layers got their whole budget back; only the 3x3 convs shrank
    assert model.effective_weights() == budget_before - lost


def test_reallocated_slot_copies_bn_zeroes_weights_and_draws_a_shift() -> None:
    torch.manual_seed(2)
    layer = SelectiveConv2d(in_channels=6, out_channels=4, kernel_size=1, top_k=2)
    _weaken(layer, [4])
    layer.deallocate()
    assert layer.g[4] == 0
    reopened = layer.reallocate(torch.Generator().manual_seed(3))
    assert reopened.tolist() == [4]
    assert layer.p is not None and layer.b is not None
    source = int(layer.p[4])
    score = layer.normalized_damage().norm(dim=0)
    score[4] = -1.0
    assert source in torch.topk(score, 2).indices.tolist()
    for t in (layer.bn.weight, layer.bn.bias, layer.bn.running_mean):
        assert t[4] == t[source]
    assert (layer.conv.weight[:, 4] == 0).all()
    assert (layer.b[4].abs() <= 1.5).all() and (layer.b[4] != 0).all()


def test_max_copies_limits_the_copies_of_one_channel() -> None:
    torch.manual_seed(4)
    layer = SelectiveConv2d(
        in_channels=8, out_channels=3, kernel_size=1, top_k=1, max_copies=2
    )
    _weaken(layer, [3, 4, 5, 6])
    layer.deallocate()
    layer.reallocate(torch.Generator().manual_seed(0))
    assert layer.p is not None
    counts = torch.bincount(layer.p[layer.p >= 0], minlength=8)
    assert int(counts.max()) == 2  # one source, two copies, the other slots wait
    assert int((layer.g == 0).sum()) == 2


# ------------------------------------------------------- pointers (test 4)
def test_pointers_never_point_to_a_copy_over_many_rounds() -> None:
    torch.manual_seed(5)
    layer = SelectiveConv2d(in_channels=10, out_channels=4, kernel_size=1, top_k=3)
    gen = torch.Generator().manual_seed(6)
    saw_copy_of_copy_source = False
    for _ in range(25):
        # random training drift: some channels fade, some copies become important
        with torch.no_grad():
            layer.conv.weight.add_(0.3 * torch.randn(layer.conv.weight.shape))
            fade = torch.randperm(10, generator=gen)[:3].tolist()
        _weaken(layer, fade)
        layer.deallocate()
        assert layer.p is not None
        is_copy = layer.p >= 0
        score = layer.normalized_damage().norm(dim=0)
        top = torch.topk(score, 3).indices
        saw_copy_of_copy_source |= bool(is_copy[top].any())
        layer.reallocate(gen)
        assert _pointers_are_roots(layer)
        layer.check_selection()
        with torch.no_grad():
            layer.bn.weight.normal_(1.0, 0.2)
            layer.bn.bias.normal_(0.0, 0.2)
    # the run exercised sources that were themselves copies
    assert saw_copy_of_copy_source


def test_closed_root_of_live_copies_is_reopened_in_place() -> None:
    layer = SelectiveConv2d(in_channels=5, out_channels=3, kernel_size=1, top_k=1)
    assert layer.p is not None
    with torch.no_grad():
        layer.conv.weight.fill_(1.0)
        layer.p[3] = 0  # slot 3 copies channel 0
        layer.conv.weight[:, 0] = 0.0  # channel 0 itself has gone silent
    closed = layer.deallocate()
    assert 0 in closed.tolist() and int(layer.p[3]) == 0
    x = torch.randn(2, 5, 4, 4)
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        layer.reallocate(torch.Generator().manual_seed(0))
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    assert int(layer.p[0]) == -1 and layer.g[0] == 1
    assert _pointers_are_roots(layer)


# ---------------------------------------------------------- shifts (test 5)
def test_unit_shift_is_an_interior_one_pixel_translation() -> None:
    x = torch.randn(2, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    out = shift_channels(x, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # channel 0 moves one pixel along the width, channel 1 along the height
    torch.testing.assert_close(out[:, 0, :, :-1], x[:, 0, :, 1:])
    torch.testing.assert_close(out[:, 1, :-1, :], x[:, 1, 1:, :])
    # border padding repeats the last column / row
    torch.testing.assert_close(out[:, 0, :, -1], x[:, 0, :, -1])
    torch.testing.assert_close(out[:, 1, -1, :], x[:, 1, -1, :])
    # a half-pixel shift is the mean of neighbours; zero shift is the identity
    half = shift_channels(x, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(
        half[:, 0, :, :-1], 0.5 * (x[:, 0, :, :-1] + x[:, 0, :, 1:])
    )
    torch.testing.assert_close(half[:, 1], x[:, 1])


def test_copy_slot_reads_the_shifted_source_channel() -> None:
    layer = SelectiveConv2d(in_channels=3, out_channels=2, kernel_size=1, top_k=1)
    assert layer.p is not None and layer.b is not None
    with torch.no_grad():
        layer.p[2] = 0
        layer.b[2] = torch.tensor([1.0, 0.0])
    x = torch.randn(2, 3, 4, 4)
    x_hat = layer.gather_inputs(x)
    torch.testing.assert_close(x_hat[:, :2], x[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(x_hat[:, 2, :, :-1], x[:, 0, :, 1:])


# ------------------------------------------- permutations with live copies
@pytest.mark.parametrize("name", NAMES)
def test_permutation_spec_holds_with_copies_and_relabels_pointers(name: str) -> None:
    model = _noisy_model(name, seed=1, dtype=torch.float64)
    model.deallocate()
    model.reallocate(torch.Generator().manual_seed(1))
    with torch.no_grad():  # copies must matter for the check to mean anything
        for layer in _layers(model):
            layer.conv.weight.add_(0.1 * torch.randn_like(layer.conv.weight))
    assert sum(int((m.p >= 0).sum()) for m in _layers(model) if m.p is not None)
    spec = models.permutation_spec(model)
    x = _batch(2).double()
    for seed in range(3):
        assert max_output_change(model, spec, x, seed) < 1e-5
    # without relabelling the pointer values the copies read the wrong channels
    unrelabelled = PermutationSpec(
        tuple(
            dataclasses.replace(g, axes=tuple(a for a in g.axes if not a.values))
            for g in spec
        )
    )
    assert max_output_change(model, unrelabelled, x, seed=0) > 1e-4


# ------------------------------------------------------ federated roles
@pytest.mark.parametrize("name", NAMES)
def test_gates_and_pointers_are_server_owned_shifts_are_averaged(name: str) -> None:
    model = models.build(name, **SMALL_BUILD)
    roles = models.tensor_roles(model)
    server = {k for k, r in roles.items() if r == "server"}
    assert server == {k for k in roles if k.endswith((".g", ".p"))}
    assert any(k.endswith(".p") for k in server)
    assert all(roles[k] == "average" for k in roles if k.endswith(".b"))


def _aggregate(
    global_model: torch.nn.Module, clients: Sequence[torch.nn.Module]
) -> None:
    """FedAvg of the averaged tensors; server tensors keep the global value."""
    roles = models.tensor_roles(global_model)
    state = global_model.state_dict()
    new = {}
    for key, value in state.items():
        if roles[key] == "server" or not value.is_floating_point():
            new[key] = value
        else:
            new[key] = torch.stack([c.state_dict()[key] for c in clients]).mean(0)
    global_model.load_state_dict(new)


@pytest.mark.parametrize("name", NAMES)
def test_server_update_on_an_aggregate_keeps_a_valid_selection(name: str) -> None:
    server = _noisy_model(name, seed=3)
    clients = []
    for j in range(2):
        client = _noisy_model(name, seed=3)
        with torch.no_grad():
            for p in client.parameters():
                p.add_(
                    0.05
                    * torch.randn(p.shape, generator=torch.Generator().manual_seed(j))
                )
        for layer in _layers(client):
            _weaken(layer, [0, 1])
        clients.append(client)
    _aggregate(server, clients)
    server.server_update(1, 4)
    pointers = 0
    for layer in _layers(server):
        assert set(layer.g.unique().tolist()) <= {0.0, 1.0}
        if layer.p is not None:
            assert layer.p.dtype == torch.long
            assert _pointers_are_roots(layer)
            pointers += int((layer.p >= 0).sum())
    assert pointers > 0
    # a second aggregation round (clients now hold the server's selection)
    for client in clients:
        client.load_state_dict(server.state_dict())
    _aggregate(server, clients)
    server.server_update(2, 4)
    for layer in _layers(server):
        layer.check_selection()


def test_server_update_runs_in_the_first_half_and_refuses_averaged_gates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = models.build("selective_resnet", **SMALL_BUILD)
    calls: list[int] = []
    monkeypatch.setattr(model, "deallocate", lambda: calls.append(1))
    for total, expected in [(4, [1, 2]), (5, [1, 2, 3]), (1, [1])]:
        ran = []
        for r in range(1, total + 1):
            calls.clear()
            model.server_update(r, total)
            if calls:
                ran.append(r)
        assert ran == expected
    with pytest.raises(ValueError, match="server_round"):
        model.server_update(0, 3)
    next(_layers(model)).g[0] = 0.5
    with pytest.raises(ValueError, match="gates must be exactly 0 or 1"):
        model.server_update(1, 3)


def test_server_update_draws_are_reproducible_per_round() -> None:
    def run(server_round: int) -> dict[str, torch.Tensor]:
        model = _noisy_model("selective_densenet", seed=7)
        model.server_update(server_round, 10)
        return model.state_dict()

    a, b, c = run(2), run(2), run(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(".b"))


# ----------------------------------------------- widths and functional use
@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("selective_densenet", "growth.0.0"),
        ("selective_resnet", "stage.0"),
    ],
)
def test_rebuild_at_a_narrower_width_matches_silenced_units(
    name: str, group: str
) -> None:
    model = _noisy_model(name, seed=8, dtype=torch.float64).eval()
    spec = models.permutation_spec(model)
    g = spec.group(group)
    keep = np.arange(1, g.size, 2)
    dropped = np.setdiff1d(np.arange(g.size), keep)
    # silence the dropped units downstream: close their gates, zero their columns
    with torch.no_grad():
        state = model.state_dict()
        for ref in g.axes:
            if ref.tensor.endswith(".g") or ref.tensor == "fc.weight":
                idx = torch.as_tensor(ref.offset + dropped)
                state[ref.tensor].index_fill_(ref.axis, idx, 0.0)
    small_state = select_units(model.state_dict(), spec, group, keep)
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, {group: len(keep)})
    small = models.build(name, **kwargs).double().eval()
    small.load_state_dict(small_state)  # strict: every shape must fit
    x = _batch(3).double()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_every_group_width_can_be_rebuilt(name: str) -> None:
    model = models.build(name, **SMALL_BUILD)
    spec = models.permutation_spec(model)
    want = {g.name: g.size + 1 + i % 3 for i, g in enumerate(spec)}
    kwargs = models.rebuild_kwargs(model.fedsim_kwargs, spec, want)
    wider = models.build(name, **kwargs)
    assert models.permutation_spec(wider).widths() == want
    x = _batch(4)
    assert wider.eval()(x).shape == (len(x), SMALL_BUILD["num_classes"])


@pytest.mark.parametrize("name", NAMES)
def test_vmapped_functional_gradients_match_autograd(name: str) -> None:
    model = _noisy_model(name, seed=9, dtype=torch.float64).eval()
    model.deallocate()
    model.reallocate(torch.Generator().manual_seed(0))
    buffers = dict(model.named_buffers())
    base = {k: v.detach() for k, v in model.named_parameters()}
    clients = [base, {k: v + 0.01 for k, v in base.items()}]
    xs = torch.stack([_batch(10, 4), _batch(11, 4)]).double()

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, buffers), (x,)).pow(2).mean()

    stacked = {k: torch.stack([c[k] for c in clients]) for k in base}
    grads = vmap(grad(loss))(stacked, xs)
    for j, params in enumerate(clients):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        want = torch.autograd.grad(loss(leaves, xs[j]), list(leaves.values()))
        for key, w in zip(leaves, want, strict=True):
            torch.testing.assert_close(grads[key][j], w)


def test_bad_options_are_refused_in_one_sentence() -> None:
    with pytest.raises(ConfigError, match="same number of layers"):
        models.build(
            "selective_densenet", **SMALL_BUILD, growth=[[4, 4]], bottleneck=[[8]]
        )
    with pytest.raises(ConfigError, match=r"\[1x1 width, 3x3 width\] pairs"):
        models.build("selective_resnet", **SMALL_BUILD, bottleneck=[[[8]], [[8, 8]]])
    with pytest.raises(ConfigError, match="gamma must lie in"):
        models.build("selective_resnet", **SMALL_BUILD, gamma=1.5)
    with pytest.raises(ConfigError, match="added must be"):
        models.build("selective_resnet", **SMALL_BUILD, added=[0, 4])


# ------------------------------------------------------- training (test 7)
@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: these nets are tiny, and on a shared 2-core
    machine two threads spend most of their time waiting for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NAMES)
def test_training_on_digits_lowers_the_loss(name: str) -> None:
    x, y = digit_images()
    x = x / 16.0
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    # a loose damage budget, so that this short run really closes and copies
    model = models.build(name, **SMALL_BUILD, gamma=0.05)
    gen = torch.Generator().manual_seed(1)
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        first = float(loss_fn(model.eval()(x[train]), y[train]))
    model.train()

    def server_schedule(step: int) -> None:
        if step % 40 == 0:  # rounds 1..4 of 8: the server's schedule, mid-run
            model.server_update(step // 40, 8)

    adam_steps(
        model,
        x,
        y,
        steps=160,
        batch=32,
        lr=3e-3,
        generator=gen,
        pool=train,
        after_step=server_schedule,
    )
    copies = sum(int((m.p >= 0).sum()) for m in _layers(model) if m.p is not None)
    model.eval()
    with torch.no_grad():
        last = float(loss_fn(model(x[train]), y[train]))
        accuracy = float((model(x[test]).argmax(1) == y[test]).float().mean())
    print(
        f"{name}: loss {first:.3f} -> {last:.3f}, held-out accuracy "
        f"{accuracy:.3f}, {copies} copies, {model.effective_weights()} weights"
    )
    assert copies > 0
    assert last < 0.3 * first
    assert accuracy > 0.8
