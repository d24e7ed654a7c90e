"""Wasserstein-1 estimation: the model's scalar output is a Kantorovich potential.

The clients hold samples of two distributions, labelled 0 (P) and 1 (Q). By
Kantorovich-Rubinstein duality ``W1(P, Q) = sup_f E_P f - E_Q f`` over
1-Lipschitz ``f``, so training a 1-Lipschitz network ``f`` (``groupsort_mlp``
with ``lipschitz=1``) to maximise ``mean f(P) - mean f(Q)`` on samples and
reading the same difference on the server's held-out samples gives an estimate
of ``W1`` from below (up to sampling noise): the metric ``w1``, higher is
better.

Per example, ``loss`` is ``-f(x) B / n_P`` for a sample of P and
``+f(x) B / n_Q`` for a sample of Q, where ``B`` is the batch size and ``n_P``,
``n_Q`` count the batch's samples of each distribution, so the batch's mean
loss is exactly ``-(mean f(P) - mean f(Q))`` (a batch holding one
distribution only contributes its half). ``metrics`` reports ``w1 = -loss``
per example with the same weights: its mean over a batch is
``mean f(P) - mean f(Q)``. Evaluation averages per-example values over
batches of ``evaluation.batch_size``, so the server's ``test_w1`` is exact when
the test set fits one batch (the default 1,000) or when every batch holds P and
Q in the test set's proportions (fedsim's two-sample datasets interleave them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.tasks import TASKS

__all__ = ["Wasserstein", "check_labels", "potential_weights", "wasserstein"]


def _potential(output: torch.Tensor) -> torch.Tensor:
    """The scalar potential per example from a (batch,) or (batch, 1) output."""
    if output.ndim == 2 and output.shape[1] == 1:
        return output[:, 0]
    if output.ndim == 1:
        return output
    raise ValueError(
        f"wasserstein needs one output value per example, (batch,) or (batch, 1), "
        f"got {tuple(output.shape)}; use a dataset with num_classes 1"
    )


def check_labels(target: torch.Tensor) -> None:
    """Refuse labels other than 0 (samples of P) and 1 (samples of Q).

    Raises
    ------
    ValueError
        If a label is neither 0 nor 1.
    """
    labels = target.reshape(-1)
    bad = labels[(labels != 0) & (labels != 1)]
    if bad.numel():
        raise ValueError(
            "wasserstein labels must be 0 (samples of P) or 1 (samples of Q), got "
            f"{bad[0].item()!r}"
        )


def potential_weights(target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``B / n_P`` for samples of P (label 0), ``-B / n_Q`` for Q (label 1).

    Written without data-dependent Python branches, so the training step can
    run it under ``torch.func.vmap``; labels are checked in :meth:`metrics`.

    Parameters
    ----------
    target : Tensor
        (batch,) labels, 0 for P and 1 for Q.
    dtype : torch.dtype
        The weights' dtype.

    Returns
    -------
    Tensor
        (batch,) weights ``c`` with ``mean(c * f) = mean f(P) - mean f(Q)``
        over the batch.
    """
    q = (target.reshape(-1) == 1).to(dtype)
    batch = float(q.shape[0])
    n_q = q.sum().clamp_min(1.0)
    n_p = (1.0 - q).sum().clamp_min(1.0)
    return batch * ((1.0 - q) / n_p - q / n_q)


@dataclass(frozen=True)
class Wasserstein:
    """Kantorovich potential training; reports ``w1`` (higher is better)."""

    primary: str = "w1"
    higher_is_better: bool = True

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example ``-f(x) B / n_P`` (P) or ``+f(x) B / n_Q`` (Q)."""
        f = _potential(output)
        return -potential_weights(target, f.dtype) * f

    def metrics(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example ``w1`` contributions (minus the loss).

        Raises
        ------
        ValueError
            If a label is neither 0 nor 1.
        """
        check_labels(target)
        f = _potential(output)
        return {"w1": potential_weights(target, f.dtype) * f}


@TASKS.register("wasserstein")
def wasserstein() -> Wasserstein:
    """Registered ``wasserstein`` task."""
    return Wasserstein()
