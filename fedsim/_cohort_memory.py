"""How much memory a batched cohort step needs, and how much it may use.

:class:`~fedsim._cohort.CohortTrainer` sizes its chunks with these:
:func:`footprint` estimates one client's share of a batched step,
:func:`memory_budget` what the device can spare.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Footprint", "footprint", "is_out_of_memory", "memory_budget"]


@dataclass(frozen=True)
class Footprint:
    """Bytes one client of a batched step needs (all told, and its largest tensor)."""

    total: int
    largest: int


def memory_budget(device: torch.device, fraction: float = 0.5) -> int:
    """Bytes a cohort may use on ``device``: ``fraction`` of its free memory.

    CUDA: the device's free memory; CPU: ``MemAvailable`` of ``/proc/meminfo``
    (4 GiB when it cannot be read).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    available = 4 * 2**30
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(available * fraction)


def footprint(
    runner: nn.Module, cfg: Any, sample: torch.Tensor, *, proximal: bool
) -> Footprint:
    """Estimated memory one client of a batched step of ``runner`` needs.

    Counts the state (parameters, their new values, gradients, optimiser
    moments of ``cfg``'s optimiser, FedProx anchors when ``proximal``) and the
    activations of one batch, measured by a forward pass over ``sample`` (a
    few rows of real data) and scaled to the batch size (x3 for saved
    activations and their gradients).
    """
    state = runner.state_dict().values()
    state_bytes = sum(v.numel() * v.element_size() for v in state)
    if cfg.optimizer == "sgd":
        moments = 1 if cfg.momentum > 0 else 0
    else:
        moments = 3 if cfg.amsgrad else 2
    copies = 4 + 2 * moments + (1 if proximal else 0)
    sizes: list[int] = []

    def count(_: nn.Module, __: Any, out: Any) -> None:
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())

    probe = copy.deepcopy(runner)
    hooks = [m.register_forward_hook(count) for m in probe.modules()]
    try:
        with torch.no_grad():
            probe(sample)
    finally:
        for hook in hooks:
            hook.remove()
    scale = cfg.batch_size / max(1, int(sample.shape[0]))
    data = 2 * cfg.batch_size * sample[0].numel() * sample.element_size()
    activations = int(3 * sum(sizes) * scale)
    largest = max(
        [v.numel() * v.element_size() for v in state] + [int(max(sizes) * scale)]
    )
    return Footprint(total=copies * state_bytes + activations + data, largest=largest)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device (or host) out-of-memory error."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )
