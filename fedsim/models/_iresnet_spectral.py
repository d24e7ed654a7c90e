"""Spectrally normalised convolutions for :mod:`fedsim.models.iresnet`.

An invertible residual branch (Behrmann et al., ICML 2019,
arxiv.org/abs/1811.00995) must be a contraction, so each of its convolutions is
scaled to an operator norm of at most ``coeff``. The norm is estimated with
persistent power-iteration vectors ``u``, ``v`` (buffers, refreshed cheaply in
train mode) and recomputed from scratch with restarted Golub-Kahan-Lanczos
bidiagonalisation when weights arrive from elsewhere (construction, the
server's ``server_update``). The leading underscore keeps the module out of
model discovery.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SpectralNormConv2d"]


def _unit(t: torch.Tensor) -> torch.Tensor:
    """``t`` scaled to unit norm; a zero ``t`` becomes the normalised ones vector.

    The fallback keeps the power iteration alive when a weight passes through
    zero (pruning, zero init): from a zero vector it would never recover.
    """
    norm = t.norm()
    restart = torch.full_like(t, 1.0 / math.sqrt(max(t.numel(), 1)))
    return torch.where(norm > 0, t / norm.clamp_min(1e-30), restart)


_LANCZOS_CYCLE = 32  # Lanczos steps between restarts


def _orthogonalize(x: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """``x`` minus its projection on orthonormal ``basis`` (two passes)."""
    if not basis:
        return x
    q = torch.stack(basis)
    for _ in range(2):
        x = x - q.t() @ (q @ x)
    return x


def _top_singular_pair(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor], torch.Tensor],
    u0: torch.Tensor,
    v0: torch.Tensor,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular vectors (u, v) of ``A`` from ``steps`` Lanczos steps from ``v0``.

    Golub-Kahan bidiagonalisation ``A V = U B`` with full reorthogonalisation;
    the top singular pair of the small bidiagonal ``B`` lifts to ``A``'s. Returns
    ``(u0, v0)`` normalised if ``A v0 = 0``.
    """
    us: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    steps = min(steps, u0.numel(), v0.numel())  # the Krylov space's dimension
    tiny = math.sqrt(torch.finfo(v0.dtype).eps)  # breakdown: space exhausted
    v = _unit(v0)
    p = matvec(v)
    for _ in range(steps):
        p = _orthogonalize(p, us)
        alpha = float(p.norm())
        if alpha == 0.0 or alpha <= tiny * max(alphas, default=0.0):
            break
        vs.append(v)
        us.append(p / alpha)
        alphas.append(alpha)
        if len(us) == steps:
            break
        r = _orthogonalize(rmatvec(us[-1]), vs)
        beta = float(r.norm())
        if beta <= tiny * max(alphas):
            break
        betas.append(beta)
        v = r / beta
        p = matvec(v) - beta * us[-1]
    if not us:
        return _unit(u0), _unit(v0)
    k = len(us)
    bidiagonal = torch.diag(torch.tensor(alphas, dtype=v.dtype, device=v.device))
    if k > 1:
        upper = torch.tensor(betas[: k - 1], dtype=v.dtype, device=v.device)
        bidiagonal = bidiagonal + torch.diag(upper, 1)
    left, _, right = torch.linalg.svd(bidiagonal)
    u = left[:, 0] @ torch.stack(us)
    v = right[0] @ torch.stack(vs)
    return _unit(u), _unit(v)


