"""Per-class and worst-class accuracy of the server's evaluation."""

from __future__ import annotations

import pytest
import torch

from fedsim.class_accuracy import class_accuracy
from fedsim.exceptions import ConfigError


def test_per_class_accuracy_counts_each_class_separately() -> None:
    # the "model" returns its input: rows are logits, argmax = prediction
    predictions = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    labels = torch.tensor([0, 1, 1, 2, 2, 0, 1, 0])
    logits = torch.nn.functional.one_hot(predictions, 4).float()
    got = class_accuracy(
        torch.nn.Identity(), logits, labels, num_classes=4, batch_size=3
    )
    # class 0: 2 of 3 right; class 1: 2 of 3; class 2: 2 of 2; class 3: absent
    assert got["class_accuracy"] == [
        pytest.approx(2 / 3),
        pytest.approx(2 / 3),
        1.0,
        None,
    ]
    assert got["worst_class_accuracy"] == pytest.approx(2 / 3)


def test_per_class_accuracy_needs_class_labels() -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.per_class=true needs integer"):
        class_accuracy(
            torch.nn.Identity(), torch.ones(2, 1), torch.ones(2), num_classes=1
        )
