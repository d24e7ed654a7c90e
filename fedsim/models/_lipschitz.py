"""Building blocks of Lipschitz-constrained networks (Anil et al. 2019, LNets).

Gradient-norm-preserving activations:

- :func:`group_sort` sorts contiguous blocks of ``group_size`` features in
  ascending order; ``group_size=2`` turns every pair into ``(min, max)`` and
  ``group_size=n`` is a full sort.
- :func:`max_min` is LNets' ``MaxMin`` layout: pairs of neighbouring features
  give ``[all maxes ; all mins]``. It computes the same values as
  ``group_sort(x, 2)`` in another order, so weights of the two are not
  interchangeable.

Both are 1-Lipschitz in every l_p norm: their Jacobian is a permutation matrix
almost everywhere.

Norm-constrained linear maps, applied to the raw parameter inside every forward
pass, so that gradients flow through the constraint and any raw weight (for
instance an average of several clients' weights) still gives a bounded layer:

- :func:`bjorck` orthonormalises a matrix (every singular value driven to 1)
  with Björck-Bowie iterations of order 1-4; used by :class:`BjorckLinear`, a
  1-Lipschitz map in l_2.
- :func:`project_l1_rows` projects every row onto the unit l_1 ball, so the
  matrix has l_inf operator norm at most 1; used by :class:`LInfLinear`, a
  1-Lipschitz map in l_inf.

Each layer multiplies its output by a fixed ``scale``; a network of ``d``
layers with ``scale = L ** (1 / d)`` each is L-Lipschitz.
"""

from __future__ import annotations

import abc
import math
from fractions import Fraction

import torch
from torch import nn

__all__ = [
    "BjorckLinear",
    "LInfLinear",
    "bjorck",
    "bjorck_coefficients",
    "group_sort",
    "max_min",
    "project_l1_rows",
]

BJORCK_ORDERS = (1, 2, 3, 4)


