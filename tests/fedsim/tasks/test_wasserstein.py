"""The Wasserstein task: loss and metric against hand computation, and a W1
estimate of two Gaussians with a known distance from a federated run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.func import grad, vmap

from fedsim import data, tasks
from fedsim.runner import run
from fedsim.tasks.wasserstein import Wasserstein, potential_weights


def test_batch_loss_is_minus_the_difference_of_means() -> None:
    task = tasks.build("wasserstein")
    f = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([0, 0, 1, 1, 1])
    # B = 5, n_P = 2, n_Q = 3: P rows -f * 5/2, Q rows +f * 5/3
    expected = torch.tensor([-2.5, -5.0, 5.0, 20.0 / 3.0, 25.0 / 3.0])
    torch.testing.assert_close(task.loss(f, y), expected)
    # mean f(P) = 1.5, mean f(Q) = 4: the batch loss is -(1.5 - 4)
    torch.testing.assert_close(task.loss(f, y).mean(), torch.tensor(2.5))
    w1 = task.metrics(f[:, None], y)["w1"]
    torch.testing.assert_close(w1, -expected)
    torch.testing.assert_close(w1.mean(), torch.tensor(-2.5))
    assert task.primary == "w1" and task.higher_is_better is True


def test_a_batch_of_one_distribution_contributes_its_own_mean() -> None:
    task = Wasserstein()
    f = torch.tensor([[2.0], [4.0]])
    torch.testing.assert_close(
        task.loss(f, torch.tensor([0, 0])).mean(), torch.tensor(-3.0)
    )
    torch.testing.assert_close(
        task.loss(f, torch.tensor([1, 1])).mean(), torch.tensor(3.0)
    )


def test_weights_make_any_batch_the_difference_of_means() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 40, (1,), generator=gen))
        y = torch.randint(0, 2, (n,), generator=gen)
        y[0], y[1] = 0, 1
        f = torch.randn(n, generator=gen, dtype=torch.float64)
        expected = f[y == 0].mean() - f[y == 1].mean()
        got = (potential_weights(y, torch.float64) * f).mean()
        torch.testing.assert_close(got, expected)


def test_bad_outputs_and_labels_are_refused() -> None:
    task = Wasserstein()
    with pytest.raises(ValueError, match=r"one output value per example.*\(4, 2\)"):
        task.loss(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be 0 .* or 1 .*, got 2"):
        task.metrics(torch.zeros(3), torch.tensor([0, 1, 2]))


def test_the_loss_runs_under_vmap_and_grad_for_a_cohort() -> None:
    # the vectorised engine differentiates the loss per client under vmap
    task = Wasserstein()
    x = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1], [1, 0, 1, 1, 0, 0]])
    w = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))

    def batch_loss(
        weight: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor
    ) -> torch.Tensor:
        return task.loss(xb @ weight, yb).mean()

    grads = vmap(grad(batch_loss))(w, x, y)
    for i in range(3):
        # d/dw of -(mean_P x.w - mean_Q x.w)
        expected = -(x[i][y[i] == 0].mean(0) - x[i][y[i] == 1].mean(0))
        torch.testing.assert_close(grads[i], expected)


def test_federated_groupsort_estimates_the_w1_of_two_gaussians(tmp_path: Path) -> None:
    distance = 1.5
    results = run(
        [
            "dataset=gaussians",
            f"dataset.distance={distance}",
            "dataset.dim=3",
            "dataset.train_samples=600",
            "partition=iid",
            "model=groupsort_mlp",
            "model.hidden=[16,16]",
            "task=wasserstein",
            "num_clients=3",
            "num_rounds=3",
            "simulation.engine=inprocess",
            f"output_dir={tmp_path / 'w1'}",
        ],
        progress=lambda r: None,
    )
    w1 = [value for _, value in results.metric("test_w1")]
    assert abs(w1[0]) < 0.5 * distance  # the initial potential knows nothing
    assert abs(w1[-1] - distance) < 0.15
    # no 1-Lipschitz f beats the exact W1 of the two empirical test measures
    # (500 points each: an optimal matching of the points)
    splits = data.load("gaussians", seed=0, distance=distance, dim=3, train_samples=600)
    x, y = splits.test.x.numpy().astype(np.float64), splits.test.y.numpy()
    cost = np.linalg.norm(x[y == 0][:, None] - x[y == 1][None], axis=2)
    rows, cols = linear_sum_assignment(cost)
    assert w1[-1] <= cost[rows, cols].mean() + 1e-4
    assert (tmp_path / "w1" / "w1.png").is_file()
