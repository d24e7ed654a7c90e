"""Prunable units of a model, read from its permutation spec: masking and removal.

A permutation group of a model (see :mod:`fedsim.matching.permspec`) is a set of
interchangeable hidden units. AOFP may prune group ``g`` when removing a unit
is the same as zeroing the unit's activation where the next layers read it:

* ``g`` has a ``width_key``, so the model can be rebuilt narrower;
* its first axis is the output axis of a conv or linear layer (the producer);
* every other axis is the producer's bias, a BatchNorm entry of the unit, or
  the input axis of a conv (``groups=1``) or linear layer (a consumer);
* at least one consumer exists; the first is the *follower*, whose output is
  AOFP's damage probe;
* no other layer writes the same units (a residual sum or summed NAS-Bench
  vertex ties several producers: those groups are refused) and no tensor it
  moves is server-owned or client-local, nor an index pointer.

Everything here reads specs; no model class is special-cased. Masking is done
by forward pre-hooks that multiply a consumer's input by a 0/1 vector, so the
masks are never part of a state dict; :mod:`fedsim.pruning.removal` deletes
masked units physically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.matching.permspec import AxisRef, PermGroup, unit_indices

__all__ = [
    "Consumer",
    "PrunableGroup",
    "UnitMasks",
    "prunable_groups",
    "unprunable_groups",
]


@dataclass(frozen=True)
class Consumer:
    """A conv or linear layer reading a group's units on its input axis.

    Attributes
    ----------
    module : str
        The layer's module path (``"convs.1"``).
    ref : AxisRef
        Where the units sit along the layer weight's input axis (axis 1).
    """

    module: str
    ref: AxisRef


@dataclass(frozen=True)
class PrunableGroup:
    """A permutation group AOFP can prune.

    Attributes
    ----------
    name : str
        The group's name in the spec.
    size : int
        Current number of units.
    producer : str
        Module path of the layer whose outputs the units are.
    output_ref : AxisRef
        The units along the producer's output axis.
    consumers : tuple of Consumer
        Every layer reading the units; the first is the follower.
    """

    name: str
    size: int
    producer: str
    output_ref: AxisRef
    consumers: tuple[Consumer, ...]

    @property
    def follower(self) -> Consumer:
        """The first consumer: its output is the damage probe."""
        return self.consumers[0]


def _is_layer(module: nn.Module) -> bool:
    """A linear layer or a plain (not transposed, ungrouped) convolution."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and not module.transposed
        and module.groups == 1
    )


def _width(layer: nn.Module, axis: int) -> int:
    """Output (axis 0) or input (axis 1) features of a conv or linear layer."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[axis])


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str, str]:
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), path, attr


def _classify(
    model: nn.Module, group: PermGroup, roles: Mapping[str, str]
) -> PrunableGroup | str:
    """The group as a :class:`PrunableGroup`, or why it cannot be pruned."""
    if group.width_key is None:
        return "its width is fixed by the architecture (no width_key)"
    if any(ref.values for ref in group.axes):
        return "it relabels unit indices held in a pointer tensor"
    for ref in group.axes:
        if roles.get(ref.tensor, "average") != "average":
            return f"it moves {ref.tensor!r}, which is not an averaged tensor"
    first = group.axes[0]
    producer, path, attr = _owner(model, first.tensor)
    if not (_is_layer(producer) and attr == "weight" and first.axis == 0):
        return (
            f"its producing tensor {first.tensor!r} is not the output axis of a "
            "conv or linear layer"
        )
    consumers: list[Consumer] = []
    for ref in group.axes[1:]:
        module, mpath, mattr = _owner(model, ref.tensor)
        if _is_layer(module) and mattr == "weight" and ref.axis == 1:
            consumers.append(Consumer(mpath, ref))
        elif mpath == path and mattr == "bias":
            continue
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and ref.axis == 0:
            continue
        elif _is_layer(module) and ref.axis == 0:
            return (
                f"layer {mpath!r} writes the same units as {path!r} (units tied "
                "across layers, e.g. by a residual sum)"
            )
        else:
            return (
                f"it moves axis {ref.axis} of {ref.tensor!r}, which is neither a "
                "per-unit bias or BatchNorm entry nor a layer input"
            )
    if not consumers:
        return "no conv or linear layer reads its units, so nothing measures damage"
    return PrunableGroup(group.name, group.size, path, first, tuple(consumers))


def _classify_all(model: nn.Module) -> dict[str, PrunableGroup | str]:
    roles = models.tensor_roles(model)
    return {g.name: _classify(model, g, roles) for g in models.permutation_spec(model)}


def unprunable_groups(model: nn.Module) -> dict[str, str]:
    """Every group AOFP cannot prune, with the reason in a few words."""
    return {k: v for k, v in _classify_all(model).items() if isinstance(v, str)}


def prunable_groups(
    model: nn.Module, names: Sequence[str] | None = None
) -> dict[str, PrunableGroup]:
    """The prunable groups of ``model`` in forward order (or the ``names`` asked for).

    Raises
    ------
    ConfigError
        If a name is not a group of the model, or names a group that cannot
        be pruned (the sentence says why).
    """
    found = _classify_all(model)
    if not names:
        return {k: v for k, v in found.items() if isinstance(v, PrunableGroup)}
    out: dict[str, PrunableGroup] = {}
    for name in names:
        if name not in found:
            raise ConfigError(
                f"client.pruning.layers names {name!r}, which is not a group of "
                f"this model; choose from: {', '.join(found)}"
            )
        value = found[name]
        if isinstance(value, str):
            raise ConfigError(f"group {name!r} cannot be pruned: {value}")
        out[name] = value
    return out


def _along(vector: torch.Tensor, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-feature vector to broadcast over ``x`` at ``module``'s features."""
    if isinstance(module, nn.Linear):
        return vector.to(x)
    return vector.to(x).view(1, -1, *([1] * (x.dim() - 2)))


