"""Certified accuracy of the classification task (``task.certify_eps``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedsim import models, tasks
from fedsim.exceptions import ConfigError
from fedsim.runner import run
from fedsim.tasks.classification import Classification, lipschitz_bound

LOGITS = torch.tensor(
    [
        [3.0, 1.0, 0.0],  # margin 2
        [2.0, 1.9, 0.0],  # margin 0.1
        [0.0, 5.0, 1.0],  # misclassified: margin -5
        [0.0, 0.5, 1.5],  # label 2, margin 1
    ]
)
LABELS = torch.tensor([0, 0, 0, 2])


def test_certified_examples_have_a_margin_above_the_bound() -> None:
    # l2: certified iff margin > sqrt(2) L eps; L = 2, eps = 0.3 -> 0.8485
    task = Classification(certify_eps=0.3, lipschitz=2.0, norm="l2")
    values = task.metrics(LOGITS, LABELS)
    assert values["certified_accuracy"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert values["accuracy"].tolist() == [1.0, 1.0, 0.0, 1.0]
    # l_inf: certified iff margin > 2 L eps = 1.2
    task = Classification(certify_eps=0.3, lipschitz=2.0, norm="linf")
    assert task.metrics(LOGITS, LABELS)["certified_accuracy"].tolist() == [
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    # at radius 0 the certified examples are the correct ones
    task = Classification(certify_eps=0.0, lipschitz=2.0, norm="l2")
    values = task.metrics(LOGITS, LABELS)
    assert values["certified_accuracy"].tolist() == values["accuracy"].tolist()
    # just below and above the l2 bound of example 3 (margin 1): eps = 1 / (sqrt 2 L)
    edge = 1.0 / (math.sqrt(2.0) * 2.0)
    for eps, expected in ((edge * 0.999, 1.0), (edge * 1.001, 0.0)):
        task = Classification(certify_eps=eps, lipschitz=2.0, norm="l2")
        assert task.metrics(LOGITS, LABELS)["certified_accuracy"][3] == expected


def test_without_radius_or_bound_there_is_no_certified_accuracy() -> None:
    assert "certified_accuracy" not in tasks.build("classification").metrics(
        LOGITS, LABELS
    )
    unbound = tasks.build("classification", certify_eps=0.1)
    assert "certified_accuracy" not in unbound.metrics(LOGITS, LABELS)


def test_binding_reads_the_groupsort_bound_and_refuses_other_models() -> None:
    task = tasks.build("classification", certify_eps=0.25)
    assert isinstance(task, Classification)
    for norm, constant in (("l2", 3.0), ("linf", 0.5)):
        model = models.build(
            "groupsort_mlp",
            input_shape=(1, 8, 8),
            num_classes=10,
            hidden=[8],
            norm=norm,
            lipschitz=constant,
        )
        assert lipschitz_bound(model) == (constant, norm)
        bound = task.bind_model(model)
        assert (bound.lipschitz, bound.norm, bound.certify_eps) == (
            constant,
            norm,
            0.25,
        )
    gen = models.build("gen", input_shape=(1, 8, 8), num_classes=10)
    assert lipschitz_bound(gen) is None  # gen.norm is a LayerNorm, not a norm name
    with pytest.raises(ConfigError, match=r"model 'cnn' declares no Lipschitz"):
        task.bind_model(models.build("cnn", input_shape=(1, 8, 8), num_classes=10))
    plain = tasks.build("classification")
    assert isinstance(plain, Classification)
    assert plain.bind_model(gen) is plain


def test_bad_radii_are_refused() -> None:
    for eps in (-0.1, math.inf, math.nan):
        with pytest.raises(ConfigError, match=r"task\.certify_eps="):
            tasks.build("classification", certify_eps=eps)


def _attack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x`` moved by at most ``eps`` (l_2) to shrink the margin: 20 projected
    normalised-gradient steps."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(20):
        out = model(x + delta)
        others = out.scatter(1, y[:, None], -math.inf).amax(1)
        margin = out.gather(1, y[:, None])[:, 0] - others
        (g,) = torch.autograd.grad(margin.sum(), delta)
        with torch.no_grad():
            step = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta -= 0.25 * eps * step
            norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta *= torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)
    return (x + delta).detach()


def test_certified_predictions_survive_attacks_within_the_radius() -> None:
    torch.manual_seed(0)
    model = models.build(
        "groupsort_mlp", input_shape=(1, 8, 8), num_classes=4, hidden=[16, 16]
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    x = torch.randn(400, 1, 8, 8, dtype=torch.float64)
    labels = model(x).argmax(1)  # every example correct: margins vary
    eps = 0.05
    task = tasks.build("classification", certify_eps=eps)
    assert isinstance(task, Classification)
    bound = task.bind_model(model)
    certified = bound.metrics(model(x), labels)["certified_accuracy"].bool()
    assert 0 < int(certified.sum()) < len(x)
    attacked = _attack(model, x, labels, eps)
    assert bool((model(attacked[certified]).argmax(1) == labels[certified]).all())
    # the attack is strong enough to flip uncertified predictions at that radius
    assert bool((model(attacked[~certified]).argmax(1) != labels[~certified]).any())


def test_the_server_reports_certified_accuracy_each_round(tmp_path: Path) -> None:
    common = [
        "dataset=digits",
        "num_clients=2",
        "num_rounds=2",
        "simulation.engine=inprocess",
    ]
    results = run(
        [
            *common,
            "model=groupsort_mlp",
            "model.hidden=[32]",
            "task.certify_eps=0.5",
            f"output_dir={tmp_path / 'gs'}",
        ],
        progress=lambda r: None,
    )
    for record in results.rounds:
        assert 0.0 <= record["test_certified_accuracy"] <= record["test_accuracy"]
    assert results.rounds[-1]["test_certified_accuracy"] > 0.3
    with pytest.raises(ConfigError, match="declares no Lipschitz constant"):
        run(
            [*common, "model=mlp", "task.certify_eps=0.5", f"output_dir={tmp_path}/m"],
            progress=lambda r: None,
        )
