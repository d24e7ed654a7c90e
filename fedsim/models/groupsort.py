"""GroupSort Lipschitz MLP (Anil et al. 2019): norm-constrained layers + GroupSort.

Every Linear layer is norm-constrained in its forward pass (Björck-orthonormal
for ``norm="l2"``, rows in the unit l_1 ball for ``norm="linf"``) and scaled by
``lipschitz ** (1 / #layers)``; the activations sort blocks of ``group_size``
pre-activations. The whole network is therefore ``lipschitz``-Lipschitz in the
chosen norm, for any raw weights: averaging clients' raw weights keeps the bound.
``fedsim.certify`` turns that bound into robustness certificates.

Layout of a hidden layer of width ``n`` with groups of ``g`` rows:

- ``layout="sorted"``: rows ``u*g .. u*g+g-1`` form group ``u`` and the
  activation sorts them in place, so the next layer's columns move in the same
  blocks of ``g``.
- ``layout="maxmin"`` (``g = 2``, LNets' ``MaxMin``): rows ``2u, 2u+1`` form pair
  ``u``, whose max lands at column ``u`` and min at column ``n/2 + u`` of the next
  layer, so the same pair permutation moves both halves.

The declared symmetry moves whole groups only. Reordering rows within one
group is also free (it leaves the next layer untouched) but is one permutation
per group, which a single :class:`~fedsim.matching.permspec.PermGroup` cannot
express; a matcher may still use it when costing a group against an atom.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS
from fedsim.models._lipschitz import (
    BJORCK_ORDERS,
    BjorckLinear,
    LInfLinear,
    group_sort,
    max_min,
)

__all__ = ["GroupSortMLP", "groupsort_mlp"]

NORMS = ("l2", "linf")
LAYOUTS = ("sorted", "maxmin")


class GroupSortMLP(nn.Module):
    """Flatten, then norm-constrained Linear + GroupSort layers, then a Linear head.

    Parameters
    ----------
    in_features : int
        Flattened input size.
    hidden : sequence of int
        Hidden widths, input side first; each a multiple of ``group_size``.
    num_classes : int
        Output size.
    group_size : int
        Rows sorted together (>= 2); 2 is MaxMin.
    layout : {"sorted", "maxmin"}
        Where sorted values go (see the module docstring); "maxmin" needs
        ``group_size=2``.
    norm : {"l2", "linf"}
        The norm the network is Lipschitz in.
    bjorck_order, bjorck_iters, safe_scaling
        Björck settings for ``norm="l2"`` (see :func:`fedsim.models._lipschitz.bjorck`).
    lipschitz : float
        The network's Lipschitz constant L (> 0).
    """

    def __init__(
        self,
        *,
        in_features: int,
        hidden: Sequence[int],
        num_classes: int,
        group_size: int = 2,
        layout: str = "sorted",
        norm: str = "l2",
        bjorck_order: int = 1,
        bjorck_iters: int = 20,
        lipschitz: float = 1.0,
        safe_scaling: bool = True,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in hidden]
        _check_options(
            widths, group_size, layout, norm, bjorck_order, bjorck_iters, lipschitz
        )
        self.hidden = widths
        self.group_size = group_size
        self.layout = layout
        self.norm = norm
        self.lipschitz = float(lipschitz)
        sizes = [in_features, *widths, num_classes]
        scale = self.lipschitz ** (1.0 / (len(sizes) - 1))
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            if norm == "l2":
                layers.append(
                    BjorckLinear(
                        in_features=a,
                        out_features=b,
                        scale=scale,
                        iters=bjorck_iters,
                        order=bjorck_order,
                        safe_scaling=safe_scaling,
                    )
                )
            else:
                layers.append(LInfLinear(in_features=a, out_features=b, scale=scale))
        self.layers = nn.ModuleList(layers)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """The GroupSort (or MaxMin) nonlinearity on a (batch, width) tensor."""
        if self.layout == "maxmin":
            return max_min(x)
        return group_sort(x, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)

    def permutation_spec(self) -> PermutationSpec:
        """One group per hidden layer whose units are whole GroupSort groups."""
        g = self.group_size
        groups = []
        for i, width in enumerate(self.hidden):
            following = (
                AxisRef(f"layers.{i + 1}.weight", 1, repeat=2)
                if self.layout == "maxmin"
                else AxisRef(f"layers.{i + 1}.weight", 1, block=g)
            )
            groups.append(
                PermGroup(
                    name=f"hidden.{i}",
                    size=width // g,
                    axes=(
                        AxisRef(f"layers.{i}.weight", 0, block=g),
                        AxisRef(f"layers.{i}.bias", 0, block=g),
                        following,
                    ),
                    width_key=f"hidden.{i}",
                    width_scale=g,
                )
            )
        return PermutationSpec(tuple(groups))


def _check_options(
    widths: list[int],
    group_size: int,
    layout: str,
    norm: str,
    bjorck_order: int,
    bjorck_iters: int,
    lipschitz: float,
) -> None:
    """Fail early, naming the bad value and the allowed ones."""
    if norm not in NORMS:
        raise ConfigError(f"groupsort_mlp norm {norm!r} is not one of {NORMS}")
    if layout not in LAYOUTS:
        raise ConfigError(f"groupsort_mlp layout {layout!r} is not one of {LAYOUTS}")
    if group_size < 2:
        raise ConfigError(f"groupsort_mlp group_size must be >= 2, got {group_size}")
    if layout == "maxmin" and group_size != 2:
        raise ConfigError(
            f"groupsort_mlp layout 'maxmin' needs group_size 2, got {group_size}"
        )
    bad = [w for w in widths if w < 1 or w % group_size]
    if bad:
        raise ConfigError(
            f"groupsort_mlp hidden width {bad[0]} is not a positive multiple of "
            f"group_size {group_size}"
        )
    if bjorck_order not in BJORCK_ORDERS:
        raise ConfigError(
            f"groupsort_mlp bjorck_order {bjorck_order!r} is not one of {BJORCK_ORDERS}"
        )
    if bjorck_iters < 0:
        raise ConfigError(
            f"groupsort_mlp bjorck_iters must be >= 0, got {bjorck_iters}"
        )
    if not lipschitz > 0:
        raise ConfigError(f"groupsort_mlp lipschitz must be positive, got {lipschitz}")


@MODELS.register("groupsort_mlp")
def groupsort_mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (128, 128),
    group_size: int = 2,
    layout: str = "sorted",
    norm: str = "l2",
    bjorck_order: int = 1,
    bjorck_iters: int = 20,
    lipschitz: float = 1.0,
    safe_scaling: bool = True,
) -> GroupSortMLP:
    """Registered ``groupsort_mlp``: an L-Lipschitz MLP (see :class:`GroupSortMLP`)."""
    return GroupSortMLP(
        in_features=math.prod(input_shape),
        hidden=list(hidden),
        num_classes=num_classes,
        group_size=group_size,
        layout=layout,
        norm=norm,
        bjorck_order=bjorck_order,
        bjorck_iters=bjorck_iters,
        lipschitz=lipschitz,
        safe_scaling=safe_scaling,
    )
