"""The ``iresnet_flow`` density model: invertible stages with a Gaussian prior.

Registered in :mod:`fedsim.models.iresnet`, whose docstring describes the
architecture and its federated treatment; the leading underscore keeps this
module out of model discovery.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.models._iresnet_layers import ESTIMATORS, Estimator, InvertibleBlock
from fedsim.models._iresnet_net import InvertibleNet

__all__ = ["IResNetFlow"]


class IResNetFlow(InvertibleNet):
    """Multi-scale invertible-ResNet density model with a learned diagonal prior.

    ``forward(x)`` returns ``log p(x)`` in nats per example, shape (B,), so a
    density task trains on ``-forward(x)`` and the registry-wide checks see a
    batch that depends on every parameter (the latent alone would not reach
    the prior). ``x`` is continuous: dequantisation (e.g.
    ``(x + U) / 256 - 0.5``) happens before the model (``task=density`` takes
    it from the dataset, see :mod:`fedsim.tasks.density`);
    :func:`fedsim.models.iresnet.bits_per_dim` converts.
    Hutchinson probes come from ``seed``: fixed in eval mode (so evaluation is
    deterministic), a new stream per training step.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int],
        hidden: Sequence[Sequence[int]],
        coeff: float,
        power_iterations: int,
        server_iterations: int,
        inverse_iterations: int,
        inverse_tol: float,
        log_det: str,
        terms: int,
        seed: int,
    ) -> None:
        if log_det not in ESTIMATORS:
            raise ConfigError(f"log_det={log_det!r} must be one of {ESTIMATORS}")
        if terms < 1:
            raise ConfigError(f"terms={terms} must be >= 1")
        super().__init__(
            stream_shape=input_shape,
            hidden=hidden,
            coeff=coeff,
            power_iterations=power_iterations,
            server_iterations=server_iterations,
            inverse_iterations=inverse_iterations,
            inverse_tol=inverse_tol,
            factor_out=True,
        )
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_dims = math.prod(self.input_shape)
        self.log_det = cast(Estimator, log_det)
        self.terms = terms
        self.seed = seed
        self._draws = 0
        self.prior_mean = nn.Parameter(torch.zeros(self.num_dims))
        self.prior_log_std = nn.Parameter(torch.zeros(self.num_dims))

    def _probe_generator(self, device: torch.device) -> torch.Generator:
        """Probes from ``seed``: the same in eval mode, fresh per training step.

        ``seed`` and the step are mixed into one 32-bit seed, since torch's CPU
        generator keeps only the low 32 bits of the seed it is given.
        """
        if self.training:
            self._draws += 1
        step = self._draws if self.training else 0
        mixed = np.random.SeedSequence([self.seed % 2**64, step]).generate_state(1)
        return torch.Generator(device=device).manual_seed(int(mixed[0]))

    def _latent(self, h: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.flatten(1) for p in [*parts, h]], dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent ``z`` (B, D): factored-out parts first, the last stage last."""
        return self._latent(*self._run_stages(x, lambda block, h: block(h)))

    def log_prob(
        self,
        x: torch.Tensor,
        *,
        log_det: str | None = None,
        terms: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``log p(x)`` in nats per example (B,): prior log-density + log-dets.

        ``log_det`` and ``terms`` override the model's estimator settings;
        ``generator`` supplies the Hutchinson probes (default: from ``seed``).
        """
        estimator = cast(Estimator, self.log_det if log_det is None else log_det)
        n = self.terms if terms is None else terms
        gen = self._probe_generator(x.device) if generator is None else generator
        total = x.new_zeros(x.shape[0])

        def step(block: InvertibleBlock, h: torch.Tensor) -> torch.Tensor:
            nonlocal total
            y, ld = block.forward_with_log_det(
                h, terms=n, estimator=estimator, generator=gen
            )
            total = total + ld
            return y

        z = self._latent(*self._run_stages(x, step))
        std = self.prior_log_std.exp()
        prior = -0.5 * ((z - self.prior_mean) / std) ** 2 - self.prior_log_std
        prior = prior - 0.5 * math.log(2 * math.pi)
        return prior.sum(dim=1) + total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    @torch.no_grad()
    def inverse(
        self,
        z: torch.Tensor,
        *,
        iterations: int | None = None,
        tol: float | None = None,
    ) -> torch.Tensor:
        """The ``x`` with ``encode(x) == z`` (call in eval mode; not differentiable)."""
        sizes, shapes = [], []
        for s, (c, h, w) in enumerate(self.shapes):
            if s < len(self.shapes) - 1:
                shapes.append((c - c // 2, h, w))
            else:
                shapes.append((c, h, w))
            sizes.append(math.prod(shapes[-1]))
        chunks = torch.split(z, sizes, dim=1)
        parts = [t.reshape(-1, *shape) for t, shape in zip(chunks, shapes, strict=True)]
        return self._invert_stages(parts[-1], parts[:-1], iterations, tol)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` samples (n, C, H, W): prior draws through the inverse."""
        mean = self.prior_mean
        eps = torch.randn(
            n, self.num_dims, generator=generator, dtype=mean.dtype, device=mean.device
        )
        return self.inverse(mean + self.prior_log_std.exp() * eps)
