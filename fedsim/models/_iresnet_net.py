"""The stack of invertible stages shared by ``iresnet`` and ``iresnet_flow``.

:class:`InvertibleNet` holds the squeeze stages of invertible blocks (see
:mod:`fedsim.models._iresnet_layers`), runs and inverts them, and carries the
federated plumbing both models share: server-owned tensor roles, the
``server_update`` that re-estimates the spectral norms after aggregation, and
the permutation spec of the branch hidden channels. The reasons are set out in
the docstring of :mod:`fedsim.models.iresnet`. The leading underscore keeps the
module out of model discovery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import Role
from fedsim.models._iresnet_layers import InvertibleBlock, squeeze, unsqueeze
from fedsim.models._iresnet_spectral import SpectralNormConv2d

__all__ = ["BlockStep", "InvertibleNet"]

BlockStep = Callable[[InvertibleBlock, torch.Tensor], torch.Tensor]


def _check(
    input_shape: Sequence[int],
    hidden: Sequence[Sequence[int]],
    coeff: float,
    power_iterations: int,
    server_iterations: int,
    inverse_iterations: int,
    inverse_tol: float,
) -> None:
    """Raise :class:`ConfigError` for an option outside its allowed range."""
    if len(input_shape) != 3 or min(int(v) for v in input_shape) < 1:
        raise ConfigError(f"input_shape={list(input_shape)} must be positive (C, H, W)")
    if not hidden or any(
        len(stage) == 0 or len(stage) % 2 or min(int(h) for h in stage) < 1
        for stage in hidden
    ):
        raise ConfigError(
            f"hidden={[list(s) for s in hidden]} must hold one list per stage with "
            "two positive widths (W1 and W2 outputs) per block"
        )
    scale = 2 ** len(hidden)
    if int(input_shape[1]) % scale or int(input_shape[2]) % scale:
        raise ConfigError(
            f"input_shape={list(input_shape)}: height and width must be divisible "
            f"by {scale} for {len(hidden)} squeezing stages"
        )
    if not 0.0 < coeff < 1.0:
        raise ConfigError(f"coeff={coeff} must be in (0, 1) for invertible blocks")
    if power_iterations < 0:
        raise ConfigError(f"power_iterations={power_iterations} must be >= 0")
    if server_iterations < 20:
        raise ConfigError(
            f"server_iterations={server_iterations} must be >= 20, or "
            "aggregated weights may leave the Lipschitz bound"
        )
    if inverse_iterations < 1 or inverse_tol < 0.0:
        raise ConfigError(
            f"inverse_iterations={inverse_iterations} must be >= 1 and "
            f"inverse_tol={inverse_tol} >= 0"
        )


class InvertibleNet(nn.Module):
    """Stages of squeeze + invertible blocks, and the federated plumbing they share.

    ``self.shapes[s]`` is the stream shape (C, H, W) inside stage ``s``; with
    ``factor_out`` the second half of the channels leaves after every stage but
    the last.
    """

    def __init__(
        self,
        *,
        stream_shape: Sequence[int],
        hidden: Sequence[Sequence[int]],
        coeff: float,
        power_iterations: int,
        server_iterations: int,
        inverse_iterations: int,
        inverse_tol: float,
        factor_out: bool,
    ) -> None:
        super().__init__()
        _check(
            stream_shape,
            hidden,
            coeff,
            power_iterations,
            server_iterations,
            inverse_iterations,
            inverse_tol,
        )
        self.server_iterations = server_iterations
        self.inverse_iterations = inverse_iterations
        self.inverse_tol = inverse_tol
        self.factor_out = factor_out
        self.stages = nn.ModuleList()
        self.shapes: list[tuple[int, int, int]] = []
        c, h, w = (int(v) for v in stream_shape)
        for s, widths in enumerate(hidden):
            c, h, w = 4 * c, h // 2, w // 2
            blocks = nn.ModuleList(
                InvertibleBlock(
                    channels=c,
                    hidden=[int(widths[i]), int(widths[i + 1])],
                    input_hw=(h, w),
                    input_activation=(s, i) != (0, 0),
                    coeff=coeff,
                    train_iterations=power_iterations,
                    init_iterations=server_iterations,
                )
                for i in range(0, len(widths), 2)
            )
            self.stages.append(blocks)
            self.shapes.append((c, h, w))
            if factor_out and s < len(hidden) - 1:
                c //= 2

    def stage(self, index: int) -> list[InvertibleBlock]:
        """The blocks of stage ``index``, in forward order."""
        return [
            cast(InvertibleBlock, b) for b in cast(nn.ModuleList, self.stages[index])
        ]

    def named_blocks(self) -> list[tuple[str, InvertibleBlock]]:
        """``("stages.s.b", block)`` for every block in forward order."""
        return [
            (f"stages.{s}.{b}", block)
            for s in range(len(self.stages))
            for b, block in enumerate(self.stage(s))
        ]

    def spectral_convs(self) -> list[tuple[str, SpectralNormConv2d]]:
        """``(state-dict prefix, conv)`` for every spectrally normalised conv."""
        return [
            (f"{name}.branch.conv{k + 1}", conv)
            for name, block in self.named_blocks()
            for k, conv in enumerate(block.branch.convs())
        ]

    def reestimate_spectral_norms(self, iterations: int | None = None) -> None:
        """Recompute every conv's ``u``, ``v`` (default: ``server_iterations`` steps).

        Use after loading weights from elsewhere: eval mode reuses the stored
        vectors, which may not fit the new weights.
        """
        steps = self.server_iterations if iterations is None else iterations
        for _, conv in self.spectral_convs():
            conv.reestimate(steps)

    @torch.no_grad()
    def server_update(self, server_round: int, num_rounds: int) -> None:
        """After aggregation: refresh ``u``, ``v``, project, mark ActNorm set.

        Runs ``server_iterations`` Lanczos steps on every conv, writes
        the normalised weight into ``weight_orig`` (same function, weight back in
        the ball ``sigma <= coeff``) and marks every ActNorm initialised (the
        clients initialised it in the round just aggregated). The same in every
        round, so ``server_round`` and ``num_rounds`` are unused.
        """
        for _, conv in self.spectral_convs():
            conv.reestimate(self.server_iterations)
            conv.project()
        for _, block in self.named_blocks():
            block.actnorm.initialized.fill_(True)

    def tensor_roles(self) -> dict[str, Role]:
        """``u``, ``v`` and ActNorm's ``initialized`` are server-owned."""
        roles: dict[str, Role] = {}
        for prefix, _ in self.spectral_convs():
            roles[f"{prefix}.u"] = "server"
            roles[f"{prefix}.v"] = "server"
        for name, _ in self.named_blocks():
            roles[f"{name}.actnorm.initialized"] = "server"
        return roles

    def permutation_spec(self) -> PermutationSpec:
        """Two groups per block: the outputs of ``W1`` and of ``W2``.

        Unit ``j`` of the ``W1`` group is row ``j`` of ``W1`` (weight, bias and
        its power-iteration ``u``) and column ``j`` of ``W2`` (with ``W2``'s
        ``v``); likewise for ``W2`` -> ``W3``.
        """
        groups = []
        for name, block in self.named_blocks():
            s, b = (int(v) for v in name.split(".")[1:])
            convs = block.branch.convs()
            for k in range(2):
                this = f"{name}.branch.conv{k + 1}"
                following = f"{name}.branch.conv{k + 2}"
                groups.append(
                    PermGroup(
                        name=f"{name}.hidden.{k}",
                        size=int(convs[k].weight_orig.shape[0]),
                        axes=(
                            AxisRef(f"{this}.weight_orig", 0),
                            AxisRef(f"{this}.bias", 0),
                            AxisRef(f"{this}.u", 0),
                            AxisRef(f"{following}.weight_orig", 1),
                            AxisRef(f"{following}.v", 0),
                        ),
                        width_key=f"hidden.{s}.{2 * b + k}",
                    )
                )
        return PermutationSpec(tuple(groups))

    def _run_stages(
        self, x: torch.Tensor, step: BlockStep
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stream through every stage, and the factored-out parts."""
        parts = []
        h = x
        for s in range(len(self.stages)):
            h = squeeze(h)
            for block in self.stage(s):
                h = step(block, h)
            if self.factor_out and s < len(self.stages) - 1:
                keep = h.shape[1] // 2
                parts.append(h[:, keep:])
                h = h[:, :keep]
        return h, parts

    def _invert_stages(
        self,
        h: torch.Tensor,
        parts: Sequence[torch.Tensor],
        iterations: int | None,
        tol: float | None,
    ) -> torch.Tensor:
        """Inverse of :meth:`_run_stages` given its outputs."""
        its = self.inverse_iterations if iterations is None else iterations
        eps = self.inverse_tol if tol is None else tol
        for s in reversed(range(len(self.stages))):
            if self.factor_out and s < len(self.stages) - 1:
                h = torch.cat([h, parts[s]], dim=1)
            for block in reversed(self.stage(s)):
                h = block.inverse(h, iterations=its, tol=eps)
            h = unsqueeze(h)
        return h