def group_sort(x: torch.Tensor, group_size: int, dim: int = -1) -> torch.Tensor:
    """Sort contiguous blocks of ``group_size`` entries of ``x`` along ``dim``.

    Parameters
    ----------
    x : Tensor
        Any shape; ``x.shape[dim]`` must be a multiple of ``group_size``.
    group_size : int
        Entries per block (2 = pairwise (min, max); ``x.shape[dim]`` = full sort).
    dim : int
        The feature axis (channels for a conv feature map).

    Returns
    -------
    Tensor
        Same shape; every block sorted in ascending order.
    """
    n = x.shape[dim]
    if group_size < 1 or n % group_size:
        raise ValueError(
            f"group_size {group_size} must be a positive divisor of the "
            f"feature size {n}"
        )
    moved = x.movedim(dim, -1)
    blocks = moved.reshape(*moved.shape[:-1], n // group_size, group_size)
    return blocks.sort(dim=-1).values.reshape(moved.shape).movedim(-1, dim)


def max_min(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """LNets' MaxMin: pair ``(2i, 2i+1)`` puts its max at ``i``, min at ``n/2 + i``.

    Parameters
    ----------
    x : Tensor
        Any shape with an even ``x.shape[dim]``.
    dim : int
        The feature axis.

    Returns
    -------
    Tensor
        Same shape: the ``n/2`` pairwise maxima, then the ``n/2`` minima.
    """
    n = x.shape[dim]
    if n % 2:
        raise ValueError(f"max_min needs an even feature size, got {n}")
    moved = x.movedim(dim, -1)
    pairs = moved.reshape(*moved.shape[:-1], n // 2, 2)
    both = torch.cat([pairs.amax(dim=-1), pairs.amin(dim=-1)], dim=-1)
    return both.movedim(-1, dim)


def bjorck_coefficients(order: int) -> tuple[float, ...]:
    """Coefficients ``c_0..c_order`` of one Björck step ``A <- A sum_k c_k (A^T A)^k``.

    The step truncates the Taylor series of ``(A^T A)^(-1/2)`` around the
    identity after ``order`` terms: with ``z = 1 - q``,
    ``q^(-1/2) = sum_j binom(2j, j) / 4^j z^j``, expanded back in powers of ``q``.
    Order 1 gives ``(3/2, -1/2)``, the classic Björck-Bowie step with beta 0.5.

    Parameters
    ----------
    order : int
        One of 1, 2, 3, 4.
    """
    if order not in BJORCK_ORDERS:
        raise ValueError(f"Björck order {order!r} is not one of {BJORCK_ORDERS}")
    taylor = [Fraction(math.comb(2 * j, j), 4**j) for j in range(order + 1)]
    coeffs = [
        (-1) ** k * sum(taylor[j] * math.comb(j, k) for j in range(k, order + 1))
        for k in range(order + 1)
    ]
    return tuple(float(c) for c in coeffs)


def bjorck(
    weight: torch.Tensor,
    *,
    iters: int = 20,
    order: int = 1,
    safe_scaling: bool = True,
) -> torch.Tensor:
    """Drive every singular value of ``weight`` towards 1 (differentiably).

    Each step maps a singular value ``s`` to ``s * sum_k c_k s^(2k)`` with the
    coefficients of :func:`bjorck_coefficients`; singular vectors are kept. On
    ``[0, 1]`` every order maps into ``[0, 1]`` (a truncated series of positive
    terms stays below ``s^-1``), and order 1 maps all of ``[0, sqrt 3]`` into
    ``[0, 1]``, so an incomplete iteration lowers the layer's expressivity but
    never its Lipschitz bound. Above those ranges the iteration diverges.

    Parameters
    ----------
    weight : Tensor
        Shape (out, in). A wide matrix converges to orthonormal rows
        (``W W^T = I``), a tall one to orthonormal columns.
    iters : int
        Number of steps (>= 0).
    order : int
        Series order, 1-4; higher orders converge in fewer, dearer steps.
    safe_scaling : bool
        Divide by the Frobenius norm first. It bounds the largest singular
        value, so the result has every singular value at most 1 whatever the
        raw weight, at the price of more steps for well-conditioned weights.
        (LNets divides by ``sqrt(out * in)`` instead, which is only safe while
        every entry is at most 1 in magnitude.)

    Returns
    -------
    Tensor
        Same shape and dtype.
    """
    if iters < 0:
        raise ValueError(f"Björck iterations must be >= 0, got {iters}")
    coeffs = bjorck_coefficients(order)
    a = weight
    if safe_scaling:
        a = a / torch.linalg.matrix_norm(a).clamp_min(torch.finfo(a.dtype).tiny)
    wide = a.shape[-2] <= a.shape[-1]
    for _ in range(iters):
        gram = a @ a.mT if wide else a.mT @ a
        # Horner's rule on p(G) A = c_0 A + G (c_1 A + G (c_2 A + ...))
        acc = coeffs[-1] * a
        for c in reversed(coeffs[:-1]):
            acc = c * a + (gram @ acc if wide else acc @ gram)
        a = acc
    return a


def project_l1_rows(weight: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Euclidean projection of every row of ``weight`` onto the l_1 ball.

    Rows already inside the ball are returned unchanged (the threshold is
    clipped at 0), so the map is a true projection: idempotent and the identity
    on the ball. LNets leaves the threshold unclipped, which instead pushes
    every row out to l_1 norm exactly ``radius``. Rows outside get
    ``sign(w) * max(|w| - tau, 0)`` with Condat's threshold: sort ``|w|``
    decreasing with cumulative sums ``S_k``; ``tau = (S_k - radius) / k`` for
    the largest ``k`` with ``S_k - radius < k |w|_(k)``.

    Parameters
    ----------
    weight : Tensor
        Shape (..., n); every row is projected independently.
    radius : float
        Ball radius (> 0).

    Returns
    -------
    Tensor
        Same shape; every row has l_1 norm at most ``radius``.
    """
    if radius <= 0:
        raise ValueError(f"l1 ball radius must be positive, got {radius}")
    mags = weight.abs()
    ordered = mags.sort(dim=-1, descending=True).values
    excess = ordered.cumsum(dim=-1) - radius
    k = torch.arange(1, weight.shape[-1] + 1, dtype=weight.dtype, device=weight.device)
    # the condition holds exactly for a prefix k = 1..rho (and always for k = 1)
    rho = (excess < k * ordered).sum(dim=-1, keepdim=True)
    tau = excess.gather(-1, rho - 1) / rho.to(weight.dtype)
    return weight.sign() * (mags - tau.clamp_min(0)).clamp_min(0)


class _ConstrainedLinear(nn.Module, abc.ABC):
    """Linear layer ``y = scale * x W_c^T + b``, ``W_c`` the constrained raw weight."""

    def __init__(
        self, *, in_features: int, out_features: int, scale: float = 1.0
    ) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"layer scale must be positive, got {scale}")
        self.in_features = in_features
        self.out_features = out_features
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @abc.abstractmethod
    def constrained_weight(self) -> torch.Tensor:
        """The weight actually applied (before ``scale``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(
            x, self.scale * self.constrained_weight(), self.bias
        )

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scale={self.scale:g}"


class BjorckLinear(_ConstrainedLinear):
    """Linear layer whose weight is Björck-orthonormalised in every forward pass.

    Operator norm in l_2 is at most ``scale``. The raw weight starts orthogonal
    (gain 1), where the orthonormalisation is already converged.

    Parameters
    ----------
    in_features, out_features : int
        Sizes.
    scale : float
        Output multiplier (the layer's share of the network's Lipschitz constant).
    iters, order, safe_scaling
        Passed to :func:`bjorck`.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        scale: float = 1.0,
        iters: int = 20,
        order: int = 1,
        safe_scaling: bool = True,
    ) -> None:
        super().__init__(
            in_features=in_features, out_features=out_features, scale=scale
        )
        bjorck_coefficients(order)  # validate early
        if iters < 0:
            raise ValueError(f"Björck iterations must be >= 0, got {iters}")
        self.iters = iters
        self.order = order
        self.safe_scaling = safe_scaling
        nn.init.orthogonal_(self.weight)

    def constrained_weight(self) -> torch.Tensor:
        return bjorck(
            self.weight,
            iters=self.iters,
            order=self.order,
            safe_scaling=self.safe_scaling,
        )


class LInfLinear(_ConstrainedLinear):
    """Linear layer whose rows are projected onto the unit l_1 ball in every forward.

    Operator norm from l_inf to l_inf is at most ``scale``. The raw weight starts
    like :class:`torch.nn.Linear`'s, uniform in ``+-1/sqrt(in_features)``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes.
    scale : float
        Output multiplier (the layer's share of the network's Lipschitz constant).
    """

    def __init__(
        self, *, in_features: int, out_features: int, scale: float = 1.0
    ) -> None:
        super().__init__(
            in_features=in_features, out_features=out_features, scale=scale
        )
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def constrained_weight(self) -> torch.Tensor:
        return project_l1_rows(self.weight)
