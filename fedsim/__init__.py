"""fedsim: federated-learning simulation on Flower and Ray, with PFNM matching."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public entry points imported on first use (they pull in torch, Flower, Hydra).
# ``fedsim.compare`` is the module ``fedsim/compare.py``, which is callable:
# ``fedsim.compare(["strategies=[fedavg,fedprox]"])`` runs a comparison.
_LAZY = {"compare": "fedsim.compare"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