def _zeroed(n: int, ref: AxisRef, size: int, units: np.ndarray) -> torch.Tensor:
    vec = torch.ones(n)
    if len(units):
        vec[torch.as_tensor(unit_indices(ref, size, units))] = 0.0
    return vec


class UnitMasks:
    """Live keep-masks of prunable groups, applied where their units are read.

    While :meth:`attached`, every consumer of group ``g`` sees the entries of
    its pruned units (``keep[g]`` false) as zeros. When :attr:`ablate` holds
    units of ``g``, the follower's forward hook also computes AOFP's damage
    ``t = ||Z - Z~||^2 / ||Z||^2``, where ``Z`` is the follower's output on this
    batch and ``Z~`` its output with those units zeroed as well (both restricted
    to the follower's own kept units when it produces a masked group); the value
    lands in :attr:`damage`. Nothing here changes the model's output.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    groups : mapping of str to PrunableGroup
        The groups to mask (from :func:`prunable_groups`).
    """

    def __init__(self, model: nn.Module, groups: Mapping[str, PrunableGroup]) -> None:
        self.model = model
        self.groups = dict(groups)
        self.keep = {n: np.ones(g.size, dtype=bool) for n, g in self.groups.items()}
        self.ablate: dict[str, np.ndarray] = {}
        self.damage: dict[str, float] = {}
        self._by_producer = {g.producer: n for n, g in self.groups.items()}
        self._cache: dict[str, torch.Tensor | None] = {}

    def set_keep(self, name: str, keep: np.ndarray) -> None:
        """Replace group ``name``'s keep-mask (boolean, one entry per unit)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.groups[name].size,):
            raise ValueError(
                f"the mask of group {name!r} needs {self.groups[name].size} entries"
            )
        self.keep[name] = keep
        self._cache.clear()

    def pruned(self, name: str) -> np.ndarray:
        """Indices of the masked units of group ``name``."""
        return np.flatnonzero(~self.keep[name])

    def _input_mask(self, path: str, module: nn.Module) -> torch.Tensor | None:
        if path not in self._cache:
            n = _width(module, 1)
            vec = torch.ones(n)
            for name, g in self.groups.items():
                for c in g.consumers:
                    if c.module == path:
                        vec = vec * _zeroed(n, c.ref, g.size, self.pruned(name))
            self._cache[path] = None if bool((vec == 1).all()) else vec
        return self._cache[path]

    def _output_mask(self, path: str, module: nn.Module) -> torch.Tensor | None:
        name = self._by_producer.get(path)
        if name is None or self.keep[name].all():
            return None
        g = self.groups[name]
        n = _width(module, 0)
        return _zeroed(n, g.output_ref, g.size, self.pruned(name))

    def _pre_hook(self, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            mask = self._input_mask(path, module)
            if mask is None:
                return None
            x = args[0]
            return (x * _along(mask, module, x), *args[1:])

        return hook

    def _probe(self, name: str) -> Callable[..., None]:
        g = self.groups[name]
        path = g.follower.module

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            units = self.ablate.get(name)
            if units is None or len(units) == 0:
                return
            with torch.no_grad():
                x = args[0].detach()
                n = _width(module, 1)
                drop = _zeroed(n, g.follower.ref, g.size, units)
                z = output.detach()
                z_ablated = module.forward(x * _along(drop, module, x))
                out_mask = self._output_mask(path, module)
                if out_mask is not None:
                    m = _along(out_mask, module, z)
                    z, z_ablated = z * m, z_ablated * m
                norm = z.pow(2).sum().clamp_min(torch.finfo(z.dtype).tiny)
                self.damage[name] = float((z - z_ablated).pow(2).sum() / norm)

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[UnitMasks]:
        """Install the masking and probing hooks for the ``with`` block."""
        handles = []
        paths = {c.module for g in self.groups.values() for c in g.consumers}
        try:
            for path in sorted(paths):
                module = self.model.get_submodule(path)
                handles.append(module.register_forward_pre_hook(self._pre_hook(path)))
            for name, g in self.groups.items():
                module = self.model.get_submodule(g.follower.module)
                handles.append(module.register_forward_hook(self._probe(name)))
            yield self
        finally:
            for handle in handles:
                handle.remove()
