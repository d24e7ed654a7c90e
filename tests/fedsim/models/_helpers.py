"""Digits and a plain training loop for the per-model training tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from sklearn.datasets import load_digits


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 digits: (N, 1, 8, 8) float32 grey levels 0..16, int64 labels."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(data.target)


def adam_steps(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    generator: torch.Generator,
    pool: torch.Tensor | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``model`` with Adam on cross-entropy; the loss of every step.

    Each step draws ``batch`` indices with replacement from ``pool`` (default:
    every example) using ``generator``, then calls ``after_step(step)`` with
    the 1-based step number, if given.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    indices = torch.arange(len(x)) if pool is None else pool
    losses = []
    for step in range(1, steps + 1):
        idx = indices[torch.randint(len(indices), (batch,), generator=generator)]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
    return losses
