"""The LegoNet convolution: filters assembled from a small set of shared Lego filters.

A :class:`LegoConv2d` (Yang et al., "LegoNet: Efficient Convolutional Neural
Networks with Lego Filters", ICML 2019) with ``c`` inputs, ``n`` outputs, ``o``
fragments and ``m`` Lego filters of size ``d x d`` holds

========  ===================  ====================================================
tensor    shape                role
========  ===================  ====================================================
``lego``  ``m x c/o x d x d``  Lego filters B, shared by every filter and fragment
``logits````o x n x m``        selection logits N; ``k*[i, j] = argmax_k N[i, j, k]``
``coef``  ``o x n x m``        coefficients A; only the selected entry is used
========  ===================  ====================================================

Forward is split-transform-merge: the input is split into ``o`` fragments of
``c/o`` channels, every fragment is convolved with all ``m`` Lego filters once,
and output ``j`` is ``sum_i A[i, j, k*] * L_i[k*]``, computed by gathering the
selected Lego response (``index_select``) and scaling it, so the merge costs
``o * n`` maps rather than a dense 1x1 convolution over ``o * m`` maps. The
result equals a standard convolution with the assembled filters
``F_j = concat_i(A[i, j, k*] * B[k*])``.

The selection is learned with a straight-through estimator inside the autograd
graph (so ``torch.func.grad`` sees it): the forward uses the one-hot mask ``M``
of the argmax, and the backward hands ``dL/dM`` (dense, unselected entries
included) to the logits, plus LegoNet's balance rule, which pushes every Lego
filter's usage count towards ``o * n / m``. After :meth:`LegoConv2d.freeze_masks`
the selection is read from the ``frozen_index`` buffer and the logits receive
no gradient at all. The frozen flag is read in Python, so under ``torch.vmap``
the two mask buffers must be shared by the whole cohort (``in_dims=None``),
which their server role guarantees in federated training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedsim.exceptions import ConfigError

__all__ = ["LegoConv2d", "balance_term", "lego_merge"]


def lego_merge(
    responses: torch.Tensor, index: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Merge the selected Lego responses of every fragment into the outputs.

    Parameters
    ----------
    responses : Tensor
        ``(batch, o, m, H, W)``: every fragment convolved with every Lego filter.
    index : Tensor
        ``(o, n)`` long: the selected Lego filter of each (fragment, output).
    coef : Tensor
        ``(o, n, m)``: the coefficients; only ``coef[i, j, index[i, j]]`` is used.

    Returns
    -------
    Tensor
        ``(batch, n, H, W)`` with ``out[:, j] = sum_i coef[i, j, k*] * L_i[k*]``.
    """
    batch, o, m, h, w = responses.shape
    n = index.shape[1]
    flat = index + m * torch.arange(o, device=index.device).unsqueeze(1)
    picked = responses.reshape(batch, o * m, h, w).index_select(1, flat.reshape(-1))
    scale = coef.gather(2, index.unsqueeze(2)).squeeze(2)
    return torch.einsum("bonhw,on->bnhw", picked.reshape(batch, o, n, h, w), scale)


def balance_term(
    index: torch.Tensor, num_legos: int, strength: float, dtype: torch.dtype
) -> torch.Tensor:
    """LegoNet's balance rule as an addition to the gradient of the logits.

    With ``f_k`` the number of (fragment, output) pairs that select Lego ``k``
    and ``ō = o * n / m``, column ``k`` of the logits' gradient gets
    ``+strength * (f_k - ceil(ō))`` when ``f_k > ceil(ō)`` and
    ``-strength * (floor(ō) - f_k)`` when ``f_k < floor(ō)``, so gradient descent
    lowers the logits of over-used Lego filters and raises those of rare ones.

    Parameters
    ----------
    index : Tensor
        ``(o, n)`` long selection.
    num_legos : int
        ``m``.
    strength : float
        ``lambda`` (LegoNet uses 1e-4).
    dtype : torch.dtype
        Floating dtype of the result (that of the logits).

    Returns
    -------
    Tensor
        ``(o, n, m)``, constant along the first two axes.
    """
    o, n = index.shape
    counts = _one_hot(index, num_legos).sum((0, 1))
    target = o * n / num_legos
    over = (counts - math.ceil(target)).clamp(min=0)
    under = (math.floor(target) - counts).clamp(min=0)
    column = strength * (over - under).to(dtype)
    return column.expand(o, n, num_legos)


def _one_hot(index: torch.Tensor, num_legos: int) -> torch.Tensor:
    """Long one-hot encoding along a new last axis (also under ``torch.vmap``)."""
    legos = torch.arange(num_legos, device=index.device)
    return (index.unsqueeze(-1) == legos).long()


