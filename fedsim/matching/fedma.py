"""FedMA's layer steps: match one group, freeze it, patch the clients.

Federated Matched Averaging (Wang et al., 2020, arXiv:2002.06440) builds the
global model bottom-up, one layer at a time: the server matches layer ``l``
of the clients' current models (neuron vectors of incoming weights, the layers
below already global), each client replaces its layer ``l`` by the matched
global one, permuting and zero-padding what consumes it to the global order
(``block_patching``), and retrains the layers above with layer ``l`` frozen.
The last layer is not matched but averaged per class.

fedsim does this for any architecture through its permutation spec: a
"layer" is a permutation group, matched with the same BBP-MAP score as PFNM
(:func:`fedsim.matching.match.match_groups`); the tensors a step freezes are
those whose every permuted axis belongs to a group matched so far
(:func:`frozen_keys`). The functions here are the pure server and client
halves of one step; ``strategies/fedma.py`` and ``clients/fedma.py`` carry
them over Flower messages.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from fedsim.matching.assemble import assemble
from fedsim.matching.bbp import Popularity
from fedsim.matching.layout import SpecLayout, scatter_state
from fedsim.matching.match import match_groups
from fedsim.matching.neurons import ClientStates, Done
from fedsim.matching.permspec import PermutationSpec

__all__ = [
    "ACTION_LAYER",
    "ACTION_LOCAL",
    "ASSIGN_RECORD",
    "LayerMatch",
    "average_rest",
    "frozen_keys",
    "match_layer",
    "patch_client",
]

# The messages of a FedMA round (``strategies/fedma.py`` <-> ``clients/fedma.py``)
ACTION_LOCAL = "fedma_local"
"""Message type ``train.fedma_local``: phase 0, local training of the whole model."""
ACTION_LAYER = "fedma_layer"
"""Message type ``train.fedma_layer``: one matched group, then retraining."""
ASSIGN_RECORD = "fedma.assign"
"""Array record of a client's assignments (``group -> int64 array``)."""

State = dict[str, torch.Tensor]
I64 = NDArray[np.int64]


def frozen_keys(
    spec: PermutationSpec,
    shapes: Mapping[str, tuple[int, ...]],
    done: Collection[str],
    head: Collection[str] = (),
) -> list[str]:
    """Tensors whose every permuted axis belongs to a group in ``done``.

    The output layer (``head``) and tensors no group moves are never frozen:
    they train to the end and are averaged.
    """
    layout = SpecLayout(spec, shapes)
    out = []
    for key in shapes:
        groups = layout.groups_of(key)
        if groups and groups <= set(done) and key not in head:
            out.append(key)
    return out


@dataclass(frozen=True)
class LayerMatch:
    """One FedMA step's result.

    Attributes
    ----------
    group : str
        The group matched.
    assignments : list of ndarray
        Client ``j``'s unit ``u`` -> global unit.
    width : int
        The group's global width.
    frozen : dict of str to Tensor
        The global values of the tensors this step freezes.
    head : list of str
        The output layer's tensors (never frozen, averaged at the end).
    """

    group: str
    assignments: list[I64]
    width: int
    frozen: State
    head: list[str]


