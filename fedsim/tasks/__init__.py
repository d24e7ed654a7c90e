"""Learning tasks: what the loss is and what evaluation reports.

A task turns model outputs and targets into a training loss and turns a model
plus a dataset into metrics. ``classification`` is the default; the density
(bits per dimension), Wasserstein and regression tasks live beside it.
Registered in :data:`TASKS`; chosen with ``task=<name>``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any, Protocol

import torch

from fedsim.registry import Registry

__all__ = ["TASKS", "Task", "build", "names"]


class Task(Protocol):
    """What a task provides to training and evaluation."""

    #: metric the run reports as its headline (``test_<primary>`` in results)
    primary: str
    #: True when a larger primary metric is better
    higher_is_better: bool

    def loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """Per-example losses, shape (batch,)."""
        ...

    def metrics(self, output: Any, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example metric values, each of shape (batch,), averaged by the caller."""
        ...


# Optional: a task may define ``bind_model(model) -> Task``, returning the task
# specialised to the model it evaluates (classification's ``certify_eps`` reads
# the model's Lipschitz constant). The server calls it once before round 0 and
# it raises ConfigError when the model does not fit the task.


TASKS: Registry[Task] = Registry("task")


@functools.cache
def _load_all() -> None:
    """Import every task module once, for its registrations."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def build(name: str, **options: Any) -> Task:
    """Build the registered task ``name``."""
    _load_all()
    return TASKS.build(name, **options)


def names() -> list[str]:
    """Names of every registered task."""
    _load_all()
    return TASKS.names()
