"""Selective convolution: a BN-ReLU-conv layer that closes unimportant input
channels and reopens them as spatially shifted copies of important ones.

Jeong & Shin, "Training CNNs with Selective Allocation of Channels", ICML 2019.
Paper: proceedings.mlr.press/v97/jeong19c.html

A :class:`SelectiveConv2d` keeps, per input channel (slot) ``i``:

- a gate ``g[i]`` (float buffer, 0 or 1): a closed slot feeds nothing to the conv;
- a pointer ``p[i]`` (long buffer, only when ``top_k > 0``): ``-1`` for the
  slot's own input channel, or the input channel the slot copies;
- a shift ``b[i]`` (parameter, only when ``top_k > 0``): the copy is the pointed
  channel translated by ``b[i]`` pixels (bilinear, border padding).

The expected channel damage matrix (ECDM) scores how much each input channel
contributes to each output; :meth:`SelectiveConv2d.deallocate` closes the least
useful channels and :meth:`SelectiveConv2d.reallocate` reopens every closed slot
as a shifted copy of one of the ``top_k`` most useful channels, with its conv
weights zeroed so that the layer computes exactly the same function. In
federated training only the server runs these two steps, on the aggregated
model (see :mod:`fedsim.models._selective_net`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef

__all__ = ["SelectiveConv2d", "expected_relu", "shift_channels"]

# Guards divisions by a zero BN scale or an all-zero damage row.
_TINY = 1e-12
# Reopened copies start at a shift drawn uniformly from this box (pixels).
_SHIFT_RANGE = 1.5


def expected_relu(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E[max(0, z)]`` for ``z ~ N(mean, std**2)``, elementwise.

    The closed form is ``|s| phi(m / |s|) + m Phi(m / |s|)`` with ``phi`` and
    ``Phi`` the standard normal density and distribution function; at
    ``std = 0`` it is ``max(mean, 0)``.

    Parameters
    ----------
    mean, std : Tensor
        Broadcastable means and standard deviations (the sign of ``std`` is
        ignored, as a BatchNorm scale may be negative).

    Returns
    -------
    Tensor
        The expectations.
    """
    scale = std.abs().clamp_min(_TINY)
    t = mean / scale
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))
    return scale * pdf + mean * cdf


