"""The functional training step against torch.optim, and a loss that falls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedsim import models
from fedsim.config import ClientConfig
from fedsim.tasks import build as build_task
from fedsim.train import derive_seed, evaluate, local_train

TASK = build_task("classification")


def _reference(model: torch.nn.Module, cfg: ClientConfig, batches: list) -> dict:
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    else:
        opt = torch.optim.Adam(
            model.parameters(),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            amsgrad=cfg.amsgrad,
        )
    model.train()
    for xb, yb in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CASES = [
    ClientConfig(optimizer="sgd", lr=0.1),
    ClientConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
    ClientConfig(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True),
    ClientConfig(optimizer="adam", lr=0.01),
    ClientConfig(optimizer="adam", lr=0.01, amsgrad=True, weight_decay=1e-4),
]


@pytest.mark.parametrize(
    "cfg", CASES, ids=lambda c: f"{c.optimizer}-{c.momentum}-{c.amsgrad}-{c.nesterov}"
)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_functional_step_matches_torch_optim(cfg: ClientConfig, name: str) -> None:
    torch.manual_seed(0)
    kw = {"input_shape": (1, 8, 8), "num_classes": 4}
    if name == "mlp":
        kw["hidden"] = [16]
    else:
        kw.update(channels=[4], hidden=[8])
    model = models.build(name, **kw).double()
    twin = models.build(name, **kw).double()
    twin.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (24,), generator=gen)
    cfg = dataclasses.replace(cfg, epochs=2, batch_size=8)
    result = local_train(
        model, x, y, cfg, TASK, generator=torch.Generator().manual_seed(7)
    )
    # replay the same batch order with torch.optim
    order_gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(cfg.epochs):
        order = torch.randperm(24, generator=order_gen)
        batches += [(x[order[i : i + 8]], y[order[i : i + 8]]) for i in range(0, 24, 8)]
    expected = _reference(twin, cfg, batches)
    assert result.num_steps == 6 and result.num_examples == 24
    for key, value in expected.items():
        torch.testing.assert_close(result.state_dict[key], value, rtol=1e-9, atol=1e-10)


def test_local_training_lowers_the_loss_on_a_tiny_set() -> None:
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(1, 8, 8), num_classes=3, hidden=[32])
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 1, 8, 8, generator=gen)
    y = torch.arange(60) % 3
    x = centers[y] + 0.3 * torch.randn(60, 1, 8, 8, generator=gen)
    before = evaluate(model, x, y, TASK)
    cfg = ClientConfig(lr=0.1, epochs=5, batch_size=10)
    result = local_train(model, x, y, cfg, TASK, generator=gen)
    model.load_state_dict(result.state_dict)
    after = evaluate(model, x, y, TASK)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] == 1.0


def test_training_leaves_the_model_object_unchanged() -> None:
    model = models.build("mlp", input_shape=(1, 2, 2), num_classes=2, hidden=[3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    local_train(model, x, y, ClientConfig(), TASK, generator=torch.Generator())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_derived_seeds_differ_and_repeat() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, r, c) for r in range(5) for c in range(5)}) == 25


def test_func_transform_and_autograd_steps_agree() -> None:
    from fedsim.train import init_optimizer_state, make_step, split_state

    torch.manual_seed(1)
    model = models.build(
        "cnn", input_shape=(1, 8, 8), num_classes=3, channels=[4], hidden=[6]
    )
    model = model.double()
    cfg = ClientConfig(optimizer="adam", lr=0.01, amsgrad=True)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    w = torch.ones(8, dtype=torch.float64)
    outs = []
    for transform in (False, True):
        params, buffers = split_state(model)
        state = init_optimizer_state(params, cfg)
        step = make_step(model, TASK, cfg, transform=transform)
        for _ in range(3):
            params, buffers, state, _ = step(params, buffers, state, x, y, w, 0.01)
        outs.append({**params, **buffers})
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-12, atol=1e-12)
