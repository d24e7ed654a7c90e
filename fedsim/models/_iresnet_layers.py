"""Building blocks of invertible residual networks for :mod:`fedsim.models.iresnet`.

Invertible ResNets (Behrmann et al., ICML 2019, arxiv.org/abs/1811.00995) make
every residual branch ``g`` a contraction, so that ``y = x + g(x)`` can be
inverted by fixed-point iteration and its log-determinant expanded as a power
series. This module holds the pieces: ActNorm, squeeze, the contractive branch
(built from the spectrally normalised convolutions of
:mod:`fedsim.models._iresnet_spectral`), the invertible block and its
log-determinant estimators. The leading underscore keeps it out of model
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

from fedsim.models._iresnet_spectral import SpectralNormConv2d

__all__ = [
    "ESTIMATORS",
    "ActNorm",
    "Estimator",
    "InvertibleBlock",
    "ResidualBranch",
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
