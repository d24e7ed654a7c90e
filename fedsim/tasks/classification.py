"""Multi-class classification: cross-entropy loss, accuracy and loss metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsim.tasks import TASKS

__all__ = ["Classification", "classification"]


@dataclass(frozen=True)
class Classification:
    """Cross-entropy on logits; reports ``accuracy`` and ``loss``."""

    label_smoothing: float = 0.0
    primary: str = "accuracy"
    higher_is_better: bool = True

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy."""
        return F.cross_entropy(
            output, target, reduction="none", label_smoothing=self.label_smoothing
        )

    def metrics(
        self, output: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example ``loss`` (plain cross-entropy) and ``accuracy`` (0/1)."""
        return {
            "loss": F.cross_entropy(output, target, reduction="none"),
            "accuracy": (output.argmax(dim=1) == target).to(output.dtype),
        }


@TASKS.register("classification")
def classification(*, label_smoothing: float = 0.0) -> Classification:
    """Registered ``classification`` task."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    return Classification(label_smoothing=label_smoothing)
