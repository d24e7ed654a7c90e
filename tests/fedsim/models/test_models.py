"""Registry-wide model checks: every registered model is covered automatically."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedsim import models
from fedsim.matching.permspec import PermutationSpec
from tests.support import (
    SMALL_BUILD,
    example_input,
    max_output_change,
    outputs,
    perturb_state,
    to_float64,
)

NAMES = models.names()


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_finite(name: str) -> None:
    model = models.build(name, **SMALL_BUILD)
    model.eval()
    x = example_input(model, batch=3)
    out = outputs(model, x)
    assert out[0].shape[0] == 3
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = models.build(name, **SMALL_BUILD)
    model.train()
    x = example_input(model, batch=4)
    loss = sum(t.float().pow(2).mean() for t in outputs(model, x))
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
    ]
    assert not missing, f"{name}: no gradient for {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_permutation_spec_is_an_invariance(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name, **SMALL_BUILD).double()
    perturb_state(model)
    spec = models.permutation_spec(model)
    assert len(spec) > 0, f"{name} declares no permutation group"
    x = to_float64(example_input(model, batch=5))
    for seed in range(3):
        assert max_output_change(model, spec, x, seed) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_spec_is_caught(name: str) -> None:
    """Dropping the producing axis of the widest group must change the outputs."""
    torch.manual_seed(0)
    model = models.build(name, **SMALL_BUILD).double()
    perturb_state(model)
    spec = models.permutation_spec(model)
    widest = max(spec, key=lambda g: g.size)
    broken = dataclasses.replace(widest, axes=widest.axes[1:])
    wrong = PermutationSpec(tuple(broken if g is widest else g for g in spec))
    x = to_float64(example_input(model, batch=5))
    assert max_output_change(model, wrong, x, seed=1) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_spec_references_real_tensors(name: str) -> None:
    model = models.build(name, **SMALL_BUILD)
    state = model.state_dict()
    for group in models.permutation_spec(model):
        for ref in group.axes:
            assert ref.tensor in state, f"{name}/{group.name}: no tensor {ref.tensor}"
