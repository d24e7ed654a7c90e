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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec
from fedsim.models import MODELS, Role
from fedsim.models._iresnet_layers import (
    ESTIMATORS,
    Estimator,
    InvertibleBlock,
    SpectralNormConv2d,
    squeeze,
    unsqueeze,
)

__all__ = ["IResNet", "IResNetFlow", "bits_per_dim", "iresnet", "iresnet_flow"]

BlockStep = Callable[[InvertibleBlock, torch.Tensor], torch.Tensor]


def bits_per_dim(
    log_prob: torch.Tensor, num_dims: int, *, levels: int = 256
) -> torch.Tensor:
    """Bits per dimension of ``levels``-valued data from a continuous density.

    ``log_prob`` (nats per example) is the density of the dequantised data
    ``(x + U) / levels`` (shifted or not), so the discrete likelihood is about
    ``p * levels^-D`` and ``bpd = -log p / (D ln 2) + log2(levels)``.
    """
    return -log_prob / (num_dims * math.log(2.0)) + math.log2(levels)


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


class _InvertibleNet(nn.Module):
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


class IResNet(_InvertibleNet):
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


class IResNetFlow(_InvertibleNet):
    """Multi-scale invertible-ResNet density model with a learned diagonal prior.

    ``forward(x)`` returns ``log p(x)`` in nats per example, shape (B,), so a
    density task trains on ``-forward(x)`` and the registry-wide checks see a
    batch that depends on every parameter (the latent alone would not reach
    the prior). ``x`` is continuous: dequantisation (e.g.
    ``(x + U) / 256 - 0.5``) is the task's job; :func:`bits_per_dim` converts.
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
        """Probes from ``seed``: the same in eval mode, fresh per training step."""
        if self.training:
            self._draws += 1
        gen = torch.Generator(device=device)
        return gen.manual_seed(
            (self.seed << 32) + (self._draws if self.training else 0)
        )

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
