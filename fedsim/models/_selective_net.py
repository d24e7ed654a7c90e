"""Shared machinery of the selective-channel CNNs (``selective_densenet`` and
``selective_resnet``).

Jeong & Shin, "Training CNNs with Selective Allocation of Channels", ICML 2019.
Paper: proceedings.mlr.press/v97/jeong19c.html

Every conv after the stem is a :class:`SelectiveConv2d` (BN, ReLU, gates,
conv). The 1x1 convs (``top_k > 0``) keep their budget: channels they close are
reopened as shifted copies of their most important inputs. The 3x3 convs
(``top_k = 0``) only prune, which is where the compression comes from.
:class:`Selection` builds the convs of one network with these options, and
:class:`SelectiveNet` holds the layout and bookkeeping both networks share
(stem, rows of blocks with pools between them, BN-ReLU-pool-Linear head;
de-allocation, re-allocation, tensor roles and the server schedule).

Federated training. Gates ``g`` and pointers ``p`` are server-owned
(:meth:`SelectiveNet.tensor_roles`): averaging would make gates fractional and
pointers meaningless, and a client that reallocated on its own would give a
slot a different meaning than its peers. The shifts ``b`` are averaged like any
other weight: clients train them by gradient (the paper trains them, with
weight decay 1e-5), and since every client shares the server's pointers a
slot's shift means the same thing on every client. When the server reallocates
a slot it writes the new shift into the global model, which is broadcast as
usual.

The paper runs de-allocation then re-allocation after each epoch while
``epoch < 0.5 * epochs``; fedsim maps epochs to rounds, so
:meth:`SelectiveNet.server_update` runs them on the aggregated global model
after round ``r`` (1-based) while ``r - 1 < 0.5 * num_rounds``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef
from fedsim.models import Role
from fedsim.models._selective_conv import SelectiveConv2d

__all__ = [
    "Selection",
    "SelectiveNet",
    "head_axes",
    "nested",
    "pool_after_rows",
    "positive_widths",
]

T = TypeVar("T", bound=nn.Module)


def nested(rows: nn.ModuleList, kind: type[T]) -> list[list[T]]:
    """A ModuleList of ModuleLists of ``kind`` as typed lists."""
    return [[cast(T, m) for m in cast(nn.ModuleList, row)] for row in rows]


def head_axes(width_offset: int) -> tuple[AxisRef, ...]:
    """The final BatchNorm and the classifier's input columns at one offset."""
    return (
        AxisRef("norm.weight", 0, width_offset),
        AxisRef("norm.bias", 0, width_offset),
        AxisRef("norm.running_mean", 0, width_offset),
        AxisRef("norm.running_var", 0, width_offset),
        AxisRef("fc.weight", 1, width_offset),
    )


def positive_widths(name: str, widths: Sequence[int]) -> list[int]:
    """The widths as ints, or a ConfigError naming the first non-positive one."""
    out = [int(w) for w in widths]
    if not out or min(out) < 1:
        raise ConfigError(
            f"{name} must be a non-empty list of positive widths, got {out}"
        )
    return out


def pool_after_rows(rows: int, h: int, w: int) -> list[bool]:
    """Whether a 2x2 average pool follows each of ``rows`` rows of blocks.

    Every row but the last is followed by one, unless the ``h x w`` map has
    already shrunk to one pixel wide.
    """
    pools: list[bool] = []
    for r in range(rows):
        pool = r < rows - 1 and min(h, w) >= 2
        pools.append(pool)
        if pool:
            h, w = h // 2, w // 2
    return pools


@dataclass(frozen=True)
class Selection:
    """Selective-conv options shared by every layer of a network."""

    top_k: int
    gamma: float
    max_copies: int | None

    def conv(self, in_channels: int, out_channels: int, k: int) -> SelectiveConv2d:
        """A ``k x k`` selective conv: 1x1 convs reallocate, larger ones only prune."""
        return SelectiveConv2d(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=k,
            top_k=self.top_k if k == 1 else 0,
            gamma=self.gamma,
            max_copies=self.max_copies,
        )


class SelectiveNet(nn.Module, ABC):
    """Selective-conv bookkeeping and the layout shared by both networks.

    ``stem (conv) -> row -> pool -> row ... -> BN -> ReLU -> global average
    pool -> Linear``. Subclasses set ``realloc_seed`` and ``stem``, hold their
    rows of blocks (each a ModuleList) in a ModuleList that :meth:`rows`
    returns, and call :meth:`_add_head` after them.
    """

    realloc_seed: int
    stem: nn.Conv2d
    pools: list[bool]
    norm: nn.BatchNorm2d
    fc: nn.Linear

    @abstractmethod
    def rows(self) -> nn.ModuleList:
        """The rows of blocks (dense blocks or residual stages), in order."""

    def _add_head(
        self, *, input_hw: tuple[int, int], width: int, num_classes: int
    ) -> None:
        """The pools between the rows, the final BatchNorm and the classifier."""
        self.pools = pool_after_rows(len(self.rows()), *input_hw)
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for row, pool in zip(self.rows(), self.pools, strict=True):
            for block in cast(nn.ModuleList, row):
                x = block(x)
            if pool:
                x = F.avg_pool2d(x, 2)
        x = F.relu(self.norm(x)).mean(dim=(2, 3))
        return self.fc(x)

    def selective_layers(self) -> list[tuple[str, SelectiveConv2d]]:
        """Every selective conv with its module path, in forward order."""
        return [
            (name, m)
            for name, m in self.named_modules()
            if isinstance(m, SelectiveConv2d)
        ]

    def effective_weights(self) -> int:
        """Conv weights in use over all selective convs (closed slots excluded)."""
        return sum(layer.effective_weights() for _, layer in self.selective_layers())

    def deallocate(self) -> None:
        """Close each selective conv's least important channels."""
        for _, layer in self.selective_layers():
            layer.deallocate()

    def reallocate(self, generator: torch.Generator) -> None:
        """Reopen the closed slots of every selective conv with ``top_k > 0``."""
        for _, layer in self.selective_layers():
            layer.reallocate(generator)

    def tensor_roles(self) -> dict[str, Role]:
        """Gates and pointers are owned by the server; everything else is averaged."""
        roles: dict[str, Role] = {}
        for name, layer in self.selective_layers():
            roles[f"{name}.g"] = "server"
            if layer.p is not None:
                roles[f"{name}.p"] = "server"
        return roles

    def server_update(self, server_round: int, num_rounds: int) -> None:
        """De-allocate then re-allocate after aggregation, in the first half.

        Runs while ``server_round - 1 < 0.5 * num_rounds`` (the paper's
        ``epoch < 0.5 * epochs`` with rounds counted from 1); later rounds leave
        the model alone. The random draws come from ``realloc_seed`` and the
        round, so a resumed run reallocates exactly as the original did.

        Raises
        ------
        ValueError
            For a round outside ``1..num_rounds``, or gates and pointers that
            are not a valid selection (e.g. they were averaged).
        """
        if num_rounds < 1 or not 1 <= server_round <= num_rounds:
            raise ValueError(
                f"server_round must be in 1..num_rounds, got {server_round} of "
                f"{num_rounds}"
            )
        if 2 * (server_round - 1) >= num_rounds:
            return
        for _, layer in self.selective_layers():
            layer.check_selection()
        seed = np.random.SeedSequence([self.realloc_seed, server_round])
        generator = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
        self.deallocate()
        self.reallocate(generator)
