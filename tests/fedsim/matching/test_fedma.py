"""FedMA's layer steps: what freezes, block patching, recovery of permuted copies."""

from __future__ import annotations

import copy

import numpy as np
import torch

from fedsim import models
from fedsim.matching.fedma import average_rest, frozen_keys, match_layer, patch_client
from fedsim.matching.match import global_model
from fedsim.matching.permspec import permute_state_dict, random_permutations
from tests.support import perturb_state


def small_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build(
        "cnn", input_shape=(1, 8, 8), num_classes=5, channels=[4, 6], hidden=[7]
    ).double()
    perturb_state(model, seed)
    return model.eval()


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_a_step_freezes_the_matched_layers_but_never_the_output_layer() -> None:
    net = small_cnn(0)
    spec = models.permutation_spec(net)
    head = ["fcs.1.weight", "fcs.1.bias"]
    bn0 = [f"bns.0.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    bn1 = [k.replace("bns.0", "bns.1") for k in bn0]
    assert frozen_keys(spec, shapes(net), ["conv.0"], head) == ["convs.0.weight", *bn0]
    assert frozen_keys(spec, shapes(net), ["conv.0", "conv.1"], head) == [
        "convs.0.weight",
        "convs.1.weight",
        *bn0,
        *bn1,
    ]
    every = frozen_keys(spec, shapes(net), spec.names(), head)
    assert "fcs.0.weight" in every and "fcs.0.bias" in every
    assert not set(head) & set(every)
    assert "bns.0.num_batches_tracked" not in every  # moved by no group


def test_block_patching_puts_units_in_global_order_and_pads_with_zeros() -> None:
    net = small_cnn(1)
    state = net.state_dict()
    assignment = np.array([5, 0, 3, 1])  # conv.0 units -> 4 of 6 global units
    patched = patch_client(
        state,
        models.permutation_spec(net),
        group="conv.0",
        assignment=assignment,
        width=6,
        frozen={},
    )
    nxt = patched["convs.1.weight"]
    assert tuple(nxt.shape) == (6, 6, 3, 3)
    for u, atom in enumerate(assignment):
        assert torch.equal(nxt[:, atom], state["convs.1.weight"][:, u])
        assert torch.equal(patched["bns.0.bias"][atom], state["bns.0.bias"][u])
    for atom in (2, 4):
        assert not nxt[:, atom].any() and not patched["convs.0.weight"][atom].any()
    assert torch.equal(patched["fcs.0.weight"], state["fcs.0.weight"])


def test_layer_by_layer_matching_of_permuted_copies_keeps_every_function() -> None:
    original = small_cnn(2)
    spec = models.permutation_spec(original)
    rng = np.random.default_rng(3)
    clients = []
    for _ in range(3):
        clone = copy.deepcopy(original)
        perms = random_permutations(spec, rng)
        clone.load_state_dict(permute_state_dict(original.state_dict(), spec, perms))
        clients.append(clone)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4)).double()
    with torch.no_grad():
        want = original(x)
    states = [c.state_dict() for c in clients]
    counts = np.full((3, 5), 4.0)
    widths: dict[str, int] = {}
    frozen: dict[str, torch.Tensor] = {}
    for group in spec.names():  # bottom-up
        specs = [models.permutation_spec(global_model(original, s)) for s in states]
        step = match_layer(
            states,
            specs,
            group,
            widths,
            counts,
            roles=models.tensor_roles(original),
            buffers={n for n, _ in original.named_buffers()},
            sigma2=1.0,
            sigma0_2=1e8,
            gamma=1.0,  # PFNM's score: with a vague prior gamma decides new vs same
            iters=3,
            rng=np.random.default_rng(0),
        )
        assert step.width == spec.group(group).size
        widths[group] = step.width
        frozen.update(step.frozen)
        states = [
            patch_client(
                s, sp, group=group, assignment=a, width=step.width, frozen=step.frozen
            )
            for s, sp, a in zip(states, specs, step.assignments, strict=True)
        ]
        for s in states:  # each client still computes the original function
            with torch.no_grad():
                got = global_model(original, s).eval()(x)
            assert float((got - want).abs().max()) < 1e-6
        # after a step every client holds the same frozen tensors
        for key in step.frozen:
            assert all(torch.equal(s[key], states[0][key]) for s in states)
    rest = [k for k in states[0] if k not in frozen]
    assert set(rest) == {
        "bns.0.num_batches_tracked",
        "bns.1.num_batches_tracked",
        "fcs.1.weight",
        "fcs.1.bias",
    }
    averaged = average_rest(states, specs, rest, counts)
    merged = global_model(original, {**frozen, **averaged}).eval()
    with torch.no_grad():
        assert float((merged(x) - want).abs().max()) < 1e-6


def test_the_output_layer_is_averaged_per_class() -> None:
    nets = [small_cnn(5), small_cnn(6)]
    states = [n.state_dict() for n in nets]
    specs = [models.permutation_spec(n) for n in nets]
    counts = np.array([[3.0, 0, 1, 1, 1], [1.0, 2, 0, 1, 3]])
    out = average_rest(
        states, specs, ["fcs.1.weight", "fcs.1.bias", "fcs.0.bias"], counts
    )
    share = counts / counts.sum(0)
    for key in ("fcs.1.weight", "fcs.1.bias"):
        pi = share.reshape(2, 5, *([1] * (states[0][key].ndim - 1)))
        want = sum(pi[j] * states[j][key].numpy() for j in range(2))
        np.testing.assert_allclose(out[key].numpy(), want)
    n = counts.sum(1)  # other tensors: by example counts
    want = (n[0] * states[0]["fcs.0.bias"] + n[1] * states[1]["fcs.0.bias"]) / n.sum()
    np.testing.assert_allclose(out["fcs.0.bias"].numpy(), want.numpy())
