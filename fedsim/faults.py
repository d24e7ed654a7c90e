"""Fault injection: clients that crash, straggle or send corrupted updates.

``simulation.faults.{crash,straggle,corrupt}`` are fractions of each round's
sampled clients. The server decides who misbehaves (seeded by the run seed and
the round, so a rerun fails the same clients) and marks their train messages;
the ClientApp obeys the mark. Crashes come back as error replies, stragglers
past ``simulation.round_timeout`` as timeouts, corrupted updates (NaN weights)
are rejected before aggregation; ``results.json`` counts each per round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedsim.config import FaultsConfig
from fedsim.train import derive_seed

__all__ = ["FAULT_KEY", "STRAGGLE_KEY", "apply_fault", "corrupt", "plan_faults"]

FAULT_KEY = "fedsim.fault"
STRAGGLE_KEY = "fedsim.straggle-seconds"


class InjectedCrash(RuntimeError):
    """Raised by a client told to crash."""


def plan_faults(
    faults: FaultsConfig, seed: int, server_round: int, partition_ids: Sequence[int]
) -> dict[int, str]:
    """Which of this round's clients crash, straggle or corrupt (by partition id).

    Each kind gets ``round(fraction * cohort)`` distinct clients, drawn without
    replacement in that order from a permutation seeded by (seed, round).
    """
    ids = sorted(partition_ids)
    rng = np.random.default_rng(derive_seed(seed, server_round, 3))
    order = [ids[i] for i in rng.permutation(len(ids))]
    plan: dict[int, str] = {}
    start = 0
    for kind, fraction in (
        ("crash", faults.crash),
        ("straggle", faults.straggle),
        ("corrupt", faults.corrupt),
    ):
        count = math.floor(fraction * len(ids) + 0.5)
        for pid in order[start : start + count]:
            plan[pid] = kind
        start += count
    return plan


def apply_fault(config: Mapping[str, Any]) -> str | None:
    """Act out a fault before training: crash (raise) or straggle (sleep).

    Returns the fault kind (``corrupt`` is applied after training).
    """
    kind = config.get(FAULT_KEY)
    if kind == "crash":
        raise InjectedCrash("injected crash (simulation.faults.crash)")
    if kind == "straggle":
        time.sleep(float(config.get(STRAGGLE_KEY, 0.0)))
    return None if kind is None else str(kind)


def corrupt(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update a corrupted client sends: every float tensor NaN."""
    return {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in state.items()
    }
