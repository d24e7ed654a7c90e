"""Federated evaluation of many clients in shared forward passes.

Clients that evaluate the same model (the usual case: every client gets the
global model) need not each run it on their few held-out rows: one pass over
their concatenated rows, with every example's metrics summed back into its
client, gives each the numbers :func:`fedsim.node.evaluate_client` reports.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim._cohort_plan import ClientStore

__all__ = ["client_metrics"]


@torch.no_grad()
def client_metrics(
    model: torch.nn.Module,
    task: Any,
    store: ClientStore,
    pids: list[int],
    batch_size: int,
) -> list[dict[str, float]]:
    """``evaluate_client``'s metrics for many clients in shared forward passes."""
    spans = [store.spans[p] for p in pids]
    rows = torch.cat(
        [torch.arange(a, a + n, dtype=torch.long) for a, n in spans]
        or [torch.zeros(0, dtype=torch.long)]
    )
    owner = torch.repeat_interleave(
        torch.arange(len(pids)), torch.tensor([n for _, n in spans])
    )
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, int(rows.shape[0]), batch_size):
        pick = rows[start : start + batch_size]
        out = model(store.x.index_select(0, pick))
        target = store.y.index_select(0, pick)
        for key, values in task.metrics(out, target).items():
            acc = totals.setdefault(key, torch.zeros(len(pids), dtype=torch.float64))
            acc.index_add_(0, owner[start : start + batch_size], values.double())
    results = []
    for i, (_, n) in enumerate(spans):
        if n == 0:
            results.append({"num-examples": 0.0})
            continue
        metrics = {k: float(v[i]) / n for k, v in totals.items()}
        results.append({"num-examples": float(n), **metrics})
    return results
