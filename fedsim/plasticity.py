"""Weight plasticity across rounds: Fisher estimates and quadratic penalties.

WPL (Benyahia et al., "Overcoming Multi-Model Forgetting", ICML 2019,
arXiv:1902.08232) keeps a model's important weights close to where earlier
models needed them, weighting each squared change by the diagonal Fisher
information. In federated training fedsim uses it across rounds: client ``k``
minimises

    L_k(w) + alpha * sum_i F_i * (w_i - w*_i)^2

where ``w*`` is the global model the client received and ``F`` the aggregated
diagonal Fisher of earlier rounds, kept by the server apart from ``alpha``
(decayed by ``decay`` per round and normalised to mean one, so that ``alpha``
keeps one meaning as training changes the gradients' scale).

**Convention.** The penalty has no 1/2: its gradient is ``2 * alpha * F * (w -
w*)``. FedProx's ``(mu / 2) * ||w - w*||^2`` is the case ``F = 1``,
``alpha = mu / 2``.

FedCurv (Shoham et al., "Overcoming Forgetting in Federated Learning on
Non-IID Data", 2019, arXiv:1910.07796) anchors client ``k`` at every other
client's previous local model instead: ``lam * sum_{j != k} sum_i F_j,i (w_i -
w_j,i)^2``. Expanded, it needs only the sums ``U = sum_j F_j``, ``V = sum_j F_j
* w_j`` and the constant ``c = sum_j sum_i F_j,i w_j,i^2``, less client k's own
share (:class:`CurvatureSums`).

The Fisher estimate is the empirical one: the mean over examples of the
squared per-example gradient of the task loss, in eval mode (BatchNorm uses
its running statistics, so every example's gradient is its own), computed
batched with ``torch.func.vmap`` over ``torch.func.grad``. Only trainable
parameters whose federated role is ``average`` get one: BatchNorm statistics,
masks, server-owned and client-local tensors are never penalised. A Fisher
estimate is a state-dict-shaped dict, so
:func:`~fedsim.matching.permspec.permute_state_dict` moves it with the
weights when a server matches units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim import models
from fedsim.tasks import Task
from fedsim.train import Penalty

__all__ = [
    "ANCHORS_RECORD",
    "FEDCURV_CONST",
    "FEDCURV_LAMBDA",
    "FISHER_RECORD",
    "FISHER_SAMPLES",
    "NORMALISATIONS",
    "WPL_ALPHA",
    "CurvatureSums",
    "curvature_sums",
    "decayed",
    "empirical_fisher",
    "fedcurv_penalty",
    "fisher_keys",
    "leave_out",
    "normalise",
    "weighted_mean",
    "wpl_penalty",
]

Tensors = dict[str, torch.Tensor]

#: tensor record with a Fisher estimate (client to server), the aggregated
#: Fisher (WPL, server to client) or the others' summed Fisher (FedCurv)
FISHER_RECORD = "fedsim.fisher"
#: tensor record with the others' Fisher-weighted anchors (FedCurv)
ANCHORS_RECORD = "fedsim.anchors"
#: config keys the strategies send with the model
WPL_ALPHA = "wpl-alpha"
FEDCURV_LAMBDA = "fedcurv-lambda"
FEDCURV_CONST = "fedcurv-const"
FISHER_SAMPLES = "fisher-samples"

NORMALISATIONS = ("mean", "max", "none")


def fisher_keys(model: nn.Module) -> list[str]:
    """Trainable parameters that are averaged (the ones WPL may penalise)."""
    roles = models.tensor_roles(model)
    return [
        k
        for k, p in model.named_parameters()
        if p.requires_grad and roles.get(k) == "average"
    ]


def empirical_fisher(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    *,
    keys: Sequence[str] | None = None,
    batch_size: int = 32,
    method: str = "vmap",
) -> Tensors:
    """Mean squared per-example gradient of ``task.loss`` at the model's weights.

    Parameters
    ----------
    model : torch.nn.Module
        The model, evaluated in eval mode (its mode is restored afterwards).
    x, y : torch.Tensor
        The examples.
    task : Task
        Gives the per-example loss.
    keys : sequence of str, optional
        Parameters to estimate; defaults to :func:`fisher_keys`.
    batch_size : int
        Examples per vmapped chunk (memory: one gradient per example).
    method : str
        ``"vmap"`` (batched with torch.func) or ``"loop"`` (one autograd call
        per example, for models torch.func cannot batch).

    Returns
    -------
    dict
        One tensor per key, shaped like the parameter.
    """
    if method not in ("vmap", "loop"):
        raise ValueError(f"method={method!r} is not one of: vmap, loop")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("the Fisher estimate needs at least one example")
    names = list(keys) if keys is not None else fisher_keys(model)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    params = {k: state[k] for k in names}
    rest = {k: v for k, v in state.items() if k not in params}

    def loss_one(p: Tensors, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**rest, **p}, (xi.unsqueeze(0),))
        return task.loss(out, yi.unsqueeze(0)).sum()

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    was_training = model.training
    model.eval()
    try:
        if method == "vmap":
            # "different": a model that samples in its forward (a flow's trace
            # estimator) draws independent noise per example, as in a batch
            per_example = vmap(
                grad(loss_one), in_dims=(None, 0, 0), randomness="different"
            )
            for begin in range(0, n, batch_size):
                grads = per_example(
                    params, x[begin : begin + batch_size], y[begin : begin + batch_size]
                )
                for k in total:
                    total[k] += grads[k].pow(2).sum(0)
        else:
            leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            for i in range(n):
                loss = loss_one(leaves, x[i], y[i])
                grads = torch.autograd.grad(loss, list(leaves.values()))
                for k, g in zip(leaves, grads, strict=True):
                    total[k] += g.pow(2)
    finally:
        model.train(was_training)
    return {k: v / n for k, v in total.items()}


def _check_like(what: str, tensors: Mapping[str, torch.Tensor], ref: Tensors) -> None:
    for k, v in tensors.items():
        if k not in ref:
            raise ValueError(f"{what} has a tensor {k!r} the model does not have")
        if tuple(v.shape) != tuple(ref[k].shape):
            raise ValueError(
                f"{what} tensor {k!r} has shape {tuple(v.shape)}, "
                f"expected {tuple(ref[k].shape)}"
            )


def wpl_penalty(
    anchor: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    alpha: float,
) -> Penalty:
    """``alpha * sum_i F_i (w_i - w*_i)^2`` over the tensors of ``fisher``.

    Parameters
    ----------
    anchor : mapping of str to Tensor
        ``w*``: the received global parameters.
    fisher : mapping of str to Tensor
        ``F``: importance per parameter entry (non-negative).
    alpha : float
        Strength (no 1/2 in front; the gradient is ``2 alpha F (w - w*)``).
    """
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be zero or positive")
    anchors = {k: v.detach() for k, v in anchor.items()}
    _check_like("the Fisher estimate", fisher, anchors)
    weights = {k: v.detach().to(anchors[k].dtype) for k, v in fisher.items()}

    def penalty(params: Tensors) -> torch.Tensor:
        total = torch.zeros((), dtype=next(iter(params.values())).dtype)
        for key, f in weights.items():
            total = total + (f * (params[key] - anchors[key]).pow(2)).sum()
        return alpha * total

    return penalty


def weighted_mean(
    tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Tensors:
    """``sum_k (w_k / sum w) * T_k`` per key (same keys and shapes in every dict)."""
    if not tensors or len(tensors) != len(weights):
        raise ValueError("weighted_mean needs one weight per dict, and at least one")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"the weights must have a positive sum, got {total}")
    first = {k: v for k, v in tensors[0].items()}
    for other in tensors[1:]:
        if set(other) != set(first):
            raise ValueError("every Fisher estimate needs the same tensors")
        _check_like("a Fisher estimate", other, first)
    out = {}
    for key, ref in first.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for t, w in zip(tensors, weights, strict=True):
            acc += (float(w) / total) * t[key].to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def normalise(
    fisher: Mapping[str, torch.Tensor], how: str = "mean", clip: float | None = None
) -> Tensors:
    """Scale ``F`` so that its mean (``"mean"``) or maximum (``"max"``) entry is one.

    Then entries above ``clip`` are cut to it. An empirical Fisher is heavy-tailed
    (on MNIST the largest entry is thousands of times the mean), and a plain SGD
    step on ``alpha F (w - w*)^2`` diverges once ``lr * 2 alpha F`` passes
    ``2 (1 + momentum)``; the clip keeps the stiffest entries trainable. An
    all-zero ``F`` and ``how="none"`` are not rescaled.
    """
    if how not in NORMALISATIONS:
        raise ValueError(
            f"normalize={how!r} is not one of: {', '.join(NORMALISATIONS)}"
        )
    if clip is not None and clip <= 0:
        raise ValueError(f"clip={clip} must be positive or None")
    out = dict(fisher)
    if how != "none" and out:
        flat = torch.cat(
            [v.detach().reshape(-1).to(torch.float64) for v in out.values()]
        )
        scale = float(flat.mean() if how == "mean" else flat.max())
        if scale > 0:
            out = {k: v / scale for k, v in out.items()}
    if clip is not None:
        out = {k: v.clamp(max=clip) for k, v in out.items()}
    return out


def decayed(
    previous: Mapping[str, torch.Tensor] | None,
    new: Mapping[str, torch.Tensor],
    decay: float,
) -> Tensors:
    """``decay * previous + (1 - decay) * new``; just ``new`` without a past."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay={decay} must be in [0, 1)")
    if previous is None:
        return dict(new)
    _check_like("the new Fisher estimate", new, dict(previous))
    return {k: decay * previous[k] + (1.0 - decay) * v for k, v in new.items()}


