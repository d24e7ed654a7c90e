"""Model library: every architecture registered by name and width-parametric.

``fedsim.models.build(name, **kwargs)`` builds a model; each model module
registers its factories with :data:`MODELS` at import time. Every model declares
its hidden-unit symmetries through a ``permutation_spec()`` method (see
:mod:`fedsim.matching.permspec`), which :func:`permutation_spec` returns.

Factories take keyword-only arguments; ``input_shape`` (C, H, W) and
``num_classes`` come from the dataset, the rest from ``configs/model/<name>.yaml``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any, Literal

import torch

from fedsim.matching.permspec import PermutationSpec
from fedsim.registry import Registry

__all__ = [
    "MODELS",
    "Role",
    "build",
    "fit_to_state",
    "infer_widths",
    "names",
    "permutation_spec",
    "rebuild_kwargs",
    "tensor_roles",
]

MODELS: Registry[torch.nn.Module] = Registry("model")

Role = Literal["average", "server", "local"]
"""How federated training treats one state-dict tensor.

``average``
    Sent to the clients and aggregated by the strategy (the default).
``server``
    Owned by the server: broadcast with the model, never aggregated; clients'
    copies are ignored (selective-conv gates and pointers, frozen LegoNet masks,
    spectral-norm power-iteration vectors). The model may update it in
    ``server_update``.
``local``
    Owned by each client: never sent, never overwritten by the server (e.g. GEN
    node positions when they are client-local).
"""


@functools.cache
def _load_all() -> None:
    """Import every model module once, for its registrations."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def build(name: str, **kwargs: Any) -> torch.nn.Module:
    """Build the registered model ``name``.

    The model remembers how it was built (``model.fedsim_name`` and
    ``model.fedsim_kwargs``) so that matching can rebuild it at other widths.

    Raises
    ------
    fedsim.exceptions.ConfigError
        For an unknown name or an option the model does not have.
    """
    _load_all()
    model = MODELS.build(name, **kwargs)
    bound = inspect.signature(MODELS.get(name)).bind(**kwargs)
    bound.apply_defaults()
    # plain attributes (not buffers): how to build this model again
    object.__setattr__(model, "fedsim_name", name)
    object.__setattr__(model, "fedsim_kwargs", _plain(dict(bound.arguments)))
    return model


def _plain(value: Any) -> Any:
    """Deep copy with tuples turned into lists, so widths can be edited in place."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def names() -> list[str]:
    """Names of every registered model."""
    _load_all()
    return MODELS.names()


def permutation_spec(model: torch.nn.Module) -> PermutationSpec:
    """The permutation spec the model declares for itself."""
    declare = getattr(model, "permutation_spec", None)
    if declare is None:
        raise TypeError(f"{type(model).__name__} declares no permutation_spec()")
    spec = declare()
    if not isinstance(spec, PermutationSpec):
        raise TypeError(
            f"{type(model).__name__}.permutation_spec() must return a PermutationSpec"
        )
    return spec


def rebuild_kwargs(
    kwargs: dict[str, Any], spec: PermutationSpec, widths: dict[str, int]
) -> dict[str, Any]:
    """Build kwargs for the same model with some groups at new widths.

    Parameters
    ----------
    kwargs : dict
        The kwargs the model was built with (``model.fedsim_kwargs``).
    spec : PermutationSpec
        The model's spec; each group's ``width_key`` says where its width lives.
    widths : dict of str to int
        New sizes (in units) by group name.

    Raises
    ------
    ValueError
        If a group with a fixed width (``width_key=None``) is asked to change.
    """
    out = _plain(kwargs)
    for name, units in widths.items():
        group = spec.group(name)
        if units == group.size:
            continue
        if group.width_key is None:
            raise ValueError(f"group {name!r} has a fixed width of {group.size} units")
        *path, last = group.width_key.split(".")
        node: Any = out
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        value = units * group.width_scale
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def tensor_roles(model: torch.nn.Module) -> dict[str, Role]:
    """The federated role of every state-dict tensor of ``model``.

    Models declare the tensors that are not plainly averaged through an optional
    ``tensor_roles()`` method returning ``{state_dict_key: role}``; every other
    tensor is ``"average"``.
    """
    declared = getattr(model, "tensor_roles", None)
    special: dict[str, Role] = dict(declared()) if declared is not None else {}
    keys = model.state_dict().keys()
    unknown = sorted(set(special) - set(keys))
    if unknown:
        raise ValueError(
            f"{type(model).__name__}.tensor_roles() names no tensor {unknown[0]!r}"
        )
    return {k: special.get(k, "average") for k in keys}


def infer_widths(
    spec: PermutationSpec,
    state: Mapping[str, torch.Tensor],
    template: Mapping[str, torch.Tensor],
) -> dict[str, int]:
    """Group widths implied by the tensor shapes of ``state``.

    ``spec`` and ``template`` are the spec and state dict of an instance of the
    same architecture. Each group's width is read off its producing axis (its
    first ``AxisRef``), whose non-group part has the same length at any width.
    A group whose producing tensor ``state`` lacks (a client-local tensor the
    server never sees, such as GEN's node positions) keeps the template's width.
    """
    widths: dict[str, int] = {}
    for group in spec:
        ref = group.axes[0]
        if ref.tensor not in state:
            widths[group.name] = group.size
            continue
        per_unit = ref.block * ref.repeat
        length = int(state[ref.tensor].shape[ref.axis])
        other = int(template[ref.tensor].shape[ref.axis]) - group.size * per_unit
        # earlier groups sharing this axis (a residual stream's older slices)
        # may have changed width too; groups are listed in forward order
        for earlier in spec:
            if earlier is group:
                break
            for r in earlier.axes:
                if r.tensor == ref.tensor and r.axis == ref.axis and not r.values:
                    other += (widths[earlier.name] - earlier.size) * r.block * r.repeat
                    break
        if length <= other or (length - other) % per_unit:
            raise ValueError(
                f"tensor {ref.tensor!r} has {length} entries along axis {ref.axis}, "
                f"not a whole number of {per_unit}-wide units of group {group.name!r}"
            )
        widths[group.name] = (length - other) // per_unit
    return widths


def fit_to_state(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """``model`` if ``state`` fits its shapes, else the architecture rebuilt to fit.

    Used wherever a model arrives at other widths than the local template
    (matched global models, pruned clients): the widths are inferred from the
    shapes through the permutation spec and the model is rebuilt by its factory.
    """
    own = model.state_dict()
    if all(k in own and own[k].shape == v.shape for k, v in state.items()):
        return model
    spec = permutation_spec(model)
    widths = infer_widths(spec, state, own)
    name: str = model.fedsim_name  # type: ignore[assignment]
    kwargs = rebuild_kwargs(model.fedsim_kwargs, spec, widths)  # type: ignore[arg-type]
    rebuilt = build(name, **kwargs)
    device = next(iter(own.values())).device if own else torch.device("cpu")
    return rebuilt.to(device)
