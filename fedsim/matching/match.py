"""Spec-driven PFNM: BBP-MAP matching of any architecture in the library.

:func:`match` generalises :func:`fedsim.matching.pfnm_mlp` to every model that
declares a :class:`~fedsim.matching.permspec.PermutationSpec`. It matches the
spec's groups one at a time (``order="top_down"``, PFNM's order, or
``"bottom_up"``, FedMA's) with :func:`fedsim.matching.bbp.match_units`, each
unit described by the neuron vector :class:`~fedsim.matching.neurons.ClientStates`
builds from every slice its group's axes select, and then assembles the global
state dict at the matched widths: every parameter entry is the posterior mean
of the client entries that land on it, BatchNorm running statistics and other
buffers are averaged over the units matched to each global unit (weighted by
the clients' example counts), and unit indices (``values=True`` refs) are
relabelled. On an MLP this is exactly ``pfnm_mlp`` with the same ``missing``.

Groups whose width cannot change (``width_key=None``) are only aligned (at
most ``size`` atoms); a group whose neuron vector would be empty (all its
tensors are buffers, server-owned or local) is aligned by identity.
:func:`global_model` builds the matched model through its factory and
:func:`slice_for_client` cuts one client's share back out of it (its own
widths, its units in its own order) for multi-round PFNM or FedMA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from fedsim import models
from fedsim.exceptions import AggregationError, ConfigError
from fedsim.matching.assemble import assemble
from fedsim.matching.bbp import Popularity, match_units
from fedsim.matching.layout import SpecLayout, gather_state
from fedsim.matching.neurons import ClientStates, Done, Missing
from fedsim.matching.permspec import PermutationSpec
from fedsim.matching.pfnm import BIAS_PRIOR_MEAN

__all__ = [
    "Assignments",
    "global_model",
    "match",
    "match_groups",
    "matching_order",
    "slice_for_client",
]

Order = Literal["top_down", "bottom_up"]
Assignments = dict[str, list[NDArray[np.int64]]]
"""``assignments[group][j][u]``: the global unit of client ``j``'s unit ``u``."""

State = dict[str, torch.Tensor]


