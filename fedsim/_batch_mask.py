"""BatchNorm that ignores padded rows, for training clients of different sizes at once.

The vectorised engine pads every client's batch to one shape and marks the
padding with a per-row weight of 0. The loss already ignores those rows, but a
BatchNorm layer in training mode would mix them into its batch statistics and
running averages. :func:`mask_batchnorm` returns a copy of a model whose
BatchNorm layers read the current batch's row mask from a shared
:class:`RowMask` and compute mean, variance and running statistics over the
real rows only. With no mask set (every row real) they run PyTorch's own
BatchNorm, so full batches are computed exactly as in per-client training.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["MaskedBatchNorm", "RowMask", "mask_batchnorm"]

# The layers whose batch statistics mix rows; exactly these classes are swapped.
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class RowMask:
    """The 0/1 row weights of the batch being trained (``None``: all rows real)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    @contextlib.contextmanager
    def use(self, rows: torch.Tensor | None) -> Iterator[None]:
        """Make ``rows`` the current mask for the duration of the block."""
        self.rows = rows
        try:
            yield
        finally:
            self.rows = None


class MaskedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer whose training statistics skip rows of weight 0.

    Same parameters, buffers and state-dict keys as the layer it replaces.

    Parameters
    ----------
    layer : nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d
        The layer to copy (options, parameters and buffers).
    mask : RowMask
        Where the current batch's row weights are read from.
    """

    def __init__(self, *, layer: nn.modules.batchnorm._BatchNorm, mask: RowMask):
        super().__init__(
            layer.num_features,
            eps=layer.eps,
            momentum=layer.momentum,
            affine=layer.affine,
            track_running_stats=layer.track_running_stats,
        )
        floats = [t for t in layer.state_dict().values() if t.is_floating_point()]
        if floats:
            self.to(device=floats[0].device, dtype=floats[0].dtype)
        self.load_state_dict(layer.state_dict())
        self.train(layer.training)
        self._layer_type = type(layer)
        self._mask = mask

    def _check_input_dim(self, input: torch.Tensor) -> None:
        self._layer_type._check_input_dim(self, input)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = self._mask.rows
        if rows is None or not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        return self._masked(input, rows)

    def _masked(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        weight = rows.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        per_row = x[0, 0].numel()
        count = rows.to(x.dtype).sum() * per_row
        denom = count.clamp_min(1.0)
        mean = (x * weight).sum(dims) / denom
        centred = x - mean.reshape(shape)
        var = (centred.pow(2) * weight).sum(dims) / denom
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), count)
        return out

    @torch.no_grad()
    def _update_running(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / self.num_batches_tracked.to(mean.dtype)
        else:
            factor = torch.full_like(count, self.momentum)
        unbiased = var * (count / (count - 1).clamp_min(1.0))
        self.running_mean.mul_(1 - factor).add_(factor * mean)
        self.running_var.mul_(1 - factor).add_(factor * unbiased)


def mask_batchnorm(model: nn.Module) -> tuple[nn.Module, RowMask]:
    """A copy of ``model`` with every BatchNorm layer reading a shared row mask.

    Returns
    -------
    (nn.Module, RowMask)
        The copy (same state-dict keys; ``model`` itself is untouched) and the
        mask its BatchNorm layers read. A model without BatchNorm is copied
        unchanged.
    """
    clone = copy.deepcopy(model)
    mask = RowMask()
    swaps = [
        (name, module)
        for name, module in clone.named_modules()
        if name and type(module) in _BATCHNORMS
    ]
    for name, module in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = clone.get_submodule(parent_name)
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        setattr(parent, child, MaskedBatchNorm(layer=module, mask=mask))
    return clone, mask