@dataclass(frozen=True)
class CurvatureSums:
    """FedCurv's sums over a set of clients ``j``.

    Attributes
    ----------
    precision : dict
        ``U = sum_j F_j``.
    weighted : dict
        ``V = sum_j F_j * w_j``.
    const : float
        ``c = sum_j sum_i F_j,i * w_j,i^2`` (makes the penalty's value exact).
    """

    precision: Tensors
    weighted: Tensors
    const: float


def curvature_sums(
    fishers: Sequence[Mapping[str, torch.Tensor]],
    anchors: Sequence[Mapping[str, torch.Tensor]],
) -> CurvatureSums:
    """:class:`CurvatureSums` of clients with Fisher ``F_j`` and weights ``w_j``.

    Sums are kept in float64 so that :func:`leave_out` can subtract a share.
    """
    if not fishers or len(fishers) != len(anchors):
        raise ValueError("curvature_sums needs one anchor per Fisher, at least one")
    keys = list(fishers[0])
    precision = {k: torch.zeros(fishers[0][k].shape, dtype=torch.float64) for k in keys}
    weighted = {k: torch.zeros_like(v) for k, v in precision.items()}
    const = 0.0
    for f, w in zip(fishers, anchors, strict=True):
        _check_like("a Fisher estimate", f, precision)
        for k in keys:
            fk, wk = f[k].to(torch.float64), w[k].to(torch.float64)
            precision[k] += fk
            weighted[k] += fk * wk
            const += float((fk * wk * wk).sum())
    return CurvatureSums(precision, weighted, const)