class SpectralNormConv2d(nn.Module):
    """A stride-1 convolution whose operator norm is kept at most ``coeff``.

    The layer uses ``W / max(1, sigma / coeff)`` where ``sigma = u^T W v`` is the
    power-iteration estimate of the largest singular value of the convolution
    as a linear map at its fixed input shape: the reshaped (out, in) matrix for
    a 1x1 kernel, the zero-padded convolution operator on (in, H, W) for a 3x3
    kernel (iterated with ``conv2d`` and its adjoint ``conv_transpose2d``). The
    vectors ``u`` and ``v`` are buffers; ``forward`` never updates them (the
    owning :class:`ResidualBranch` does, in train mode).

    Parameters
    ----------
    in_channels, out_channels : int
        Channel counts.
    kernel_size : int
        1 or 3 (padding keeps the spatial size).
    input_hw : sequence of int
        (H, W) of the input the operator norm is taken at.
    coeff : float
        Bound on the normalised operator norm.
    init_iterations : int
        Lanczos steps run at construction (:meth:`reestimate`), so a fresh
        layer is normalised.
    """

    u: torch.Tensor
    v: torch.Tensor

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_hw: Sequence[int],
        coeff: float,
        init_iterations: int,
    ) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size={kernel_size} must be 1 or 3")
        self.kernel_size = kernel_size
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.coeff = coeff
        weight = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.weight_orig = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        space = () if kernel_size == 1 else self.input_hw
        self.register_buffer("u", _unit(torch.ones(out_channels, *space)))
        self.register_buffer("v", _unit(torch.ones(in_channels, *space)))
        self.reestimate(init_iterations)

    def _matvec(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The operator applied to one input-space vector: ``W v``."""
        if self.kernel_size == 1:
            return weight.flatten(1) @ v
        return F.conv2d(v.unsqueeze(0), weight, padding=1).squeeze(0)

    def _rmatvec(self, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The adjoint applied to one output-space vector: ``W^T u``."""
        if self.kernel_size == 1:
            return weight.flatten(1).t() @ u
        return F.conv_transpose2d(u.unsqueeze(0), weight, padding=1).squeeze(0)

    @torch.no_grad()
    def power_iteration(self, iterations: int) -> None:
        """Refine ``u`` and ``v`` by ``iterations`` power-iteration steps.

        The cheap per-step update of train mode, warm-started from the buffers.
        """
        if iterations <= 0:
            return
        weight = self.weight_orig.detach()
        u, v = self.u, self.v
        for _ in range(iterations):
            v = _unit(self._rmatvec(u, weight))
            u = _unit(self._matvec(v, weight))
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def reestimate(self, iterations: int) -> None:
        """Recompute ``u`` and ``v`` with ``iterations`` Lanczos steps.

        Restarted Golub-Kahan-Lanczos bidiagonalisation, started from ``v``:
        each step costs what a power-iteration step costs (one product with
        ``W`` and one with ``W^T``) but converges far faster when the top
        singular values are close, as they are for convolutions, where plain
        power iteration from a cold start needs hundreds of steps for 1e-3.
        """
        weight = self.weight_orig.detach()
        shape_u, shape_v = self.u.shape, self.v.shape

        def matvec(x: torch.Tensor) -> torch.Tensor:
            return self._matvec(x.reshape(shape_v), weight).reshape(-1)

        def rmatvec(y: torch.Tensor) -> torch.Tensor:
            return self._rmatvec(y.reshape(shape_u), weight).reshape(-1)

        u, v = self.u.reshape(-1), self.v.reshape(-1)
        left = iterations
        while left > 0:
            steps = min(left, _LANCZOS_CYCLE)
            left -= steps
            u, v = _top_singular_pair(matvec, rmatvec, u, v, steps)
        self.u.copy_(u.reshape(shape_u))
        self.v.copy_(v.reshape(shape_v))

    def sigma(self) -> torch.Tensor:
        """Estimated operator norm ``u^T W v`` (differentiable in the weight)."""
        return (self.u * self._matvec(self.v, self.weight_orig)).sum()

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, sigma / coeff)``: the weight the layer applies."""
        return self.weight_orig / torch.clamp(self.sigma() / self.coeff, min=1.0)

    @torch.no_grad()
    def project(self) -> None:
        """Write the normalised weight into ``weight_orig`` (function unchanged)."""
        self.weight_orig.copy_(self.normalized_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[-2:])} given to a conv "
                f"normalised at {self.input_hw}; the input size is fixed"
            )
        pad = self.kernel_size // 2
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=pad)
