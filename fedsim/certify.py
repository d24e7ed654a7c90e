"""Robustness certificates from a network's Lipschitz constant (Anil et al. 2019).

If every logit map of a classifier ``f`` together is L-Lipschitz (l_2 to l_2,
or l_inf to l_inf), an input perturbation of size ``eps`` moves the margin
``f_y - max_{j != y} f_j`` by at most ``c L eps``, with ``c = 2`` in l_inf (each
of the two logits moves by at most ``L eps``) and ``c = sqrt 2`` in l_2 (the
margin is ``(e_y - e_j)^T f`` and ``||e_y - e_j||_2 = sqrt 2``). A prediction
with margin above ``c L eps`` therefore cannot be flipped within radius ``eps``.
``fedsim.models.groupsort`` builds networks with such a constant.
"""

from __future__ import annotations

import math

import torch

from fedsim.exceptions import ConfigError

__all__ = ["certified_radius", "margin_certified"]

_MARGIN_FACTOR = {"l2": math.sqrt(2.0), "linf": 2.0}


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``f_y - max_{j != y} f_j`` per example."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"logits must have shape (batch, classes >= 2), got {tuple(logits.shape)}"
        )
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:1])}, "
            f"got {tuple(labels.shape)}"
        )
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], -math.inf)
    return own - others.amax(dim=1)


def _factor(norm: str, lipschitz: float) -> float:
    if norm not in _MARGIN_FACTOR:
        raise ConfigError(f"norm {norm!r} is not one of {tuple(_MARGIN_FACTOR)}")
    if not lipschitz > 0:
        raise ConfigError(f"lipschitz must be positive, got {lipschitz}")
    return _MARGIN_FACTOR[norm] * lipschitz


def margin_certified(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    lipschitz: float,
    eps: float,
    norm: str,
) -> torch.Tensor:
    """Which predictions are provably unchanged by any perturbation of size ``eps``.

    Parameters
    ----------
    logits : Tensor
        (batch, classes) outputs of an L-Lipschitz network.
    labels : Tensor
        (batch,) class indices (int64).
    lipschitz : float
        The network's Lipschitz constant L in ``norm``.
    eps : float
        Perturbation radius (>= 0).
    norm : {"l2", "linf"}
        The norm of the perturbation and of the Lipschitz bound.

    Returns
    -------
    Tensor
        (batch,) bool: ``f_y - max_{j != y} f_j > 2 L eps`` for ``"linf"``,
        ``> sqrt(2) L eps`` for ``"l2"``. A certified example is also correctly
        classified (its margin is positive).
    """
    if eps < 0:
        raise ConfigError(f"eps must be >= 0, got {eps}")
    return _margins(logits, labels) > _factor(norm, lipschitz) * eps


def certified_radius(
    logits: torch.Tensor, labels: torch.Tensor, *, lipschitz: float, norm: str
) -> torch.Tensor:
    """The largest radius each prediction is certified at.

    Parameters
    ----------
    logits, labels, lipschitz, norm
        As in :func:`margin_certified`.

    Returns
    -------
    Tensor
        (batch,) ``margin / (c L)`` with ``c = 2`` (l_inf) or ``sqrt 2`` (l_2);
        negative for misclassified examples.
    """
    return _margins(logits, labels) / _factor(norm, lipschitz)