def match_layer(
    states: Sequence[Mapping[str, torch.Tensor]],
    specs: Sequence[PermutationSpec],
    group: str,
    done_widths: Mapping[str, int],
    class_counts: NDArray[np.floating] | None,
    *,
    roles: Mapping[str, str],
    buffers: set[str],
    sigma2: float,
    sigma0_2: float,
    gamma: float,
    iters: int,
    rng: np.random.Generator,
    max_growth: float | None = None,
    popularity: Popularity = "reference",
) -> LayerMatch:
    """Match ``group`` across clients whose groups ``done_widths`` are global.

    The clients' states already hold the groups matched before in global
    order and at global width (every client has every global unit there, as
    after :func:`patch_client`), so those axes enter the neuron vectors as
    they are; groups not matched yet are left out of them.

    Parameters
    ----------
    states, specs : sequences
        The clients' current states and specs.
    group : str
        The group to match now.
    done_widths : mapping of str to int
        Groups matched in earlier steps and their global widths.
    class_counts : (J, K) array or None
        As for :func:`fedsim.matching.match.match`.
    roles, buffers, sigma2, sigma0_2, gamma, iters, rng, max_growth, popularity
        As for :func:`fedsim.matching.match.match`.
    """
    data = ClientStates(
        states,
        specs,
        class_counts,
        roles=roles,
        buffers=buffers,
        sigma2=sigma2,
        sigma0_2=sigma0_2,
    )
    n = data.n_clients
    done = {
        name: Done([np.arange(w, dtype=np.int64) for _ in range(n)], int(w))
        for name, w in done_widths.items()
    }
    matched = match_groups(
        data,
        [group],
        gamma=gamma,
        iters=iters,
        rng=rng,
        max_growth=max_growth,
        popularity=popularity,
        done=done,
    )
    before = set(done)
    shapes = data.layouts[0].shapes
    now = frozen_keys(specs[0], shapes, before | {group}, data.head)
    new = [k for k in now if not data.layouts[0].groups_of(k) <= before]
    result = matched[group]
    return LayerMatch(
        group, result.assignments, result.width, assemble(data, matched, new), data.head
    )


def patch_client(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    group: str,
    assignment: I64,
    width: int,
    frozen: Mapping[str, torch.Tensor],
) -> State:
    """A client's state after one FedMA step (``block_patching``).

    Group ``group`` is put in global order at the global width: the client's
    unit ``u`` moves to global unit ``assignment[u]``, units it lacks are zero
    (``-1`` in unit-index tensors), and the step's frozen tensors are
    overwritten by their global values.

    Parameters
    ----------
    state : mapping of str to Tensor
        The client's current state.
    spec : PermutationSpec
        Its spec (at its current widths).
    group : str
        The group the step matched.
    assignment : int array
        This client's assignment for it.
    width : int
        The group's global width.
    frozen : mapping of str to Tensor
        The step's frozen global tensors (:attr:`LayerMatch.frozen`).
    """
    layout = SpecLayout(spec, {k: tuple(v.shape) for k, v in state.items()})
    target = layout.resized({group: int(width)})
    out = scatter_state(state, layout, target, {group: np.asarray(assignment)})
    for key, value in frozen.items():
        if key in out:
            out[key] = value.to(dtype=out[key].dtype, device=out[key].device)
    return out


def average_rest(
    states: Sequence[Mapping[str, torch.Tensor]],
    specs: Sequence[PermutationSpec],
    keys: Sequence[str],
    class_counts: NDArray[np.floating] | None,
) -> State:
    """FedMA's last step: the tensors ``keys`` averaged over the clients.

    The output layer's rows for class ``k`` are weighted by the clients'
    shares ``n_jk / n_k`` of that class; every other tensor by the clients'
    example counts. All clients must have the same shapes for ``keys``.
    """
    data = ClientStates(
        [{k: s[k] for k in keys} for s in states],
        specs,
        class_counts,
        roles={},
        buffers=set(),
        sigma2=1.0,
        sigma0_2=1.0,
    )
    out: State = {}
    for key in keys:
        stack = np.stack([arrs[key] for arrs in data.arrays])
        if not states[0][key].is_floating_point():
            value = stack[0]
        elif key in data.head and data.shares is not None:
            w = data.shares.reshape(*data.shares.shape, *([1] * (stack.ndim - 2)))
            value = (w * stack).sum(0)
        else:
            w = data.weights / data.weights.sum()
            value = np.tensordot(w, stack, axes=1)
        out[key] = torch.from_numpy(np.array(value, order="C")).to(data.dtypes[key])
    return out