def match(
    models_or_state_dicts: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
    spec: PermutationSpec | None = None,
    class_counts: ArrayLike | None = None,
    *,
    sigma2: float = 1.0,
    sigma0_2: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    seed: int = 0,
    max_growth: float | None = None,
    order: Order | Sequence[str] = "top_down",
    popularity: Popularity = "reference",
    init: Mapping[str, Sequence[ArrayLike]] | None = None,
    specs: Sequence[PermutationSpec] | None = None,
    template: torch.nn.Module | None = None,
    bias_prior_mean: float = BIAS_PRIOR_MEAN,
    missing: Missing = "zero_precision",
) -> tuple[State, Assignments]:
    """Match the hidden units of client models into one global model.

    Parameters
    ----------
    models_or_state_dicts : sequence of Module or mapping
        The clients' models, or their state dicts (then give ``spec`` or
        ``specs``, and ``template`` for the tensors' roles).
    spec : PermutationSpec or None
        The spec of every client (same widths); ignored when ``specs`` is
        given or models are passed.
    class_counts : array_like (J, K) or None
        Examples per class at each client. Weighs the output layer as PFNM
        does (client ``j``'s weights to class ``k`` have precision
        ``pi_jk / sigma2``, ``pi_jk`` its share of class ``k``; a class no
        client has counts equally for all) and the averages of buffers (by
        each client's total). The output layer is the last float parameter
        whose first axis has ``K`` entries and is not permuted, with its
        module's other such tensors. ``None``: no class weighting.
    sigma2, sigma0_2 : float
        Variance of a client's weight around its atom, and the atoms' prior
        variance (precisions ``1 / sigma2`` and ``1 / sigma0_2``).
    gamma : float
        Beta-Bernoulli mass: larger opens new global units more readily.
    iters : int
        Sweeps over the clients per group after the initial pass.
    seed : int
        Seeds the client order of the sweeps (one generator for all groups).
    max_growth : float or None
        Caps each growable group's global width at ``floor(max_growth *
        largest client width)``; must be >= 1.
    order : {"top_down", "bottom_up"} or sequence of str
        The spec's groups from the output side (PFNM) or the input side
        (FedMA), or every group name once in any order.
    popularity : {"reference", "consistent"}
        Popularity term of an existing atom (see :mod:`fedsim.matching.bbp`).
    init : mapping of group name to per-client assignments, or None
        Assignments to start from (e.g. last round's); then only the sweeps
        run for those groups.
    specs : sequence of PermutationSpec or None
        One spec per client, for clients of different widths.
    template : Module or None
        A model of the architecture (any width): which tensors are buffers and
        their federated roles. Defaults to the first model passed; without
        either, every tensor is an averaged parameter.
    bias_prior_mean : float
        Prior mean of tensors named ``*bias`` (PFNM's 0.1); other entries 0.
    missing : {"zero_precision", "patch"}
        Entries of global units a client lacks, along an axis matched earlier:
        not observed (default), or observed as zeros (PFNM's reference code,
        ``pfnm_mlp``'s default).

    Returns
    -------
    global_state : dict of str to Tensor
        The global model's state dict at the matched widths (build it with
        :func:`global_model`), in the clients' dtypes.
    assignments : dict of group name to list of ndarray
        ``assignments[g][j][u]`` is the global unit of client ``j``'s unit ``u``
        of group ``g`` (injective per client).

    Raises
    ------
    fedsim.exceptions.ConfigError
        For a bad hyperparameter, order or ``max_growth``.
    fedsim.exceptions.AggregationError
        For clients that cannot be matched (other architectures, NaN/Inf,
        a spec that does not fit, ``class_counts`` of the wrong shape).
    """
    clients = list(models_or_state_dicts)
    if not clients:
        raise AggregationError("no clients to match; give at least one.")
    states, client_specs, template = _client_inputs(clients, spec, specs, template)
    counts = None if class_counts is None else np.asarray(class_counts, float)
    data = ClientStates(
        states,
        client_specs,
        counts,
        roles=models.tensor_roles(template) if template is not None else {},
        buffers=_buffer_names(template),
        sigma2=_positive("sigma2", sigma2),
        sigma0_2=_positive("sigma0_2", sigma0_2),
        bias_prior_mean=float(bias_prior_mean),
        missing=missing,
    )
    names = matching_order(client_specs[0], order)
    done = match_groups(
        data,
        names,
        gamma=_positive("gamma", gamma),
        iters=iters,
        rng=np.random.default_rng(seed),
        max_growth=max_growth,
        popularity=popularity,
        init=init,
    )
    return assemble(data, done), {g: done[g].assignments for g in names}


def matching_order(spec: PermutationSpec, order: Order | Sequence[str]) -> list[str]:
    """The spec's group names in the order ``order`` asks for."""
    names = spec.names()
    if isinstance(order, str):
        if order == "top_down":
            return names[::-1]
        if order == "bottom_up":
            return names
        raise ConfigError(
            f"order={order!r} is not one of 'top_down', 'bottom_up' or a list of "
            "group names."
        )
    chosen = list(order)
    if sorted(chosen) != sorted(names):
        raise ConfigError(f"order {chosen} must name every group once: {names}.")
    return chosen


def match_groups(
    data: ClientStates,
    names: Sequence[str],
    *,
    gamma: float,
    iters: int,
    rng: np.random.Generator,
    max_growth: float | None = None,
    popularity: Popularity = "reference",
    init: Mapping[str, Sequence[ArrayLike]] | None = None,
    done: Mapping[str, Done] | None = None,
) -> dict[str, Done]:
    """Match the groups ``names`` in turn, after the already matched ``done``.

    Returns every matched group (``done`` included) with its assignments.
    """
    if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
        raise ConfigError(f"iters={iters!r} must be an integer >= 0.")
    if max_growth is not None and not (
        isinstance(max_growth, int | float)
        and math.isfinite(max_growth)
        and max_growth >= 1
    ):
        raise ConfigError(f"max_growth={max_growth!r} must be a number >= 1 or None.")
    out = dict(done or {})
    spec = data.specs[0]
    p0 = data.p0
    for name in names:
        group = spec.group(name)
        sizes = data.sizes(name)
        largest = max(sizes)
        fixed = group.width_key is None
        if fixed and len(set(sizes)) > 1:
            raise AggregationError(
                f"group {name!r} has a fixed width but the clients have {sizes} "
                "units; they cannot be matched."
            )
        cap = None
        if fixed:
            cap = largest
        elif max_growth is not None:
            cap = max(largest, math.floor(max_growth * largest))
        start = None if init is None else init.get(name)
        neurons, precisions, prior_mean = data.vectors(group, out)
        if neurons[0].shape[1] == 0:
            assignments = (
                [np.asarray(a, dtype=np.int64) for a in start]
                if start is not None
                else [np.arange(n, dtype=np.int64) for n in sizes]
            )
            width = 1 + max(int(a.max()) for a in assignments)
            out[name] = Done(assignments, width)
            continue
        res = match_units(
            neurons,
            precisions,
            prior_mean,
            np.full(len(prior_mean), p0),
            gamma=gamma,
            iters=int(iters),
            rng=rng,
            popularity=popularity,
            max_atoms=cap,
            init=start,
        )
        out[name] = Done(res.assignments, res.width)
    return out


