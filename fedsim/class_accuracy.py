"""Accuracy per class, and the worst class's, for the server's evaluation.

Forgetting across rounds shows first in the classes the last cohorts did not
hold, while the overall accuracy may barely move; ``evaluation.per_class=true``
records ``test_class_accuracy`` (one value per class, ``None`` for a class
absent from the test set) and ``test_worst_class_accuracy`` every evaluated
round.
"""

from __future__ import annotations

import torch

from fedsim.exceptions import ConfigError

__all__ = ["class_accuracy"]


@torch.no_grad()
def class_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    batch_size: int = 1000,
) -> dict[str, float | list[float | None]]:
    """Share of each class's examples that the model's argmax gets right.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning logits; evaluated in eval mode.
    x, y : torch.Tensor
        Inputs and integer class labels.
    num_classes : int
        Number of classes.
    batch_size : int
        Examples per forward pass.

    Returns
    -------
    dict
        ``class_accuracy`` (list, ``None`` where a class has no example) and
        ``worst_class_accuracy`` (the minimum over present classes).

    Raises
    ------
    ConfigError
        If the labels are not integer classes (a regression task).
    """
    if y.is_floating_point():
        raise ConfigError(
            "evaluation.per_class=true needs integer class labels; this task's "
            "targets are real numbers, so set evaluation.per_class=false"
        )
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    for begin in range(0, int(x.shape[0]), batch_size):
        out = model(x[begin : begin + batch_size])
        labels = y[begin : begin + batch_size]
        hit = (out.argmax(dim=1) == labels).long()
        total += torch.bincount(labels.cpu(), minlength=num_classes)
        correct += torch.bincount(
            labels.cpu(), weights=hit.cpu(), minlength=num_classes
        ).long()
    per_class: list[float | None] = [
        float(c) / float(t) if t > 0 else None
        for c, t in zip(correct.tolist(), total.tolist(), strict=True)
    ]
    present = [v for v in per_class if v is not None]
    return {
        "class_accuracy": per_class,
        "worst_class_accuracy": min(present) if present else float("nan"),
    }