class _StraightThroughMerge(torch.autograd.Function):
    """:func:`lego_merge` at the argmax of the logits, with a straight-through backward.

    The backward treats the forward as ``sum_i sum_k M[i, j, k] A[i, j, k] L_i[k]``
    with ``M`` the one-hot argmax mask: the logits receive ``dL/dM`` (for every
    ``k``, selected or not) plus :func:`balance_term`; the coefficients receive
    ``dL/dA = M * dL/d(MA)``, non-zero only where selected.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        responses: torch.Tensor,
        logits: torch.Tensor,
        coef: torch.Tensor,
        strength: float,
    ) -> torch.Tensor:
        return lego_merge(responses, logits.argmax(2), coef)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        responses, logits, coef, strength = inputs
        ctx.save_for_backward(responses, logits.argmax(2), coef)
        ctx.strength = strength

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        responses, index, coef = ctx.saved_tensors
        batch, o, m, h, w = responses.shape
        n = index.shape[1]
        # dL/d(M*A)[i, j, k] = <dL/dY_j, L_i[k]>, for every Lego k
        dense = torch.einsum("bnhw,bomhw->onm", grad_out, responses)
        mask = _one_hot(index, m).to(dense.dtype)
        balance = balance_term(index, m, ctx.strength, dense.dtype)
        grad_logits = coef * dense + balance
        grad_coef = mask * dense
        # each selected response receives its coefficient times dL/dY_j
        scale = (coef * mask).sum(2)
        spread = grad_out.unsqueeze(1) * scale.reshape(1, o, n, 1, 1)
        flat = index + m * torch.arange(o, device=index.device).unsqueeze(1)
        grad_responses = torch.zeros_like(responses).reshape(batch, o * m, h, w)
        grad_responses = grad_responses.index_add(
            1, flat.reshape(-1), spread.reshape(batch, o * n, h, w)
        )
        return grad_responses.reshape(responses.shape), grad_logits, grad_coef, None


class LegoConv2d(nn.Module):
    """Convolution whose filters are assembled from ``legos`` shared Lego filters.

    Parameters
    ----------
    in_channels : int
        ``c``; must be divisible by ``fragments``.
    out_channels : int
        ``n``.
    legos : int
        ``m``, the number of Lego filters.
    fragments : int
        ``o``, the number of input fragments.
    kernel : int
        ``d``, odd; padding ``d // 2`` keeps the spatial size.
    balance : float
        ``lambda`` of the balance rule (0 disables it).

    Attributes
    ----------
    frozen_index : Tensor
        Long buffer ``(o, n)``: the selection used once the masks are frozen.
    frozen : Tensor
        Bool scalar buffer: whether the masks are frozen.
    """

    frozen_index: torch.Tensor
    frozen: torch.Tensor

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        legos: int,
        fragments: int,
        kernel: int = 3,
        balance: float = 1e-4,
    ) -> None:
        super().__init__()
        for label, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("legos", legos),
            ("fragments", fragments),
        ):
            if value < 1:
                raise ConfigError(f"LegoConv2d {label} must be positive, got {value}")
        if in_channels % fragments:
            raise ConfigError(
                f"LegoConv2d in_channels={in_channels} must be divisible by "
                f"fragments={fragments}"
            )
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(
                f"LegoConv2d kernel must be odd and positive, got {kernel}"
            )
        if balance < 0:
            raise ConfigError(f"LegoConv2d balance must be >= 0, got {balance}")
        self.fragments = fragments
        self.legos = legos
        self.balance = balance
        self.padding = kernel // 2
        width = in_channels // fragments
        self.lego = nn.Parameter(torch.empty(legos, width, kernel, kernel))
        self.logits = nn.Parameter(torch.empty(fragments, out_channels, legos))
        self.coef = nn.Parameter(torch.empty(fragments, out_channels, legos))
        self.register_buffer(
            "frozen_index", torch.zeros(fragments, out_channels, dtype=torch.long)
        )
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal Lego filters, unit-normal logits, coefficients ~ N(0, 1/o)."""
        nn.init.kaiming_normal_(self.lego, nonlinearity="relu")
        nn.init.normal_(self.logits)
        nn.init.normal_(self.coef, std=self.fragments**-0.5)
        with torch.no_grad():
            self.frozen_index.copy_(self.logits.argmax(2))
            self.frozen.fill_(False)

    @property
    def is_frozen(self) -> bool:
        """Whether the selection is frozen."""
        return bool(self.frozen)

    def selection(self) -> torch.Tensor:
        """The ``(o, n)`` Lego index each (fragment, output) uses now."""
        if self.is_frozen:
            return self.frozen_index
        return self.logits.detach().argmax(2)

    @torch.no_grad()
    def freeze_masks(self, index: torch.Tensor | None = None) -> None:
        """Freeze the selection (at the current argmax unless ``index`` is given).

        Parameters
        ----------
        index : Tensor, optional
            ``(o, n)`` Lego indices in ``[0, m)`` to freeze instead.
        """
        chosen = self.logits.argmax(2) if index is None else index
        if chosen.shape != self.frozen_index.shape:
            raise ValueError(
                f"frozen index must have shape {tuple(self.frozen_index.shape)}, "
                f"got {tuple(chosen.shape)}"
            )
        if chosen.is_floating_point() or chosen.min() < 0 or chosen.max() >= self.legos:
            raise ValueError(
                f"frozen index must hold integers in [0, {self.legos}), got {chosen}"
            )
        self.frozen_index.copy_(chosen)
        self.frozen.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, h, w = x.shape
        o = self.fragments
        fragments = x.reshape(batch * o, channels // o, h, w)
        responses = nn.functional.conv2d(fragments, self.lego, padding=self.padding)
        responses = responses.reshape(batch, o, self.legos, *responses.shape[2:])
        if self.is_frozen:
            return lego_merge(responses, self.frozen_index, self.coef)
        merged: torch.Tensor = _StraightThroughMerge.apply(
            responses, self.logits, self.coef, self.balance
        )
        return merged

    def extra_repr(self) -> str:
        o, n, m = self.coef.shape
        return (
            f"in_channels={self.lego.shape[1] * o}, out_channels={n}, legos={m}, "
            f"fragments={o}, kernel={self.lego.shape[2]}, balance={self.balance}"
        )
