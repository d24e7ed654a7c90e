"""A cohort's data, stacked once, and its batch schedule with padding masks.

:class:`ClientStore` concatenates the training data of many clients into one
pair of tensors (no padding, one copy, moved to the training device once) and
remembers where each client's rows start. :func:`make_plan` lays out the
batches every client of a cohort takes, step by step, exactly as per-client
training draws them (:func:`fedsim.train.local_train`: one
``torch.randperm(n, generator=...)`` per epoch from the client's own
generator, consecutive slices of ``batch_size``), padded to one shape: row
weights mark the padding of a short last batch, and a client with fewer steps
than the longest one is inactive (its state must not change) for the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["ClientStore", "CohortPlan", "make_plan"]


@dataclass(frozen=True)
class ClientStore:
    """Training data of many clients, concatenated.

    Attributes
    ----------
    x, y : torch.Tensor
        Every client's examples and targets, one client after another.
    spans : dict of int to (int, int)
        ``client id -> (first row, number of rows)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    spans: dict[int, tuple[int, int]]

    @classmethod
    def stack(
        cls,
        clients: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
        *,
        device: torch.device | str | None = None,
    ) -> ClientStore:
        """Concatenate ``{client id: (x, y)}`` once, on ``device``."""
        if not clients:
            raise ValueError("a client store needs at least one client")
        spans: dict[int, tuple[int, int]] = {}
        start = 0
        for cid, (x, y) in clients.items():
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"client {cid} has {x.shape[0]} examples but {y.shape[0]} targets"
                )
            spans[cid] = (start, int(x.shape[0]))
            start += int(x.shape[0])
        xs = torch.cat([x for x, _ in clients.values()]).to(device)
        ys = torch.cat([y for _, y in clients.values()]).to(device)
        return cls(x=xs, y=ys, spans=spans)

    def count(self, client: int) -> int:
        """Number of training examples of ``client``."""
        return self.spans[client][1]

    @property
    def device(self) -> torch.device:
        """Where the data lives (and the cohort trains)."""
        return self.x.device


@dataclass(frozen=True)
class CohortPlan:
    """Which rows every client trains on at every step (T steps, C clients, B rows).

    Attributes
    ----------
    index : torch.Tensor
        (T, C, B) rows of the store; padding points at a real row of the client.
    weight : torch.Tensor
        (T, C, B) 1 for a real row, 0 for padding (the loss mask of ``make_step``).
    active : torch.Tensor
        (T, C) whether the client takes a real step (False once it is done).
    last_epoch : torch.Tensor
        (T, C) whether the step belongs to the client's last epoch (its
        ``train_loss`` is the mean batch loss of that epoch).
    epoch_steps : torch.Tensor
        (C,) steps per epoch of every client.
    steps : torch.Tensor
        (C,) total steps of every client.
    all_active : tuple of bool
        Per step: every client is active (no state needs protecting).
    padded : tuple of bool
        Per step: some active client has padding rows (a short last batch).
    """

    index: torch.Tensor
    weight: torch.Tensor
    active: torch.Tensor
    last_epoch: torch.Tensor
    epoch_steps: torch.Tensor
    steps: torch.Tensor
    all_active: tuple[bool, ...]
    padded: tuple[bool, ...]

    @property
    def num_steps(self) -> int:
        """T, the longest client's number of steps."""
        return int(self.index.shape[0])


def make_plan(
    store: ClientStore,
    clients: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    epochs: int,
    batch_size: int,
) -> CohortPlan:
    """The batch schedule of ``clients`` (store ids), each with its own generator.

    Every client's generator is advanced exactly as per-client training
    advances it (one ``randperm`` per epoch), so client ``c`` sees the same
    batches in the same order as it would alone.

    Raises
    ------
    ValueError
        For a client without examples, or mismatched lengths.
    """
    if len(clients) != len(generators):
        raise ValueError(
            f"{len(clients)} clients but {len(generators)} generators; give one each"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(
            f"epochs={epochs} and batch_size={batch_size} must both be at least 1"
        )
    counts = [store.count(c) for c in clients]
    if not counts or min(counts) < 1:
        raise ValueError("every client of a cohort needs at least one example")
    width = min(batch_size, max(counts))
    epoch_steps = [math.ceil(n / batch_size) for n in counts]
    total = epochs * max(epoch_steps)
    size = len(clients)
    dtype = store.x.dtype if store.x.is_floating_point() else torch.float32
    index = torch.zeros(total, size, width, dtype=torch.long)
    weight = torch.zeros(total, size, width, dtype=dtype)
    active = torch.zeros(total, size, dtype=torch.bool)
    last = torch.zeros(total, size, dtype=torch.bool)
    for col, (cid, n, s, gen) in enumerate(
        zip(clients, counts, epoch_steps, generators, strict=True)
    ):
        start = store.spans[cid][0]
        rows = torch.full((epochs, s * width), start, dtype=torch.long)
        real = torch.zeros(epochs, s * width, dtype=dtype)
        for epoch in range(epochs):
            rows[epoch, :n] = torch.randperm(n, generator=gen) + start
            real[epoch, :n] = 1
        index[: epochs * s, col] = rows.reshape(epochs * s, width)
        weight[: epochs * s, col] = real.reshape(epochs * s, width)
        active[: epochs * s, col] = True
        last[(epochs - 1) * s : epochs * s, col] = True
    padded = ((weight < 1) & active.unsqueeze(2)).any(dim=2).any(dim=1)
    device = store.device
    return CohortPlan(
        index=index.to(device),
        weight=weight.to(device),
        active=active.to(device),
        last_epoch=last.to(device),
        epoch_steps=torch.tensor(epoch_steps, device=device),
        steps=torch.tensor([epochs * s for s in epoch_steps], device=device),
        all_active=tuple(bool(v) for v in active.all(dim=1)),
        padded=tuple(bool(v) for v in padded),
    )