def shift_channels(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Translate every channel by its own sub-pixel shift (bilinear, border).

    ``out[n, c, i, j] = x[n, c, i + shift[c, 1], j + shift[c, 0]]``, bilinearly
    interpolated, with samples past the edge clamped to the edge pixel. Shifts
    are in pixels on both axes; the grid uses ``align_corners=False``, so a
    1x1 map is left as it is.

    Parameters
    ----------
    x : Tensor
        Feature maps, shape (N, C, H, W).
    shift : Tensor
        Per-channel shift ``(dx, dy)`` in pixels, shape (C, 2).

    Returns
    -------
    Tensor
        The shifted maps, shape (N, C, H, W).
    """
    _, _, h, w = x.shape
    cols = (2.0 * torch.arange(w, dtype=x.dtype, device=x.device) + 1.0) / w - 1.0
    rows = (2.0 * torch.arange(h, dtype=x.dtype, device=x.device) + 1.0) / h - 1.0
    gx = cols[None, None, :] + (2.0 / w) * shift[:, 0, None, None]
    gy = rows[None, :, None] + (2.0 / h) * shift[:, 1, None, None]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # (C, H, W, 2)
    # channels become the batch of grid_sample so that each gets its own grid
    moved = F.grid_sample(
        x.transpose(0, 1),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return moved.transpose(0, 1)


class SelectiveConv2d(nn.Module):
    """BatchNorm, ReLU, input gates, then a bias-free convolution.

    The forward pass is ``conv(g * relu(bn(x_hat)))`` where ``x_hat[:, i]`` is
    ``x[:, i]`` for an ordinary slot and ``x[:, p[i]]`` shifted by ``b[i]``
    pixels for a copy. Every tensor is computed densely (no data-dependent
    shapes), so the layer runs under ``torch.func`` transforms.

    Parameters
    ----------
    in_channels : int
        Input channels (slots) ``I``.
    out_channels : int
        Output channels ``O``.
    kernel_size : int
        Odd kernel size ``k``; the conv pads by ``k // 2`` and keeps the size.
    top_k : int
        Number of most important channels that closed slots are reallocated to
        (the paper's ``K``); ``0`` makes a layer that only prunes, without
        pointers or shifts.
    gamma : float
        Damage budget of de-allocation: the closed channels may remove at most
        this fraction of any output's total expected input, in [0, 1).
    max_copies : int or None
        Most copies of one channel reallocation may hold (the paper's
        ``N_max``); ``None`` for no limit.
    """

    g: torch.Tensor
    p: torch.Tensor | None
    b: nn.Parameter | None

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        top_k: int,
        gamma: float = 1e-3,
        max_copies: int | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(
                f"a selective conv needs positive widths, got {in_channels} -> "
                f"{out_channels}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(
                f"kernel_size must be a positive odd number, got {kernel_size}"
            )
        if top_k < 0:
            raise ConfigError(f"top_k must be 0 (prune only) or more, got {top_k}")
        if not 0.0 <= gamma < 1.0:
            raise ConfigError(f"gamma must lie in [0, 1), got {gamma}")
        if max_copies is not None and max_copies < 1:
            raise ConfigError(
                f"max_copies must be a positive count or None, got {max_copies}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.top_k = top_k
        self.gamma = gamma
        self.max_copies = max_copies
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=False,
        )
        self.register_buffer("g", torch.ones(in_channels))
        if top_k > 0:
            self.register_buffer("p", torch.full((in_channels,), -1, dtype=torch.long))
            self.b = nn.Parameter(torch.zeros(in_channels, 2))
        else:
            self.register_buffer("p", None)
            self.register_parameter("b", None)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} -> {self.out_channels}, k={self.kernel_size}, "
            f"top_k={self.top_k}, gamma={self.gamma}, max_copies={self.max_copies}"
        )

    # ------------------------------------------------------------------ forward
    def gather_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x_hat``: the input with every copy slot replaced by its shifted source."""
        if self.p is None or self.b is None:
            return x
        is_copy = self.p >= 0
        own = torch.arange(self.in_channels, device=x.device)
        source = x.index_select(1, torch.where(is_copy, self.p, own))
        shifted = shift_channels(source, self.b.to(x.dtype))
        return torch.where(is_copy[:, None, None], shifted, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.gather_inputs(x)))
        return self.conv(h * self.g[:, None, None])

    # ------------------------------------------------------------ channel state
    @property
    def open_slots(self) -> int:
        """Number of open input slots."""
        return int((self.g != 0).sum())

    def effective_weights(self) -> int:
        """Conv weights in use: ``open_slots * O * k * k``."""
        return self.open_slots * self.out_channels * self.kernel_size**2

    def check_selection(self) -> None:
        """Raise if the gates or pointers are not a valid channel selection.

        Gates must be exactly 0 or 1; a pointer must be ``-1`` or the index of
        a slot that is not itself a copy. Averaged gates or pointers (a sign that
        the server-owned tensors went through aggregation) fail here.

        Raises
        ------
        ValueError
            Naming the first bad gate or pointer.
        """
        bad = ((self.g != 0) & (self.g != 1)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"gate {i} is {float(self.g[i])}; gates must be exactly 0 or 1"
            )
        if self.p is None:
            return
        for i, target in enumerate(self.p.tolist()):
            if target == -1:
                continue
            if not 0 <= target < self.in_channels or int(self.p[target]) != -1:
                raise ValueError(
                    f"pointer {i} is {target}; a pointer must be -1 or the index "
                    f"of a slot in 0..{self.in_channels - 1} that is not a copy"
                )

    # --------------------------------------------------------------------- ECDM
    def channel_damage(self) -> torch.Tensor:
        """The expected channel damage matrix, shape (O, I).

        ``ECDM[o, j] = (sum_uv W[o, j, u, v]) * g[j] * E[relu(N(beta_j,
        gamma_j**2))]`` with ``gamma, beta`` the BatchNorm scale and bias: the
        expected contribution of input ``j`` to output ``o`` when the normalised
        input is Gaussian.
        """
        mean_relu = expected_relu(self.bn.bias, self.bn.weight) * self.g
        return self.conv.weight.sum(dim=(2, 3)) * mean_relu[None, :]

    def normalized_damage(self) -> torch.Tensor:
        """``|ECDM|`` with every row scaled to sum to one (all-zero rows stay 0)."""
        damage = self.channel_damage().abs()
        return damage / damage.sum(dim=1, keepdim=True).clamp_min(_TINY)

    # ------------------------------------------------- de- and re-allocation
    @torch.no_grad()
    def deallocate(self) -> torch.Tensor:
        """Close the longest run of least important channels within the budget.

        Channels are sorted by ``max_o E[o, j]`` (normalised ECDM), ascending,
        and the longest prefix ``S`` with ``max_o sum_{j in S} E[o, j] <= gamma``
        is closed: ``g = 0`` and, in layers with copies, ``p = -1``. Already
        closed channels have zero damage and stay closed.

        Returns
        -------
        Tensor
            The closed slots (long), least important first.
        """
        damage = self.normalized_damage()
        order = torch.argsort(damage.max(dim=0).values, stable=True)
        worst = damage[:, order].cumsum(dim=1).max(dim=0).values
        within = (worst <= self.gamma).long()
        closed = order[: int(within.cumprod(dim=0).sum())]
        self.g[closed] = 0.0
        if self.p is not None:
            self.p[closed] = -1
        return closed

    @torch.no_grad()
    def reallocate(self, generator: torch.Generator) -> torch.Tensor:
        """Reopen every closed slot as a shifted copy of an important channel.

        The ``top_k`` open channels with the largest ``||E[:, j]||_2`` are the
        sources. Each closed slot, in index order, copies a source drawn
        uniformly (by ``generator``): its BatchNorm parameters and running
        statistics, a pointer to the source's root channel (the source itself,
        or the channel it copies, so pointers never point to a copy) and a shift
        drawn from ``U(-1.5, 1.5)**2`` pixels. Its conv weights are zeroed, so
        the layer's function is unchanged. A closed slot that is the root of an
        open copy is reopened as its own channel (zero weights) instead, since
        overwriting it would redirect that copy. Sources whose root already has
        ``max_copies`` copies are skipped; slots left without an eligible source
        stay closed. Layers with ``top_k = 0`` only prune and are left as they
        are.

        Parameters
        ----------
        generator : torch.Generator
            Source of the random source choices and shifts (on the CPU).

        Returns
        -------
        Tensor
            The reopened slots (long).
        """
        closed = (self.g == 0).nonzero().flatten()
        if self.p is None or self.b is None or closed.numel() == 0:
            return closed[:0]
        p, b = self.p, self.b
        is_open = self.g != 0
        own = torch.arange(self.in_channels, device=p.device)
        root = torch.where(p >= 0, p, own)
        copies = torch.bincount(p[is_open & (p >= 0)], minlength=self.in_channels)

        def has_room(channel: int) -> bool:
            limit = self.max_copies
            return limit is None or int(copies[root[channel]]) < limit

        score = self.normalized_damage().norm(dim=0)
        candidates = [j for j in is_open.nonzero().flatten().tolist() if has_room(j)]
        ranked = sorted(candidates, key=lambda j: -float(score[j]))
        sources = ranked[: self.top_k]
        # roots of open copies (every copy source's root among them)
        pinned = set(p[is_open & (p >= 0)].tolist())

        reopened: list[int] = []
        for slot in closed.tolist():
            if slot in pinned:
                self.conv.weight[:, slot] = 0.0
                self.g[slot] = 1.0
                reopened.append(slot)
                continue
            usable = [s for s in sources if has_room(s)]
            if not usable:
                continue
            pick = int(torch.randint(len(usable), (1,), generator=generator))
            source = usable[pick]
            shift = torch.rand(2, generator=generator, dtype=b.dtype)
            for name in ("weight", "bias", "running_mean", "running_var"):
                stat = getattr(self.bn, name)
                stat[slot] = stat[source]
            self.conv.weight[:, slot] = 0.0
            self.g[slot] = 1.0
            p[slot] = root[source]
            b[slot] = (2.0 * shift - 1.0).to(b.device) * _SHIFT_RANGE
            copies[root[source]] += 1
            reopened.append(slot)
        return torch.tensor(reopened, dtype=torch.long)

    # ------------------------------------------------------ permutation axes
    def input_axes(self, prefix: str, offset: int = 0) -> tuple[AxisRef, ...]:
        """Every axis a permutation of this layer's input channels moves.

        BatchNorm parameters and statistics, gates, shifts, pointers (their
        slots move and their values are relabelled) and the conv weight's input
        axis; ``offset`` is where the permuted slice starts.
        """
        refs = [
            AxisRef(f"{prefix}bn.weight", 0, offset),
            AxisRef(f"{prefix}bn.bias", 0, offset),
            AxisRef(f"{prefix}bn.running_mean", 0, offset),
            AxisRef(f"{prefix}bn.running_var", 0, offset),
            AxisRef(f"{prefix}g", 0, offset),
        ]
        if self.top_k > 0:
            refs += [
                AxisRef(f"{prefix}b", 0, offset),
                AxisRef(f"{prefix}p", 0, offset),
                AxisRef(f"{prefix}p", offset=offset, values=True),
            ]
        refs.append(AxisRef(f"{prefix}conv.weight", 1, offset))
        return tuple(refs)

    def output_axis(self, prefix: str, offset: int = 0) -> AxisRef:
        """The conv weight's output axis (the producing axis of the next group)."""
        return AxisRef(f"{prefix}conv.weight", 0, offset)
