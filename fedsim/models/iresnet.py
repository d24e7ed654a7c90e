"""Invertible ResNets: the ``iresnet`` classifier and ``iresnet_flow`` density model.

Behrmann, Grathwohl, Chen, Duvenaud and Jacobsen, "Invertible Residual
Networks", ICML 2019 (arxiv.org/abs/1811.00995). Every residual branch is a
contraction (spectral normalisation to ``coeff < 1``), so each block
``y = a + g(a)`` (after ActNorm) is invertible by fixed-point iteration and its
log-determinant is the power series ``sum_k (-1)^(k+1) tr(J_g^k) / k``.

Layout: ``hidden`` has one list per stage, with two widths (the outputs of
``W1`` and ``W2``) per block; every stage starts with a squeeze (space-to-depth
by 2), so ``input_shape`` (C, H, W) fixes the stream. The default, two stages
of four blocks of width 16, is the spec's minimal 8x8 model; its minimal 28x28
model has width 32 (``hidden=[[32] * 8] * 2``). The widths are explicit, one
entry per permutation group, so that matching can rebuild the model at new
widths. The classifier's stream is 4x4x4 then 16x2x2 on 8x8 digits (4x14x14
then 16x7x7 on 28x28 MNIST), followed by BatchNorm, ReLU, global average
pooling and a Linear head. The flow factors out half of the channels after
every stage but the last (4x4x4, then 2x4x4 squeezed to 8x2x2) and puts a
learned diagonal Gaussian prior on the latent.

Federated learning
------------------
* Roles: the power-iteration vectors ``u``, ``v`` are ``"server"`` tensors
  (never averaged: an average of unit vectors is no singular vector; clients
  refine their copies locally, the server recomputes its own) and so is
  ActNorm's ``initialized`` flag; everything else is averaged.
* What is averaged is ``weight_orig``, the raw parameter. ``server_update``
  re-estimates ``u``, ``v`` on the average with ``server_iterations`` (>= 20)
  Lanczos steps (a Krylov refinement of the power iteration at the same cost
  per step, needed because cold power iteration on conv operators takes
  hundreds of steps to reach 1e-3) and writes the normalised weight back into
  ``weight_orig``. That leaves the global function unchanged and puts every
  client's next starting point inside the ball ``sigma <= coeff``. While a
  client stays in the ball its raw weight is its normalised weight, so the
  average is an average of matrices of norm ``<= coeff``, whose norm is
  ``<= coeff`` by the triangle inequality, and needs no rescaling; a client
  that leaves the ball is rescaled by the normalisation.
* ActNorm: a client whose global model is not yet initialised initialises
  ActNorm from its first local batch; ``server_update`` then marks the averaged
  model initialised, so no later client re-initialises it.
* Permutations: only the branch hidden channels (outputs of ``W1`` and ``W2``)
  are symmetries; their groups also move the ``u``/``v`` entries they act on,
  which keeps ``u^T W v`` (and so the normalisation) invariant. The residual
  stream is pinned by the pixels, squeeze, factor-out, ActNorm, prior and head.

Code: this module registers the models and holds the classifier; the flow is
in :mod:`fedsim.models._iresnet_flow`, the stage stack with the federated
plumbing both share in :mod:`fedsim.models._iresnet_net`, the blocks and
log-determinant estimators in :mod:`fedsim.models._iresnet_layers` and the
spectrally normalised convolutions in :mod:`fedsim.models._iresnet_spectral`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.models import MODELS
from fedsim.models._iresnet_flow import IResNetFlow
from fedsim.models._iresnet_net import InvertibleNet

__all__ = ["IResNet", "IResNetFlow", "bits_per_dim", "iresnet", "iresnet_flow"]


def bits_per_dim(
    log_prob: torch.Tensor, num_dims: int, *, levels: int = 256
) -> torch.Tensor:
    """Bits per dimension of ``levels``-valued data from a continuous density.

    ``log_prob`` (nats per example) is the density of the dequantised data
    ``(x + U) / levels`` (shifted or not), so the discrete likelihood is about
    ``p * levels^-D`` and ``bpd = -log p / (D ln 2) + log2(levels)``.
    """
    return -log_prob / (num_dims * math.log(2.0)) + math.log2(levels)


class IResNet(InvertibleNet):
    """Invertible-ResNet classifier: invertible features, then a BN-ReLU-pool head.

    ``pad_channels`` zero channels are appended to the input first (the paper's
    injective padding, which adds width while keeping the features
    invertible on the data).
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[Sequence[int]],
        pad_channels: int,
        coeff: float,
        power_iterations: int,
        server_iterations: int,
        inverse_iterations: int,
        inverse_tol: float,
    ) -> None:
        if pad_channels < 0:
            raise ConfigError(f"pad_channels={pad_channels} must be >= 0")
        c, h, w = (int(v) for v in input_shape)
        super().__init__(
            stream_shape=(c + pad_channels, h, w),
            hidden=hidden,
            coeff=coeff,
            power_iterations=power_iterations,
            server_iterations=server_iterations,
            inverse_iterations=inverse_iterations,
            inverse_tol=inverse_tol,
            factor_out=False,
        )
        self.pad_channels = pad_channels
        width = self.shapes[-1][0]
        self.norm = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The invertible part: (B, C, H, W) -> the last stage's stream."""
        x = F.pad(x, (0, 0, 0, 0, 0, self.pad_channels))
        return self._run_stages(x, lambda block, h: block(h))[0]

    @torch.no_grad()
    def invert_features(
        self,
        features: torch.Tensor,
        *,
        iterations: int | None = None,
        tol: float | None = None,
    ) -> torch.Tensor:
        """The input whose :meth:`features` are ``features``.

        Call in eval mode (train mode would refresh ``u``, ``v`` in between);
        not differentiable.
        """
        x = self._invert_stages(features, [], iterations, tol)
        return x[:, : x.shape[1] - self.pad_channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.norm(self.features(x)))
        return self.head(f.mean(dim=(2, 3)))


