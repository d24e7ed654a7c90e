"""Regression: per-example mean squared error; reports ``mse`` (lower is better).

The model's output and the target have the same shape, (batch,) or
(batch, ...): a Poisson solution field of ``n * n`` values per example
(``dataset=poisson``) is one example. An example's error is the mean of its
squared differences, so ``test_mse`` is the mean over examples and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.tasks import TASKS

__all__ = ["Regression", "regression"]


@dataclass(frozen=True)
class Regression:
    """Mean squared error per example; reports ``mse``."""

    primary: str = "mse"
    higher_is_better: bool = False

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example mean of the squared errors, shape (batch,).

        Raises
        ------
        ValueError
            If ``output`` and ``target`` differ in shape.
        """
        if output.shape != target.shape:
            raise ValueError(
                f"regression needs an output of the target's shape "
                f"{tuple(target.shape)}, got {tuple(output.shape)}; set the "
                "model's num_classes to the number of target values"
            )
        squared = (output - target.to(output.dtype)).pow(2)
        return squared.reshape(squared.shape[0], -1).mean(dim=1)

    def metrics(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example ``mse`` (the training loss)."""
        return {"mse": self.loss(output, target)}


@TASKS.register("regression")
def regression() -> Regression:
    """Registered ``regression`` task."""
    return Regression()
