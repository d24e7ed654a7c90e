"""Weight plasticity: penalties, the Fisher estimate, aggregation, FedCurv's sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedsim import models, tasks
from fedsim.config import ClientConfig
from fedsim.matching.permspec import permute_state_dict, random_permutations
from fedsim.node import proximal_penalty
from fedsim.plasticity import (
    curvature_sums,
    decayed,
    empirical_fisher,
    fedcurv_penalty,
    fisher_keys,
    leave_out,
    normalise,
    weighted_mean,
    wpl_penalty,
)
from fedsim.train import local_train

TASK = tasks.build("classification")


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = {
        k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()
    }
    return {k: v.abs() for k, v in out.items()} if positive else out


SHAPES = {"a": (3, 2), "b": (4,)}


def value_and_grad(penalty, params):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    value = penalty(leaves)
    grads = torch.autograd.grad(value, list(leaves.values()))
    return value.detach(), dict(zip(leaves, grads, strict=True))


# --- the WPL penalty --------------------------------------------------------


def test_penalty_is_zero_at_the_anchor() -> None:
    anchor = random_tensors(SHAPES, 0)
    fisher = random_tensors(SHAPES, 1, positive=True)
    value, grads = value_and_grad(wpl_penalty(anchor, fisher, 0.7), anchor)
    assert float(value) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_penalty_gradient_is_two_alpha_f_times_the_displacement() -> None:
    """The convention: alpha * sum F (w - w*)^2, no 1/2, gradient 2 alpha F (w - w*)."""
    anchor = random_tensors(SHAPES, 0)
    fisher = random_tensors(SHAPES, 1, positive=True)
    w = random_tensors(SHAPES, 2)
    alpha = 0.3
    value, grads = value_and_grad(wpl_penalty(anchor, fisher, alpha), w)
    expected = sum(float((fisher[k] * (w[k] - anchor[k]) ** 2).sum()) for k in w)
    assert float(value) == pytest.approx(alpha * expected, rel=1e-12)
    for k in w:
        assert torch.allclose(
            grads[k], 2 * alpha * fisher[k] * (w[k] - anchor[k]), atol=1e-12
        )


def test_penalty_refuses_a_fisher_of_another_shape() -> None:
    anchor = random_tensors(SHAPES, 0)
    with pytest.raises(ValueError, match=r"tensor 'a' has shape \(2, 3\)"):
        wpl_penalty(anchor, {"a": torch.ones(2, 3)}, 1.0)


def cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build(
        "cnn", input_shape=(1, 8, 8), num_classes=10, channels=[4, 6], hidden=[8]
    ).double()


def test_permuting_weights_anchor_and_fisher_together_keeps_the_penalty() -> None:
    model = cnn()
    spec = models.permutation_spec(model)
    state = model.state_dict()
    keys = fisher_keys(model)
    shapes = {k: tuple(state[k].shape) for k in keys}
    w = random_tensors(shapes, 1)
    anchor = random_tensors(shapes, 2)
    fisher = random_tensors(shapes, 3, positive=True)
    perms = random_permutations(spec, np.random.default_rng(0))

    def moved(tensors):
        return {k: v for k, v in permute_state_dict(tensors, spec, perms).items()}

    before = float(wpl_penalty(anchor, fisher, 0.5)(w))
    after = float(wpl_penalty(moved(anchor), moved(fisher), 0.5)(moved(w)))
    assert after == pytest.approx(before, rel=1e-12)
    # forgetting to permute the Fisher changes the value: the check can fail
    stale = float(wpl_penalty(moved(anchor), fisher, 0.5)(moved(w)))
    assert abs(stale - before) > 1e-3 * before
    # FedCurv's sums are state-dict shaped too
    sums = curvature_sums([fisher], [anchor])
    permuted = curvature_sums([moved(fisher)], [moved(anchor)])
    assert float(fedcurv_penalty(permuted, 0.5)(moved(w))) == pytest.approx(
        float(fedcurv_penalty(sums, 0.5)(w)), rel=1e-10
    )


# --- the empirical Fisher ---------------------------------------------------


def test_fisher_of_a_two_parameter_model_matches_the_hand_computation() -> None:
    """logits (w0 x, w1 x): d CE / d w_c = (p_c - [y = c]) x for each example."""
    model = torch.nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5], [-1.0]]))
    x = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    expected = np.zeros(2)
    for xi, yi in zip([1.0, 2.0, -1.0], [0, 1, 1], strict=True):
        z = np.array([0.5 * xi, -1.0 * xi])
        p = np.exp(z) / np.exp(z).sum()
        expected += ((p - np.eye(2)[yi]) * xi) ** 2
    expected /= 3
    for method in ("vmap", "loop"):
        fisher = empirical_fisher(model, x, y, TASK, keys=["weight"], method=method)
        assert fisher["weight"].shape == (2, 1)
        assert np.allclose(fisher["weight"][:, 0].numpy(), expected, atol=1e-12)


def test_batched_fisher_equals_the_per_example_loop_on_a_cnn() -> None:
    model = cnn()
    model.train()
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    y = torch.arange(10) % 10
    batched = empirical_fisher(model, x, y, TASK, batch_size=4)
    looped = empirical_fisher(model, x, y, TASK, method="loop")
    assert model.training  # the mode is restored
    assert set(batched) == set(fisher_keys(model))
    assert not any("running" in k for k in batched)
    for k in batched:
        assert torch.allclose(batched[k], looped[k], atol=1e-12)


# --- aggregation --------------------------------------------------------------


def test_weighted_mean_normalise_and_decay_are_exact() -> None:
    f1 = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0])}
    f2 = {"a": torch.tensor([5.0, 1.0]), "b": torch.tensor([0.0])}
    mean = weighted_mean([f1, f2], [1.0, 3.0])
    assert mean["a"].tolist() == [4.0, 1.5] and mean["b"].tolist() == [0.5]
    norm = normalise(mean, "mean")  # entries 4, 1.5, 0.5: mean 2
    assert norm["a"].tolist() == [2.0, 0.75] and norm["b"].tolist() == [0.25]
    assert normalise(mean, "max")["a"].tolist() == [1.0, 0.375]
    assert normalise(mean, "none")["a"].tolist() == [4.0, 1.5]
    assert normalise(mean, "mean", clip=1.0)["a"].tolist() == [1.0, 0.75]
    assert decayed(None, norm, 0.5) == norm
    mixed = decayed(
        norm, {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([2.0])}, 0.25
    )
    assert mixed["a"].tolist() == [0.5, 0.9375] and mixed["b"].tolist() == [1.5625]


# --- special cases -----------------------------------------------------------


def digits(n: int = 256):
    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target[:n])


def train(model, penalty) -> dict[str, torch.Tensor]:
    x, y = digits()
    cfg = ClientConfig(lr=0.1, momentum=0.9, epochs=2, batch_size=32)
    gen = torch.Generator().manual_seed(0)
    return local_train(
        model, x, y, cfg, TASK, generator=gen, penalty=penalty
    ).state_dict


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16])


def test_fisher_one_reproduces_fedprox_and_fisher_zero_fedavg() -> None:
    model = mlp()
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    ones = {k: torch.ones_like(v) for k, v in anchor.items()}
    zeros = {k: torch.zeros_like(v) for k, v in anchor.items()}
    mu = 0.8
    prox = train(model, proximal_penalty(anchor, mu))
    wpl = train(model, wpl_penalty(anchor, ones, mu / 2))
    assert all(torch.equal(prox[k], wpl[k]) for k in prox)
    plain = train(model, None)
    assert all(
        torch.equal(plain[k], train(model, wpl_penalty(anchor, zeros, 5.0))[k])
        for k in plain
    )
    assert any(not torch.equal(prox[k], plain[k]) for k in prox)


def test_a_large_fisher_pins_its_weights_and_leaves_the_others_free() -> None:
    model = mlp()
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    fisher = {
        k: torch.full_like(v, 1.0 if k.startswith("layers.0") else 0.0)
        for k, v in anchor.items()
    }
    trained = train(model, wpl_penalty(anchor, fisher, 5.0))
    free = train(model, None)

    def moved(state, key):
        return float((state[key] - anchor[key]).norm())

    assert moved(trained, "layers.0.weight") < 0.1 * moved(free, "layers.0.weight")
    assert moved(trained, "layers.1.weight") > 0.5 * moved(free, "layers.1.weight")


# --- FedCurv ------------------------------------------------------------------


def test_fedcurv_aggregated_form_equals_the_explicit_sum_over_others() -> None:
    fishers = [random_tensors(SHAPES, 10 + j, positive=True) for j in range(4)]
    anchors = [random_tensors(SHAPES, 20 + j) for j in range(4)]
    w = random_tensors(SHAPES, 30)
    lam = 0.4
    sums = curvature_sums(fishers, anchors)
    for k in range(4):
        mine = leave_out(sums, fishers[k], anchors[k])
        value, grads = value_and_grad(fedcurv_penalty(mine, lam), w)

        def explicit(params, k=k):
            return lam * sum(
                (fishers[j][n] * (params[n] - anchors[j][n]) ** 2).sum()
                for j in range(4)
                if j != k
                for n in params
            )

        want_value, want_grads = value_and_grad(explicit, w)
        assert float(value) == pytest.approx(float(want_value), rel=1e-10)
        for n in w:
            assert torch.allclose(grads[n], want_grads[n], atol=1e-10)
    # a client that was not among them is pulled by all of them
    everyone = float(fedcurv_penalty(sums, lam)(w))
    assert everyone == pytest.approx(
        sum(
            float(lam * (f[n] * (w[n] - a[n]) ** 2).sum())
            for f, a in zip(fishers, anchors, strict=True)
            for n in w
        ),
        rel=1e-10,
    )
