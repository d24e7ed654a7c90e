"""The regression task: per-example mean squared error, against hand computation."""

from __future__ import annotations

import pytest
import torch

from fedsim import tasks
from fedsim.tasks.regression import Regression


def test_loss_is_the_mean_squared_error_of_each_example() -> None:
    task = tasks.build("regression")
    output = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 6.0], [1.0, -1.0, 2.0]])
    # example 0: (0 + 4 + 9) / 3; example 1: (1 + 1 + 4) / 3
    expected = torch.tensor([13.0 / 3.0, 2.0])
    torch.testing.assert_close(task.loss(output, target), expected)
    torch.testing.assert_close(task.metrics(output, target)["mse"], expected)
    assert set(task.metrics(output, target)) == {"mse"}


def test_fields_and_scalar_targets_are_single_examples() -> None:
    task = Regression()
    field = torch.arange(8.0).reshape(2, 2, 2)
    shifted = field + torch.tensor([1.0, 3.0]).reshape(2, 1, 1)
    torch.testing.assert_close(task.loss(shifted, field), torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(
        task.loss(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])),
        torch.tensor([4.0, 4.0]),
    )


def test_lower_is_better_and_mse_is_primary() -> None:
    task = tasks.build("regression")
    assert task.primary == "mse" and task.higher_is_better is False


def test_a_target_of_another_shape_is_refused_with_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"target's shape \(2, 3\), got \(2, 4\)"):
        Regression().loss(torch.zeros(2, 4), torch.zeros(2, 3))


def test_the_gradient_is_the_closed_form() -> None:
    output = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    Regression().loss(output, target).sum().backward()
    assert output.grad is not None
    # d/d out of mean_j (out_j - t_j)^2 = 2 (out - t) / 2
    torch.testing.assert_close(output.grad, (output - target).detach())