def global_model(
    template_model: torch.nn.Module, global_state: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """A new model of ``template_model``'s architecture holding ``global_state``.

    The widths are read off the state's shapes and the model is built by its
    factory (:func:`fedsim.models.fit_to_state`); tensors the state lacks
    (server-owned ones left out of the matching) keep the built model's values.
    ``template_model`` itself is not changed.
    """
    model = models.fit_to_state(template_model, global_state)
    if model is template_model:
        model = copy.deepcopy(template_model)
    full = {**model.state_dict(), **global_state}
    model.load_state_dict(full, strict=True)
    return model


def slice_for_client(
    global_state: Mapping[str, torch.Tensor],
    global_spec: PermutationSpec,
    assignments: Mapping[str, Sequence[NDArray[np.int64]]],
    client: int,
) -> State:
    """Client ``client``'s own units of the global model, in its own order.

    The inverse of matching for one client: group ``g`` keeps the global units
    ``assignments[g][client]`` (so the client's unit ``u`` is global unit
    ``assignments[g][client][u]``); free axes and unmatched tensors are the
    global ones. This is the model PFNM's and FedMA's communication rounds
    send a client back (PFNM's ``build_init``, FedMA's
    ``reconstruct_local_net``).

    Parameters
    ----------
    global_state : mapping of str to Tensor
        The global state dict.
    global_spec : PermutationSpec
        The spec of the global model (``permutation_spec(global_model(...))``).
    assignments : mapping of group name to per-client arrays
        As returned by :func:`match`.
    client : int
        Which client.
    """
    layout = SpecLayout(
        global_spec, {k: tuple(v.shape) for k, v in global_state.items()}
    )
    moves = {g: np.asarray(a[client], dtype=np.int64) for g, a in assignments.items()}
    for g, a in moves.items():
        width = layout.sizes[g]
        if len(a) and (a.min() < 0 or a.max() >= width or len(set(a)) != len(a)):
            raise AggregationError(
                f"client {client}'s assignment of group {g!r} must be distinct "
                f"units in 0..{width - 1}."
            )
    own = layout.resized({g: len(a) for g, a in moves.items()})
    return gather_state(global_state, layout, own, moves)


def _client_inputs(
    clients: list[torch.nn.Module | Mapping[str, torch.Tensor]],
    spec: PermutationSpec | None,
    specs: Sequence[PermutationSpec] | None,
    template: torch.nn.Module | None,
) -> tuple[
    list[Mapping[str, torch.Tensor]], list[PermutationSpec], torch.nn.Module | None
]:
    states: list[Mapping[str, torch.Tensor]] = []
    own_specs: list[PermutationSpec] = []
    for c in clients:
        if isinstance(c, torch.nn.Module):
            states.append(c.state_dict())
            own_specs.append(models.permutation_spec(c))
            if template is None:
                template = c
        else:
            states.append(c)
    if specs is not None:
        if len(specs) != len(clients):
            raise AggregationError(
                f"got {len(specs)} specs for {len(clients)} clients; give one each."
            )
        return states, list(specs), template
    if len(own_specs) == len(clients):
        return states, own_specs, template
    if spec is None:
        raise AggregationError(
            "state dicts need their permutation spec: pass spec= (same widths) or "
            "specs= (one per client)."
        )
    return states, [spec] * len(clients), template


def _buffer_names(template: torch.nn.Module | None) -> set[str]:
    if template is None:
        return set()
    return {name for name, _ in template.named_buffers()}


def _positive(name: str, value: float) -> float:
    if not (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        raise ConfigError(f"{name}={value!r} must be a finite number > 0.")
    return float(value)
