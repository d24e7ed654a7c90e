"""PFNM/FedMA's "hetero-dir" label-skew draw, used by ``partition.hetero_dir``.

No flwr-datasets partitioner implements it: its balancing rule stops a client
at >= N/J examples (flwr-datasets' ``self_balancing`` stops it only above
N/J), and the reference code redraws without limit where flwr-datasets gives
up after 11 draws; here the caller sets the limit.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hetero_dir_draw"]


def hetero_dir_draw(
    labels: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    min_size: int,
    max_attempts: int,
    rng: np.random.Generator,
) -> list[np.ndarray] | None:
    """PFNM's ``partition_data("hetero-dir")``; None if no draw meets min_size.

    Per attempt, for each class in ascending order: shuffle its examples,
    draw p ~ Dir_J(alpha), zero p_j for every client already holding
    >= N/J examples, renormalise, and cut the shuffled examples at
    ``floor(cumsum(p) * n_class)``.

    One deliberate difference from the reference code: the cumulative share
    after the last client with p_j > 0 is set to exactly 1. In the reference,
    a floating-point sum just below 1 can give the last client one example of
    a class even when its p_j is 0, breaking the balancing rule.
    """
    cap = len(labels) / num_clients
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_attempts):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for indices in members:
            shuffled = rng.permutation(indices)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = np.where(sizes < cap, p, 0.0)
            total = p.sum()
            if not total > 0:  # every eligible share underflowed: redraw
                break
            shares = np.cumsum(p / total)
            # past the last eligible client the share is exactly 1; rounding in
            # cumsum could otherwise hand the last, full client one example
            shares[np.flatnonzero(p)[-1] :] = 1.0
            cuts = (shares * len(shuffled)).astype(np.int64)[:-1]
            for client, piece in enumerate(np.split(shuffled, cuts)):
                pieces[client].append(piece)
                sizes[client] += len(piece)
        else:
            if sizes.min() >= min_size:
                return [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
    return None