DEFAULT_HIDDEN = ((16,) * 8, (16,) * 8)  # 2 stages x 4 blocks x (h1, h2)


@MODELS.register("iresnet")
def iresnet(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[Sequence[int]] = DEFAULT_HIDDEN,
    pad_channels: int = 0,
    coeff: float = 0.9,
    power_iterations: int = 1,
    server_iterations: int = 100,
    inverse_iterations: int = 100,
    inverse_tol: float = 1e-10,
) -> IResNet:
    """Registered ``iresnet`` classifier.

    Parameters
    ----------
    input_shape : sequence of int
        (C, H, W); H and W divisible by ``2 ** len(hidden)``.
    num_classes : int
        Output size of the head.
    hidden : sequence of sequence of int
        Per stage, the (W1, W2) output widths of each block in turn.
    pad_channels : int
        Zero channels appended to the input (injective padding).
    coeff : float
        Spectral-norm bound of every branch conv, in (0, 1).
    power_iterations : int
        Power-iteration steps per forward pass in train mode.
    server_iterations : int
        Lanczos steps re-estimating ``u``, ``v`` at construction and in
        ``server_update`` (at least 20).
    inverse_iterations, inverse_tol : int, float
        Fixed-point budget and tolerance per block when inverting.
    """
    return IResNet(
        input_shape=input_shape,
        num_classes=num_classes,
        pad_channels=pad_channels,
        coeff=coeff,
        power_iterations=power_iterations,
        server_iterations=server_iterations,
        inverse_iterations=inverse_iterations,
        inverse_tol=inverse_tol,
        hidden=[[int(h) for h in stage] for stage in hidden],
    )


@MODELS.register("iresnet_flow")
def iresnet_flow(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[Sequence[int]] = DEFAULT_HIDDEN,
    coeff: float = 0.9,
    power_iterations: int = 5,
    server_iterations: int = 100,
    inverse_iterations: int = 100,
    inverse_tol: float = 1e-10,
    log_det: str = "hutchinson",
    terms: int = 5,
    seed: int = 0,
) -> IResNetFlow:
    """Registered ``iresnet_flow`` density model.

    Takes the options of :func:`iresnet` except ``pad_channels``; it is
    unconditional, so ``num_classes`` is accepted for the common factory
    signature and unused. Its own options:

    Parameters
    ----------
    log_det : {"hutchinson", "exact"}
        Trace estimator of the log-determinant series.
    terms : int
        Number of series terms.
    seed : int
        Seed of the Hutchinson probes.
    """
    del num_classes
    return IResNetFlow(
        input_shape=input_shape,
        coeff=coeff,
        power_iterations=power_iterations,
        server_iterations=server_iterations,
        inverse_iterations=inverse_iterations,
        inverse_tol=inverse_tol,
        log_det=log_det,
        terms=terms,
        seed=seed,
        hidden=[[int(h) for h in stage] for stage in hidden],
    )
