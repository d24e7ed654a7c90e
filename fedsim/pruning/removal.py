"""Physical removal of pruned units: the model rebuilt narrower, its state shrunk.

Units are removed group by group with
:func:`~fedsim.matching.permspec.select_units` on every tensor axis the group's
spec lists (conv rows, BatchNorm entries and running statistics, the next
layers' input columns), and the model is rebuilt at the new widths by its own
factory (:func:`fedsim.models.rebuild_kwargs`, :func:`fedsim.models.build`).
The spec is read again after each group, so groups whose axes sit at offsets
that depend on other groups (concatenations) stay consistent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fedsim import models
from fedsim.matching.permspec import PermutationSpec, select_units

__all__ = ["remove_units"]

Tensors = dict[str, torch.Tensor]


def remove_units(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    keep: Mapping[str, Sequence[int] | np.ndarray],
    *,
    on_select: Callable[[PermutationSpec, str, np.ndarray], None] | None = None,
) -> tuple[nn.Module, Tensors]:
    """Delete units physically: the model rebuilt narrower, and the state shrunk.

    Parameters
    ----------
    model : torch.nn.Module
        A model built by :func:`fedsim.models.build`, at the widths of ``state``.
    state : mapping of str to Tensor
        Its state dict, or the part of it that the groups move (the averaged
        tensors a strategy holds).
    keep : mapping of group name to unit indices
        Units to keep per group (in ascending order); groups not named keep all.
    on_select : callable, optional
        ``on_select(spec, group, keep)`` after each group shrinks, with the spec
        before the change (to shrink other state-dict-shaped tensors alike).

    Returns
    -------
    (torch.nn.Module, dict)
        The narrower model (freshly initialised, then loaded with the state if
        the state is complete) and the shrunk state.
    """
    current = model
    out = dict(state)
    name: str = model.fedsim_name  # type: ignore[assignment]
    like = next(model.parameters())
    for group in models.permutation_spec(model).names():
        if group not in keep:
            continue
        spec = models.permutation_spec(current)
        units = np.sort(np.asarray(keep[group], dtype=np.int64))
        if len(units) == spec.group(group).size:
            continue
        if len(units) == 0:
            raise ValueError(f"cannot remove every unit of group {group!r}")
        out = select_units(out, spec, group, units)
        if on_select is not None:
            on_select(spec, group, units)
        kwargs = models.rebuild_kwargs(
            current.fedsim_kwargs,  # type: ignore[arg-type]
            spec,
            {group: len(units)},
        )
        with torch.random.fork_rng(devices=[]):
            current = models.build(name, **kwargs).to(like.device, like.dtype)
    if current is not model and set(current.state_dict()) <= set(out):
        current.load_state_dict(out, strict=True)
    return current, out
