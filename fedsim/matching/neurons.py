"""Client states as matching evidence: neuron vectors per group, posterior tensors.

:class:`ClientStates` holds the state dicts of the clients being matched
together with their axis layouts (:mod:`fedsim.matching.layout`) and decides
how each tensor enters the matching:

``posterior`` (float parameters of role ``average``)
    Observed with precision ``1 / sigma2`` (the output layer's rows for class
    ``k`` with ``pi_jk / sigma2``, ``pi_jk`` the client's share of class ``k``);
    they make up the neuron vectors, and every global entry is the posterior
    mean ``(p0 mu0 + sum s x) / (p0 + sum s)`` over the clients whose units
    land on it. ``mu0`` is ``bias_prior_mean`` for tensors named ``*bias`` and
    0 otherwise, ``p0 = 1 / sigma0_2``.
``mean`` (float buffers such as BatchNorm running statistics; float
server-owned or local tensors moved by a matched group)
    Never part of a neuron vector: carried along by the assignments and
    averaged over the units that land on each global unit, weighted by the
    clients' example counts.
``first`` (integer and boolean tensors)
    Carried by the assignments, unit indices relabelled, the first client
    (in client order) that has an entry gives it.

Server-owned and local tensors that no matched group moves are passed through
from the first client that has them.

The neuron vector of unit ``u`` of group ``g`` is the concatenation, over the
axes of ``g`` (in the spec's order), of the unit's slice of each
``posterior`` tensor. Along the slice's other axes, a free index (input
pixels, kernel taps, classes) is kept, an index of a group already matched is
put in global order (entries of global units the client lacks carry zero
precision, or are observed zeros with ``missing="patch"``), and an index of
``g`` itself or of a group not matched yet is left out. The global tensors
are assembled from the same evidence by :mod:`fedsim.matching.assemble`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from fedsim.exceptions import AggregationError, ConfigError
from fedsim.matching.layout import AxisLayout, SpecLayout
from fedsim.matching.permspec import AxisRef, PermGroup, PermutationSpec, unit_indices
from fedsim.matching.pfnm import BIAS_PRIOR_MEAN

__all__ = ["BIAS_PRIOR_MEAN", "ClientStates", "Done", "Kind", "Missing"]

Kind = Literal["posterior", "mean", "first", "pass"]
Missing = Literal["zero_precision", "patch"]


F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True)
class Done:
    """A matched group: every client's assignment and the global width."""

    assignments: list[I64]
    width: int


