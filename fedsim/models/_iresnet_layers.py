"""Building blocks of invertible residual networks for :mod:`fedsim.models.iresnet`.

Invertible ResNets (Behrmann et al., ICML 2019, arxiv.org/abs/1811.00995) make
every residual branch ``g`` a contraction, so that ``y = x + g(x)`` can be
inverted by fixed-point iteration and its log-determinant expanded as a power
series. This module holds the pieces: spectrally normalised convolutions with
persistent power-iteration vectors, ActNorm, squeeze, the invertible block and
its log-determinant estimators. The leading underscore keeps it out of model
discovery.

Nothing here changes a parameter inside ``forward``: power-iteration vectors and
ActNorm's data-dependent initial values are buffers, so a model built from these
blocks trains under ``torch.func.functional_call`` + ``torch.func.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ESTIMATORS",
    "ActNorm",
    "Estimator",
    "InvertibleBlock",
    "ResidualBranch",
    "SpectralNormConv2d",
    "fixed_point_inverse",
    "log_det_series",
    "squeeze",
    "unsqueeze",
]

Estimator = Literal["hutchinson", "exact"]
ESTIMATORS: tuple[str, ...] = ("hutchinson", "exact")
VjpFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth by 2: (B, C, H, W) -> (B, 4C, H/2, W/2); a pure reordering."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    return F.pixel_shuffle(x, 2)


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


class ActNorm(nn.Module):
    """Per-channel affine map ``y = (x + shift) * exp(log_scale)``.

    On its first forward pass in train mode it initialises itself from the batch
    so that each channel of ``y`` has zero mean and unit variance (a channel
    with no spread keeps unit scale). The data-dependent values live in buffers
    (``data_loc``, ``data_log_scale``) and the learned ones in parameters
    (``loc``, ``log_scale``, starting at zero); the layer uses their sums. The
    ``initialized`` flag is a buffer too, so it travels in the state dict: a
    model that loads trained weights does not initialise itself again.
    """

    data_loc: torch.Tensor
    data_log_scale: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("data_loc", torch.zeros(channels))
        self.register_buffer("data_log_scale", torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _initialize(self, x: torch.Tensor) -> None:
        """Set the data-dependent buffers from ``x`` unless already initialised."""
        with torch.no_grad():
            mean = x.mean(dim=(0, 2, 3))
            std = x.std(dim=(0, 2, 3), unbiased=False)
            log_inv_std = torch.where(std > 1e-6, -std.clamp_min(1e-6).log(), 0.0)
            loc = -mean - self.loc
            log_scale = log_inv_std - self.log_scale
            # branch-free, so the same code runs vmapped over clients
            self.data_loc.copy_(torch.where(self.initialized, self.data_loc, loc))
            self.data_log_scale.copy_(
                torch.where(self.initialized, self.data_log_scale, log_scale)
            )
            self.initialized.fill_(True)

    def shift_and_log_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (shift, log-scale), each of shape (C,)."""
        return self.data_loc + self.loc, self.data_log_scale + self.log_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._initialize(x)
        shift, log_scale = self.shift_and_log_scale()
        return (x + shift[:, None, None]) * log_scale.exp()[:, None, None]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``x`` with ``forward(x) == y``."""
        shift, log_scale = self.shift_and_log_scale()
        return y * (-log_scale).exp()[:, None, None] - shift[:, None, None]

    def log_det(self, height: int, width: int) -> torch.Tensor:
        """``log |det dy/dx|`` for one example of spatial size (height, width)."""
        return height * width * self.shift_and_log_scale()[1].sum()


class ResidualBranch(nn.Module):
    """``g = W3 o elu o W2 o elu o W1 (o elu)``: a contraction when ``coeff < 1``.

    ``W1`` is 3x3 (C -> h1), ``W2`` 1x1 (h1 -> h2), ``W3`` 3x3 (h2 -> C), each
    spectrally normalised to ``coeff``; ELU is 1-Lipschitz and smooth, so
    ``Lip(g) <= coeff ** 3`` and the log-determinant has usable gradients.

    Parameters
    ----------
    channels : int
        Channels of the residual stream (C).
    hidden : sequence of int
        (h1, h2): output widths of ``W1`` and ``W2``.
    input_hw : sequence of int
        Spatial size of the stream.
    input_activation : bool
        Apply ELU to the input first (every block but the network's first).
    coeff : float
        Spectral-norm bound of each conv.
    train_iterations : int
        Power iterations per forward pass in train mode.
    init_iterations : int
        Lanczos steps per conv at construction.
    """

    def __init__(
        self,
        *,
        channels: int,
        hidden: Sequence[int],
        input_hw: Sequence[int],
        input_activation: bool,
        coeff: float,
        train_iterations: int,
        init_iterations: int,
    ) -> None:
        super().__init__()
        h1, h2 = (int(h) for h in hidden)

        def conv(c_in: int, c_out: int, kernel: int) -> SpectralNormConv2d:
            return SpectralNormConv2d(
                in_channels=c_in,
                out_channels=c_out,
                kernel_size=kernel,
                input_hw=input_hw,
                coeff=coeff,
                init_iterations=init_iterations,
            )

        self.conv1 = conv(channels, h1, 3)
        self.conv2 = conv(h1, h2, 1)
        self.conv3 = conv(h2, channels, 3)
        self.input_activation = input_activation
        self.train_iterations = train_iterations

    def convs(self) -> tuple[SpectralNormConv2d, ...]:
        """``(conv1, conv2, conv3)``."""
        return (self.conv1, self.conv2, self.conv3)

    def refresh(self) -> None:
        """In train mode, run the per-step power iterations of every conv."""
        if self.training:
            for conv in self.convs():
                conv.power_iteration(self.train_iterations)

    def forward(self, x: torch.Tensor, *, update: bool = True) -> torch.Tensor:
        if update:
            self.refresh()
        h = F.elu(x) if self.input_activation else x
        h = F.elu(self.conv1(h))
        h = F.elu(self.conv2(h))
        return self.conv3(h)


def _jacobian(vjp_fn: VjpFn, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians (B, d, d) from a VJP, one basis vector per row."""
    batch, d = shape[0], math.prod(shape[1:])
    basis = torch.eye(d, dtype=like.dtype, device=like.device)
    cotangents = basis.reshape(d, 1, *shape[1:]).expand(d, *shape)
    (rows,) = torch.func.vmap(vjp_fn)(cotangents)
    return rows.reshape(d, batch, d).transpose(0, 1)


def log_det_series(
    vjp_fn: VjpFn,
    like: torch.Tensor,
    *,
    terms: int,
    estimator: Estimator,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sum_{k<=terms} (-1)^(k+1) tr(J^k) / k`` per example: ``ln det(I + J)``.

    The series converges when ``Lip(g) < 1``; truncation after ``n`` terms errs
    by at most ``-d (ln(1 - L) + sum_{k<=n} L^k / k)`` for dimension ``d``.

    Parameters
    ----------
    vjp_fn : callable
        The VJP of the branch at the batch (from ``torch.func.vjp``); gradients
        flow through it to the branch's parameters.
    like : Tensor
        The branch input (for shape, dtype and device).
    terms : int
        Number of series terms.
    estimator : {"hutchinson", "exact"}
        ``"hutchinson"``: one Gaussian probe ``v`` per example and
        ``tr(J^k) ~ v^T J^k v`` (unbiased for the truncated series, ``terms``
        VJPs); ``"exact"``: the full per-example Jacobian (``d`` VJPs, for tiny
        inputs only).
    generator : torch.Generator, optional
        Source of the probes; required for ``"hutchinson"``.

    Returns
    -------
    Tensor
        Shape (B,).
    """
    if estimator == "exact":
        jac = _jacobian(vjp_fn, like.shape, like)
        power = jac
        total = like.new_zeros(like.shape[0])
        for k in range(1, terms + 1):
            trace = torch.diagonal(power, dim1=1, dim2=2).sum(-1)
            total = total + (-1) ** (k + 1) * trace / k
            if k < terms:
                power = power @ jac
        return total
    if estimator != "hutchinson":
        raise ValueError(f"estimator={estimator!r} must be one of {ESTIMATORS}")
    if generator is None:
        raise ValueError("the hutchinson estimator needs a torch.Generator")
    probe = torch.randn(
        like.shape, generator=generator, dtype=like.dtype, device=like.device
    )
    w = probe
    total = like.new_zeros(like.shape[0])
    for k in range(1, terms + 1):
        (w,) = vjp_fn(w)  # w^T = v^T J^k
        total = total + (-1) ** (k + 1) * (w * probe).flatten(1).sum(1) / k
    return total


@torch.no_grad()
def fixed_point_inverse(
    branch: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    *,
    iterations: int,
    tol: float,
) -> torch.Tensor:
    """Solve ``x + g(x) = y`` by ``x <- y - g(x)`` (not differentiable).

    Stops after ``iterations`` steps or once no entry moves by more than
    ``tol``; with ``Lip(g) = L < 1`` the error after ``t`` steps is at most
    ``L^t / (1 - L) * ||x1 - x0||``.
    """
    x = y
    for _ in range(iterations):
        step = y - branch(x)
        moved = float((step - x).abs().max()) if x.numel() else 0.0
        x = step
        if moved <= tol:
            break
    return x


class InvertibleBlock(nn.Module):
    """ActNorm, then ``y = a + g(a)`` with a contractive :class:`ResidualBranch`.

    Takes the :class:`ResidualBranch` options; ``channels`` and ``input_hw``
    are the stream's, shared by the ActNorm.
    """

    def __init__(
        self,
        *,
        channels: int,
        hidden: Sequence[int],
        input_hw: Sequence[int],
        input_activation: bool,
        coeff: float,
        train_iterations: int,
        init_iterations: int,
    ) -> None:
        super().__init__()
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.actnorm = ActNorm(channels=channels)
        self.branch = ResidualBranch(
            channels=channels,
            hidden=hidden,
            input_hw=input_hw,
            input_activation=input_activation,
            coeff=coeff,
            train_iterations=train_iterations,
            init_iterations=init_iterations,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.actnorm(x)
        return a + self.branch(a)

    def forward_with_log_det(
        self,
        x: torch.Tensor,
        *,
        terms: int,
        estimator: Estimator,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, log |det dy/dx|)`` with the log-determinant per example (B,)."""
        a = self.actnorm(x)
        self.branch.refresh()
        ga, vjp_fn = torch.func.vjp(partial(self.branch, update=False), a)[:2]
        log_det = log_det_series(
            vjp_fn, a, terms=terms, estimator=estimator, generator=generator
        )
        return a + ga, log_det + self.actnorm.log_det(*self.input_hw)

    def inverse(self, y: torch.Tensor, *, iterations: int, tol: float) -> torch.Tensor:
        """``x`` with ``forward(x) == y`` (up to the fixed-point tolerance)."""
        a = fixed_point_inverse(
            partial(self.branch, update=False), y, iterations=iterations, tol=tol
        )
        return self.actnorm.inverse(a)
