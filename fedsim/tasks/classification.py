"""Multi-class classification: cross-entropy loss; accuracy, loss and, for
Lipschitz-bounded models, certified accuracy.

``certify_eps`` turns on ``certified_accuracy``: the share of examples whose
margin ``f_y - max_{j != y} f_j`` exceeds ``c L eps`` (``c = sqrt 2`` in l_2, 2
in l_inf; see :mod:`fedsim.certify`), i.e. predictions that are correct and
provably unchanged by any input perturbation of size ``eps``. The radius is
measured in the model's input units, after the dataset's standardisation (on
``mnist5k`` a pixel radius ``r`` in [0, 1] units is ``r / 0.3086``). The
metric needs the model's Lipschitz constant, which a task cannot see in
``(output, target)``: the server calls :meth:`Classification.bind_model` on
the global model once, which reads the bound the model declares (see
:func:`lipschitz_bound`) into the task. A task that was not bound (a client's
federated evaluation) reports accuracy and loss only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsim.certify import margin_certified
from fedsim.exceptions import ConfigError
from fedsim.tasks import TASKS

__all__ = ["Classification", "classification", "lipschitz_bound"]

NORMS = ("l2", "linf")


def lipschitz_bound(model: torch.nn.Module) -> tuple[float, str] | None:
    """The Lipschitz constant and norm a model declares, if it declares one.

    A model is Lipschitz-bounded when it has a positive float attribute
    ``lipschitz`` (the constant L of the whole network, logits included) and a
    string attribute ``norm`` naming the norm, ``"l2"`` or ``"linf"``, as
    ``groupsort_mlp`` does.

    Returns
    -------
    tuple of (float, str) or None
        ``(L, norm)``, or ``None`` for a model without such a bound.
    """
    constant = getattr(model, "lipschitz", None)
    norm = getattr(model, "norm", None)
    if isinstance(constant, bool) or not isinstance(constant, int | float):
        return None
    if not isinstance(norm, str) or norm not in NORMS:
        return None
    if not (math.isfinite(constant) and constant > 0):
        return None
    return float(constant), norm


@dataclass(frozen=True)
class Classification:
    """Cross-entropy on logits; reports ``accuracy``, ``loss`` and, when bound to a
    Lipschitz-bounded model with ``certify_eps`` set, ``certified_accuracy``.

    Parameters
    ----------
    label_smoothing : float
        Label smoothing of the training loss, in [0, 1).
    certify_eps : float or None
        Certification radius (>= 0) in the model's input units; ``None`` turns
        certified accuracy off.
    lipschitz, norm
        The model's Lipschitz constant and norm, filled in by
        :meth:`bind_model`.
    """

    label_smoothing: float = 0.0
    certify_eps: float | None = None
    lipschitz: float | None = None
    norm: str = "l2"
    primary: str = "accuracy"
    higher_is_better: bool = True

    def bind_model(self, model: torch.nn.Module) -> Classification:
        """This task, completed with ``model``'s Lipschitz bound when certifying.

        Raises
        ------
        fedsim.exceptions.ConfigError
            If ``certify_eps`` is set and the model declares no Lipschitz bound.
        """
        if self.certify_eps is None:
            return self
        bound = lipschitz_bound(model)
        if bound is None:
            name = getattr(model, "fedsim_name", type(model).__name__)
            raise ConfigError(
                f"task.certify_eps={self.certify_eps} needs a Lipschitz-bounded "
                f"model such as groupsort_mlp, but model {name!r} declares no "
                "Lipschitz constant; set task.certify_eps=null"
            )
        return dataclasses.replace(self, lipschitz=bound[0], norm=bound[1])

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy."""
        return F.cross_entropy(
            output, target, reduction="none", label_smoothing=self.label_smoothing
        )

    def metrics(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example ``loss`` (plain cross-entropy) and ``accuracy`` (0/1), plus
        ``certified_accuracy`` (0/1) once bound to a Lipschitz-bounded model."""
        values = {
            "loss": F.cross_entropy(output, target, reduction="none"),
            "accuracy": (output.argmax(dim=1) == target).to(output.dtype),
        }
        if self.certify_eps is not None and self.lipschitz is not None:
            certified = margin_certified(
                output,
                target,
                lipschitz=self.lipschitz,
                eps=self.certify_eps,
                norm=self.norm,
            )
            values["certified_accuracy"] = certified.to(output.dtype)
        return values


@TASKS.register("classification")
def classification(
    *, label_smoothing: float = 0.0, certify_eps: float | None = None
) -> Classification:
    """Registered ``classification`` task."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if certify_eps is not None and not (
        math.isfinite(certify_eps) and certify_eps >= 0
    ):
        raise ConfigError(
            f"task.certify_eps={certify_eps} must be null or a finite radius >= 0"
        )
    eps = None if certify_eps is None else float(certify_eps)
    return Classification(label_smoothing=label_smoothing, certify_eps=eps)
