"""FLOPs of a model's convolution and linear layers, counted on one forward pass.

fedsim counts a FLOP as one multiply-accumulate of a ``Conv1d``/``Conv2d``/
``Conv3d`` or ``Linear`` layer (the convention of the pruning literature,
AOFP's included); additions of biases, normalisation, activations and pooling
are left out. Layers are found by forward hooks, so only layers the forward
pass really runs are counted, once per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["count_flops", "layer_flops"]


def layer_flops(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of ``module`` that produced ``output``.

    Parameters
    ----------
    module : torch.nn.Module
        A convolution (not transposed) or a ``Linear`` layer.
    output : torch.Tensor
        Its output for a batch of one example.

    Returns
    -------
    int
        ``output elements * inputs per output element``; 0 for other modules.
    """
    if isinstance(module, nn.Linear):
        return int(output.numel()) * module.in_features
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return int(output.numel()) * per_output
    return 0


def _example(model: nn.Module, input_shape: Sequence[int] | None) -> Any:
    make = getattr(model, "example_input", None)
    if make is not None:
        return make(1, torch.Generator().manual_seed(0))
    if input_shape is None:
        kwargs = getattr(model, "fedsim_kwargs", {})
        if "input_shape" not in kwargs:
            raise ValueError(
                "count_flops needs input_shape for a model not built by "
                "fedsim.models.build"
            )
        input_shape = kwargs["input_shape"]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.zeros(1, *[int(v) for v in input_shape], dtype=dtype, device=device)


def count_flops(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
    """Multiply-accumulates of the conv and linear layers for one example.

    Parameters
    ----------
    model : torch.nn.Module
        The network; its train/eval mode and state are left as they were.
    input_shape : sequence of int, optional
        (C, H, W) of one example; defaults to the ``input_shape`` the model was
        built with. Models with an ``example_input`` method use that instead.

    Returns
    -------
    int
        The total over every conv/linear call of one forward pass.
    """
    x = _example(model, input_shape)
    total = 0

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += layer_flops(module, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(x, tuple):
                model(*x)
            else:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total
