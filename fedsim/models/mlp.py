"""Multilayer perceptron with ReLU hidden layers.

State-dict order is ``layers.0.weight, layers.0.bias, layers.1.weight, ...``
with ``weight`` of shape (out, in): the layout ``fedsim.matching.pfnm_mlp``
reads and writes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` Linear+ReLU layers, then a Linear head.

    Parameters
    ----------
    in_features : int
        Flattened input size.
    hidden : sequence of int
        Hidden widths, input side first; empty for a linear model.
    num_classes : int
        Output size.
    """

    def __init__(
        self, *, in_features: int, hidden: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        if any(int(w) < 1 for w in hidden):
            raise ValueError(f"hidden widths must be positive, got {list(hidden)}")
        sizes = [in_features, *[int(w) for w in hidden], num_classes]
        self.hidden = sizes[1:-1]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in itertools.pairwise(sizes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)

    def permutation_spec(self) -> PermutationSpec:
        """One group per hidden layer: its rows and bias, the next layer's columns."""
        groups = []
        for i, width in enumerate(self.hidden):
            groups.append(
                PermGroup(
                    name=f"hidden.{i}",
                    size=width,
                    axes=(
                        AxisRef(f"layers.{i}.weight", 0),
                        AxisRef(f"layers.{i}.bias", 0),
                        AxisRef(f"layers.{i + 1}.weight", 1),
                    ),
                    width_key=f"hidden.{i}",
                )
            )
        return PermutationSpec(tuple(groups))


@MODELS.register("mlp")
def mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (200, 200),
) -> MLP:
    """Registered ``mlp``: hidden widths as a list (``model.hidden=[100]``)."""
    return MLP(
        in_features=math.prod(input_shape), hidden=list(hidden), num_classes=num_classes
    )
