"""PFNM for multilayer perceptrons: one-shot matching of client MLPs.

Probabilistic Federated Neural Matching (Yurochkin et al., 2019,
arxiv.org/abs/1905.12022) as its reference code
(``IBM/probabilistic-federated-neural-matching``) does it, with its defaults:
prior mean 0 for weights and 0.1 for biases, ``sigma2`` and ``sigma0_2`` are
*variances* (precision ``1 / sigma2``), and the output weights of client ``j``
to class ``k`` are observed with precision ``pi_jk / sigma2`` where ``pi_jk``
is the client's share of the examples of class ``k``. Two departures: the
sweep order comes from ``np.random.default_rng(seed)`` (the reference draws
from the global ``np.random``), and a client wider than the global layer plus
its new-atom slots still gets a column for every unit (the reference leaves
the excess units unassigned; see :func:`fedsim.matching.bbp.match_units`).

Hidden layers are matched top-down with :func:`fedsim.matching.bbp.match_units`.
A unit of hidden layer ``c`` is the vector ``[bias, outgoing weights]``, with
its incoming weights in front for the first layer. The outgoing weights of a
layer below the last are first scattered ("patched") into the global order of
the layer above, which is already matched; entries of global units a client
does not have are observed as zeros (``missing="patch"``, the reference) or
carry zero precision (``missing="zero_precision"``). The output bias has the
closed form ``(0.1 / sigma0_2 + sum_j pi_jk b_jk / sigma2) /
(1 / sigma0_2 + sum_j pi_jk / sigma2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedsim.exceptions import AggregationError, ConfigError
from fedsim.matching.bbp import Popularity, check_match_options, match_units

__all__ = ["BIAS_PRIOR_MEAN", "PFNMResult", "pfnm_mlp", "pfnm_mlp_with_assignments"]

Missing = Literal["patch", "zero_precision"]

BIAS_PRIOR_MEAN = 0.1
"""Prior mean of every bias (the reference initialises biases to 0.1)."""

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True)
class PFNMResult:
    """A matched global MLP and how every client's units map into it.

    Attributes
    ----------
    weights : list of ndarray
        ``[W0 (L1, D), b0, W1 (L2, L1), b1, ..., W_out (K, L_C), b_out]``, the
        torch ``state_dict`` order and layout, float64.
    assignments : list of list of ndarray
        ``assignments[c][j][l]`` is the global unit of client ``j``'s unit ``l``
        in hidden layer ``c`` (0 = first hidden layer).
    widths : list of int
        Global hidden widths ``[L1, ..., L_C]``.
    """

    weights: list[F64]
    assignments: list[list[I64]]
    widths: list[int]


def pfnm_mlp(
    client_weights: Sequence[Sequence[ArrayLike]],
    class_counts: ArrayLike,
    *,
    sigma2: float = 1.0,
    sigma0_2: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    seed: int = 0,
    popularity: Popularity = "reference",
    missing: Missing = "patch",
) -> list[F64]:
    """Match client MLPs into one global MLP.

    The weights of :func:`pfnm_mlp_with_assignments`; see it for the parameters.

    Returns
    -------
    list of ndarray
        The global MLP in torch ``state_dict`` order and layout; hidden widths
        may be larger than any client's.
    """
    return pfnm_mlp_with_assignments(
        client_weights,
        class_counts,
        sigma2=sigma2,
        sigma0_2=sigma0_2,
        gamma=gamma,
        iters=iters,
        seed=seed,
        popularity=popularity,
        missing=missing,
    ).weights


def pfnm_mlp_with_assignments(
    client_weights: Sequence[Sequence[ArrayLike]],
    class_counts: ArrayLike,
    *,
    sigma2: float = 1.0,
    sigma0_2: float = 1.0,
    gamma: float = 1.0,
    iters: int = 5,
    seed: int = 0,
    popularity: Popularity = "reference",
    missing: Missing = "patch",
    init: Sequence[Sequence[ArrayLike]] | None = None,
) -> PFNMResult:
    """Match client MLPs into one global MLP and report every client's assignment.

    Parameters
    ----------
    client_weights : sequence of sequence of array_like
        ``client_weights[j]`` is client ``j``'s MLP as
        ``[W0 (h1, D), b0, W1 (h2, h1), b1, ..., W_out (K, h_C), b_out]``
        (torch ``state_dict`` order, ``weight`` is (out, in)); at least one
        hidden layer; hidden widths may differ between clients.
    class_counts : array_like, (J, K)
        Examples of each class at each client; every class needs at least one.
    sigma2 : float
        Variance of a client's weight around its atom.
    sigma0_2 : float
        Prior variance of an atom.
    gamma : float
        Beta-Bernoulli mass: larger opens new global units more readily.
    iters : int
        Sweeps over the clients per layer after the initial pass.
    seed : int
        Seeds the client order of the sweeps.
    popularity : {"reference", "consistent"}
        Popularity term of an existing unit (see :mod:`fedsim.matching.bbp`).
    missing : {"patch", "zero_precision"}
        How a client's outgoing weights to global units it does not have are
        observed when layers below the last are matched.
    init : sequence of sequence of array_like or None
        Assignments to start from (``init[c][j]`` as in
        :attr:`PFNMResult.assignments`, e.g. the previous round's); then only
        the ``iters`` sweeps run.

    Returns
    -------
    PFNMResult

    Raises
    ------
    fedsim.exceptions.AggregationError
        For client nets of inconsistent depth or shape, NaN/Inf weights,
        ``class_counts`` of the wrong shape, or a class no client has.
    fedsim.exceptions.ConfigError
        For a non-positive ``sigma2``, ``sigma0_2`` or ``gamma``, or an unknown
        option.
    """
    for name, value in (("sigma2", sigma2), ("sigma0_2", sigma0_2)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r} must be a finite number > 0.")
    check_match_options(gamma, iters, popularity)
    if missing not in ("patch", "zero_precision"):
        raise ConfigError(
            f"missing={missing!r} is not one of 'patch', 'zero_precision'."
        )
    nets = _checked_nets(client_weights)
    n_hidden = len(nets[0]) // 2 - 1
    n_in = nets[0][0].shape[1]
    share = _class_shares(class_counts, len(nets), len(nets[0][-1]))
    if init is not None and len(init) != n_hidden:
        raise AggregationError(
            f"init has {len(init)} layers of assignments; the nets have {n_hidden} "
            "hidden layers."
        )
    s_w, p0 = 1.0 / sigma2, 1.0 / sigma0_2
    rng = np.random.default_rng(seed)
    out: list[F64] = [np.empty(0)] * len(nets[0])
    assignments: list[list[I64]] = [[] for _ in range(n_hidden)]
    widths = [0] * n_hidden
    for c in reversed(range(n_hidden)):
        above = None if c == n_hidden - 1 else (assignments[c + 1], widths[c + 1])
        units, precisions = _layer_units(nets, c, share * s_w, s_w, above, missing)
        n_head = n_in if c == 0 else 0
        prior_mean = np.zeros(units[0].shape[1])
        prior_mean[n_head] = BIAS_PRIOR_MEAN
        res = match_units(
            units,
            precisions,
            prior_mean,
            np.full(len(prior_mean), p0),
            gamma=gamma,
            iters=iters,
            rng=rng,
            popularity=popularity,
            init=None if init is None else init[c],
        )
        assignments[c] = res.assignments
        widths[c] = res.width
        if c == 0:
            out[0] = res.atoms[:, :n_in]
        out[2 * c + 1] = res.atoms[:, n_head]
        out[2 * c + 2] = np.ascontiguousarray(res.atoms[:, n_head + 1 :].T)
    biases = np.stack([net[-1] for net in nets])
    out[-1] = (BIAS_PRIOR_MEAN * p0 + s_w * (share * biases).sum(0)) / (
        p0 + s_w * share.sum(0)
    )
    return PFNMResult(weights=out, assignments=assignments, widths=widths)


def _layer_units(
    nets: Sequence[Sequence[NDArray[np.floating]]],
    c: int,
    out_precision: F64,
    s_w: float,
    above: tuple[list[I64], int] | None,
    missing: Missing,
) -> tuple[list[F64], list[F64]]:
    """Every client's unit vectors of hidden layer ``c`` and their precisions.

    A unit is ``[incoming weights (first layer only), bias, outgoing weights]``.
    ``above`` is the matched layer ``c + 1`` (assignments, global width), or
    ``None`` when layer ``c`` feeds the output, whose weights to class ``k``
    have precision ``out_precision[j, k]``.
    """
    units, precisions = [], []
    for j, net in enumerate(nets):
        outgoing = net[2 * c + 2].T
        if above is None:
            out_prec = out_precision[j]
        else:
            assignment, width = above[0][j], above[1]
            outgoing, out_prec = _patched(outgoing, assignment, width, s_w, missing)
        head = [net[0]] if c == 0 else []
        parts = [*head, net[2 * c + 1][:, None], outgoing]
        units.append(np.hstack(parts, dtype=np.float64))
        n_front = units[-1].shape[1] - len(out_prec)
        precisions.append(np.concatenate([np.full(n_front, s_w), out_prec]))
    return units, precisions


def _patched(
    outgoing: NDArray[np.floating],
    assignment: I64,
    width: int,
    s_w: float,
    missing: Missing,
) -> tuple[F64, F64]:
    """Scatter a client's outgoing weights into the global order of the next layer."""
    full = np.zeros((len(outgoing), width))
    full[:, assignment] = outgoing
    if missing == "patch":
        return full, np.full(width, s_w)
    prec = np.zeros(width)
    prec[assignment] = s_w
    return full, prec


def _checked_nets(
    client_weights: Sequence[Sequence[ArrayLike]],
) -> list[list[NDArray[np.floating]]]:
    if len(client_weights) == 0:
        raise AggregationError("client_weights is empty; PFNM needs at least 1 client.")
    nets = [[np.asarray(w) for w in net] for net in client_weights]
    depth = len(nets[0])
    if depth < 4 or depth % 2:
        raise AggregationError(
            f"client 0 has {depth} arrays; an MLP with C >= 1 hidden layers has "
            "2 * (C + 1): [W0, b0, ..., W_out, b_out]."
        )
    n_in, n_out = nets[0][0].shape[-1], len(nets[0][-1])
    for j, net in enumerate(nets):
        if len(net) != depth:
            raise AggregationError(
                f"client {j} has {len(net)} arrays but client 0 has {depth}; all "
                "clients need the same number of layers."
            )
        fan_in = n_in
        for i in range(0, depth, 2):
            w, b = net[i], net[i + 1]
            last = i == depth - 2
            rows = n_out if last else (w.shape[0] if w.ndim == 2 else 0)
            if w.shape != (rows, fan_in) or b.shape != (rows,) or rows < 1:
                want = n_out if last else "h >= 1"
                raise AggregationError(
                    f"client {j}'s layer {i // 2} has weight {w.shape} and bias "
                    f"{b.shape}; expected ({want}, {fan_in}) and ({want},)."
                )
            fan_in = rows
        for i, w in enumerate(net):
            if w.dtype.kind not in "fiu":
                raise AggregationError(
                    f"client {j}'s array {i} has dtype {w.dtype}; expected real values."
                )
            if not np.isfinite(w).all():
                raise AggregationError(
                    f"client {j}'s array {i} contains NaN or Inf; refusing to match."
                )
    return nets


def _class_shares(class_counts: ArrayLike, n_clients: int, n_classes: int) -> F64:
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.shape != (n_clients, n_classes):
        raise AggregationError(
            f"class_counts has shape {counts.shape}; expected ({n_clients}, "
            f"{n_classes}) for {n_clients} clients and {n_classes} classes."
        )
    if not (np.isfinite(counts).all() and (counts >= 0).all()):
        raise AggregationError("class_counts must be finite and non-negative.")
    total = counts.sum(0)
    empty = np.flatnonzero(total == 0)
    if len(empty):
        raise AggregationError(
            f"class {int(empty[0])} has no examples at any client; every class "
            "needs at least one to weight the output layer."
        )
    return counts / total
