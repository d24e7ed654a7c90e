"""Helpers shared by the test suite (no test in here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.matching.permspec import (
    PermutationSpec,
    permute_state_dict,
    random_permutations,
)

# Every registered model must build with these and run on an 8x8 grey image batch.
SMALL_BUILD: dict[str, Any] = {"input_shape": (1, 8, 8), "num_classes": 10}


def example_input(model: torch.nn.Module, batch: int, seed: int = 0) -> Any:
    """The model's own example input if it defines one, else an 8x8 image batch."""
    gen = torch.Generator().manual_seed(seed)
    make = getattr(model, "example_input", None)
    if make is not None:
        return make(batch, gen)
    return torch.randn(batch, *SMALL_BUILD["input_shape"], generator=gen)


def outputs(model: torch.nn.Module, x: Any) -> list[torch.Tensor]:
    """Forward pass flattened to a list of tensors (models may return tuples)."""
    out = model(*x) if isinstance(x, tuple) else model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def to_float64(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(to_float64(t) for t in x)
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def perturb_state(model: torch.nn.Module, seed: int = 0) -> None:
    """Break symmetric initial values (BN weight 1, bias 0, stats 0/1) with noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            t.add_(noise.abs() if key.endswith("running_var") else noise)


def max_output_change(
    model: torch.nn.Module, spec: PermutationSpec, x: Any, seed: int = 0
) -> float:
    """Largest output change after random permutations of every group of ``spec``."""
    model.eval()
    with torch.no_grad():
        before = outputs(model, x)
        state = model.state_dict()
        perms = random_permutations(spec, np.random.default_rng(seed))
        model.load_state_dict(permute_state_dict(state, spec, perms))
        after = outputs(model, x)
        model.load_state_dict(state)
    return max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