class ClientStates:
    """The clients of one matching and how each of their tensors is treated.

    Parameters
    ----------
    states : sequence of mapping of str to Tensor
        Client state dicts (at each client's own widths).
    specs : sequence of PermutationSpec
        Each client's spec at its widths.
    class_counts : array_like (J, K) or None
        Examples per class and client: weights the output layer (PFNM) and the
        averages of carried tensors (by each client's total).
    roles : mapping of str to str
        Federated role of each tensor (missing = ``"average"``).
    buffers : collection of str
        Keys of buffers (not parameters).
    sigma2, sigma0_2 : float
        Observation and prior variances.
    bias_prior_mean : float
        Prior mean of tensors whose name ends in ``bias``.
    missing : {"zero_precision", "patch"}
        How a client observes entries of global units it lacks along an axis
        matched earlier: not at all, or as zeros (PFNM's reference code).
    """

    def __init__(
        self,
        states: Sequence[Mapping[str, torch.Tensor]],
        specs: Sequence[PermutationSpec],
        class_counts: NDArray[np.floating] | None,
        *,
        roles: Mapping[str, str],
        buffers: set[str],
        sigma2: float,
        sigma0_2: float,
        bias_prior_mean: float = BIAS_PRIOR_MEAN,
        missing: Missing = "zero_precision",
    ) -> None:
        if missing not in ("zero_precision", "patch"):
            raise ConfigError(
                f"missing={missing!r} is not one of 'zero_precision', 'patch'."
            )
        self.missing = missing
        if not states:
            raise AggregationError("no client states to match; give at least one.")
        self.keys = list(states[0])
        for j, st in enumerate(states):
            if set(st) != set(self.keys):
                extra = sorted(set(st) ^ set(self.keys))[0]
                raise AggregationError(
                    f"client {j} and client 0 differ in tensor {extra!r}; all clients "
                    "must send the same tensors."
                )
        self.dtypes = {k: states[0][k].dtype for k in self.keys}
        self.arrays: list[dict[str, np.ndarray]] = []
        for j, st in enumerate(states):
            arrs = {}
            for k in self.keys:
                a = st[k].detach().cpu().numpy()
                if st[k].is_floating_point():
                    a = a.astype(np.float64)
                    if not np.isfinite(a).all():
                        raise AggregationError(
                            f"client {j}'s tensor {k!r} contains NaN or Inf; "
                            "refusing to match."
                        )
                arrs[k] = a
            self.arrays.append(arrs)
        self.specs = list(specs)
        self.layouts = [
            SpecLayout(sp, {k: a.shape for k, a in arrs.items()})
            for sp, arrs in zip(self.specs, self.arrays, strict=True)
        ]
        self._check_layouts()
        self.roles = dict(roles)
        self.kinds = {k: self._kind(k, buffers) for k in self.keys}
        self.s = 1.0 / sigma2
        self.p0 = 1.0 / sigma0_2
        self.bias_prior_mean = bias_prior_mean
        self.n_clients = len(states)
        self._weigh(class_counts)

    # ------------------------------------------------------------- set-up
    def _check_layouts(self) -> None:
        names = self.specs[0].names()
        base = self.layouts[0]
        for j, (sp, lay) in enumerate(zip(self.specs, self.layouts, strict=True)):
            if sp.names() != names:
                raise AggregationError(
                    f"client {j}'s spec has groups {sp.names()[:4]}..., client 0's "
                    f"{names[:4]}...; all clients need the same architecture."
                )
            for key, axis_layout in base.axes.items():
                other = lay.axes.get(key)
                if other is None or _shape_of(other) != _shape_of(axis_layout):
                    raise AggregationError(
                        f"axis {key[1]} of {key[0]!r} is laid out differently at "
                        f"client {j} than at client 0; the clients' models differ "
                        "in more than their widths."
                    )
            for k, shape in base.shapes.items():
                mine = lay.shapes[k]
                for axis, (n0, n) in enumerate(zip(shape, mine, strict=True)):
                    if (k, axis) not in base.axes and n0 != n:
                        raise AggregationError(
                            f"tensor {k!r} has {n} entries along axis {axis} at "
                            f"client {j} but {n0} at client 0, and no permutation "
                            "group explains the difference."
                        )

    def _kind(self, key: str, buffers: set[str]) -> Kind:
        role = self.roles.get(key, "average")
        floating = self.dtypes[key].is_floating_point
        if role != "average":
            return "mean" if floating else "first"
        if not floating:
            return "first"
        return "mean" if key in buffers else "posterior"

    def _weigh(self, class_counts: NDArray[np.floating] | None) -> None:
        """Class shares of the output layer and client weights of averages."""
        self.head: list[str] = []
        self.shares: F64 | None = None
        self.weights = np.ones(self.n_clients)
        if class_counts is None:
            return
        counts = np.asarray(class_counts, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[0] != self.n_clients:
            raise AggregationError(
                f"class_counts has shape {counts.shape}; expected ({self.n_clients}, "
                "num_classes), one row per client."
            )
        if not (np.isfinite(counts).all() and (counts >= 0).all()):
            raise AggregationError("class_counts must be finite and non-negative.")
        total = counts.sum(0)
        # a class no client has: every client gets an equal say
        self.shares = np.where(
            total > 0, counts / np.where(total > 0, total, 1.0), 1.0 / self.n_clients
        )
        per_client = counts.sum(1)
        if (per_client > 0).all():
            self.weights = per_client
        self.head = self._find_head(counts.shape[1])

    def _find_head(self, n_classes: int) -> list[str]:
        """The output layer: the last float tensor whose unmoved axis 0 has one
        entry per class, and the tensors of the same module shaped so."""
        base = self.layouts[0]

        def fits(key: str) -> bool:
            shape = base.shapes[key]
            return (
                self.kinds[key] == "posterior"
                and len(shape) >= 1
                and shape[0] == n_classes
                and (key, 0) not in base.axes
            )

        found = [k for k in self.keys if fits(k)]
        if not found:
            return []
        module = found[-1].rpartition(".")[0]
        return [k for k in found if k.rpartition(".")[0] == module]

    def prior_mean(self, key: str) -> float:
        """Prior mean of the entries of ``key``."""
        return self.bias_prior_mean if key.rpartition(".")[2] == "bias" else 0.0

    def sizes(self, group: str) -> list[int]:
        """Every client's number of units in ``group``."""
        return [lay.sizes[group] for lay in self.layouts]

    # ------------------------------------------------------------ vectors
    def vectors(
        self, group: PermGroup, done: Mapping[str, Done]
    ) -> tuple[list[F64], list[F64], F64]:
        """Every client's neuron vectors of ``group``, their precisions, prior mean.

        Returns
        -------
        neurons : list of (L_j, D) arrays
        precisions : list of (D,) arrays
        prior_mean : (D,) array
        """
        neurons, precisions = [], []
        prior: F64 = np.zeros(0)
        for j in range(self.n_clients):
            parts_v, parts_s, parts_m = [], [], []
            for ref in group.axes:
                key = ref.tensor
                if (
                    ref.values
                    or key not in self.kinds
                    or self.kinds[key] != "posterior"
                ):
                    continue
                v, s = self._slices(j, group, ref, done)
                parts_v.append(v.reshape(len(v), -1))
                parts_s.append(s.reshape(-1))
                parts_m.append(np.full(parts_s[-1].size, self.prior_mean(key)))
            size = self.layouts[j].sizes[group.name]
            neurons.append(np.hstack(parts_v) if parts_v else np.zeros((size, 0)))
            precisions.append(np.concatenate(parts_s) if parts_s else np.zeros(0))
            prior = np.concatenate(parts_m) if parts_m else np.zeros(0)
        dims = {v.shape[1] for v in neurons}
        if len(dims) > 1:
            raise AggregationError(
                f"the clients' neuron vectors of group {group.name!r} have lengths "
                f"{sorted(dims)}; matched groups must have the same global widths."
            )
        return neurons, precisions, prior

    def _slices(
        self, j: int, group: PermGroup, ref: AxisRef, done: Mapping[str, Done]
    ) -> tuple[F64, F64]:
        """Client ``j``'s slices along ``ref`` for every unit of ``group``."""
        key = ref.tensor
        lay = self.layouts[j]
        x = self.arrays[j][key]
        size = lay.sizes[group.name]
        pos = unit_indices(ref, size, np.arange(size))
        moved = np.moveaxis(x, ref.axis, 0)[pos]
        per_unit = ref.block * ref.repeat
        moved = moved.reshape(size, per_unit, *moved.shape[1:])
        takes, puts, seens, lengths = [], [], [], []
        others = [b for b in range(x.ndim) if b != ref.axis]
        for b in others:
            axis_layout = lay.axes.get((key, b))
            if axis_layout is None:
                idx = np.arange(x.shape[b])
                takes.append(idx)
                puts.append(idx)
                seens.append(idx)
                lengths.append(x.shape[b])
            else:
                take, put, seen, n = _take_put(
                    axis_layout, group.name, done, j, patch=self.missing == "patch"
                )
                takes.append(take)
                puts.append(put)
                seens.append(seen)
                lengths.append(n)
        vec = np.zeros((size, per_unit, *lengths))
        prec = np.zeros((per_unit, *lengths))
        if others:
            whole = (slice(None), slice(None))
            put_ix: tuple[Any, ...] = np.ix_(*puts)
            take_ix: tuple[Any, ...] = np.ix_(*takes)
            vec[whole + put_ix] = moved[whole + take_ix]
            seen_ix: tuple[Any, ...] = np.ix_(*seens)
            prec[(slice(None), *seen_ix)] = self.s
        else:
            vec[:] = moved
            prec[:] = self.s
        if key in self.head and self.shares is not None:
            # axis 0 is the class axis, the first of the other axes
            prec *= self.shares[j].reshape(1, -1, *([1] * (len(lengths) - 1)))
        return vec, prec


def _shape_of(layout: AxisLayout) -> list[tuple[str | None, int, int]]:
    """What must agree between clients: segment order, blocks, free lengths."""
    return [
        (s.group, s.copy, s.block if s.group is not None else s.length)
        for s in layout.segments
    ]


def _take_put(
    layout: AxisLayout, group: str, done: Mapping[str, Done], j: int, *, patch: bool
) -> tuple[I64, I64, I64, int]:
    """Indices of one axis kept in a neuron vector of ``group`` and where they go.

    Free runs are kept in place; runs of matched groups go to their units'
    global positions; runs of ``group`` itself and of unmatched groups are
    left out. Also returns the vector positions observed: those filled, or
    with ``patch`` every position of a matched run (units the client lacks
    are observed zeros).
    """
    takes, puts, seens = [], [], []
    at = 0
    for s in layout.segments:
        if s.group is None:
            takes.append(np.arange(s.start, s.start + s.length))
            puts.append(np.arange(at, at + s.length))
            seens.append(puts[-1])
            at += s.length
        elif s.group != group and s.group in done:
            d = done[s.group]
            idx = np.arange(s.length)
            unit, b = idx // s.block, idx % s.block
            takes.append(s.start + idx)
            puts.append(at + d.assignments[j][unit] * s.block + b)
            seens.append(np.arange(at, at + d.width * s.block) if patch else puts[-1])
            at += d.width * s.block
    return _cat(takes), _cat(puts), np.sort(_cat(seens)), at


def _cat(parts: list[I64]) -> I64:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts).astype(np.int64)