def leave_out(
    sums: CurvatureSums,
    fisher: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
) -> CurvatureSums:
    """The sums without one client's share (client ``k`` is not its own anchor)."""
    own = curvature_sums([fisher], [anchor])
    return CurvatureSums(
        {k: v - own.precision[k] for k, v in sums.precision.items()},
        {k: v - own.weighted[k] for k, v in sums.weighted.items()},
        sums.const - own.const,
    )


def fedcurv_penalty(sums: CurvatureSums, lam: float) -> Penalty:
    """``lam * sum_j sum_i F_j,i (w_i - w_j,i)^2`` from the sums of clients ``j``.

    Evaluated as ``lam * (sum_i U_i w_i^2 - 2 V_i w_i + c)``; its gradient is
    ``2 lam (U w - V)``.
    """
    if lam < 0:
        raise ValueError(f"lam={lam} must be zero or positive")
    precision, weighted, const = sums.precision, sums.weighted, sums.const

    def penalty(params: Tensors) -> torch.Tensor:
        dtype = next(iter(params.values())).dtype
        total = torch.zeros((), dtype=dtype)
        for key, u in precision.items():
            w = params[key]
            u_, v_ = u.to(dtype), weighted[key].to(dtype)
            total = total + (u_ * w * w - 2.0 * v_ * w).sum()
        return lam * (total + const)

    return penalty
