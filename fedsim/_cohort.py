"""Local training of a whole cohort at once: one vmapped step over stacked clients.

:class:`CohortTrainer` trains C clients of one architecture together. Their
parameters, buffers (BatchNorm statistics) and optimiser states are stacked
along a leading client axis, and every step runs
``torch.func.vmap(fedsim.train.make_step(..., transform=True))`` over it: the
same loss, optimiser and FedProx maths as per-client training, for all clients
in one call. Each client follows its own batch schedule
(:mod:`fedsim._cohort_plan`): short last batches are padded with zero-weight
rows (BatchNorm ignores them too, :mod:`fedsim._batch_mask`), and a client that
has finished while others still train keeps its parameters, optimiser state
and statistics unchanged (``torch.where`` on its active flag). The result
equals per-client training to float rounding.

Large cohorts run in chunks sized to the device memory (clients of similar
step counts together); a chunk that still runs out of memory is halved.
(:mod:`fedsim._cohort_probe` checks that a model trains batched exactly as it
trains alone.)

This module needs torch and :mod:`fedsim.train`, not Flower or Ray (the GPU
check ``benchmarks/gpu_cohort_check.py`` runs it on a bare torch machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from fedsim._batch_mask import mask_batchnorm
from fedsim._cohort_memory import Footprint, footprint, is_out_of_memory, memory_budget
from fedsim._cohort_plan import ClientStore, CohortPlan, make_plan
from fedsim.train import Penalty, init_optimizer_state, make_step

__all__ = [
    "CohortResult",
    "CohortTrainer",
    "Footprint",
    "memory_budget",
]

Tensors = dict[str, torch.Tensor]
ProximalTerm = Callable[[Tensors, Any], Penalty]
"""``proximal(anchor, mu) -> penalty``: FedProx's term around ``anchor``."""


@dataclass(frozen=True)
class CohortResult:
    """What a cohort's local training produced, stacked along the client axis.

    Attributes
    ----------
    state : dict of str to torch.Tensor
        Trained state dicts, ``(C, ...)`` per key, in the model's key order.
    train_loss : torch.Tensor
        (C,) mean batch loss of each client's last epoch.
    num_steps : torch.Tensor
        (C,) optimiser steps each client took.
    """

    state: Tensors
    train_loss: torch.Tensor
    num_steps: torch.Tensor


def _where(active: torch.Tensor, new: Tensors, old: Tensors) -> Tensors:
    """Per client: ``new`` where ``active``, else ``old`` (an optimiser
    moment may still be its initial zero per client, ``(C,)``)."""
    out: Tensors = {}
    for key, value in old.items():
        fresh = new[key]
        trailing = (1,) * (fresh.dim() - 1)
        flag = active.reshape((-1, *trailing))
        if value.dim() < fresh.dim():
            value = value.reshape((-1, *trailing))
        out[key] = torch.where(flag, fresh, value)
    return out


class CohortTrainer:
    """Batched local training for one architecture at one set of widths.

    Parameters
    ----------
    model : nn.Module
        The architecture (its tensors are not used; each client brings its own
        state). It is copied, never modified.
    task : Task
        Loss (per example) of local training.
    cfg : ClientConfig
        The local training recipe (optimiser, epochs, batch size).
    proximal : callable, optional
        ``proximal(anchor, mu)`` building FedProx's penalty
        (:func:`fedsim.node.proximal_penalty`); needed when some ``mu > 0``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        task: Any,
        cfg: Any,
        proximal: ProximalTerm | None = None,
    ) -> None:
        self.task = task
        self.cfg = cfg
        self.proximal = proximal
        self.runner, self.mask = mask_batchnorm(model)
        self.runner.train()
        self.keys = list(self.runner.state_dict())
        self.param_keys = [
            k for k, p in self.runner.named_parameters() if p.requires_grad
        ]
        self.buffer_keys = [k for k in self.keys if k not in self.param_keys]
        self._steps: dict[tuple[bool, bool, bool, bool], Callable[..., Any]] = {}

    # -- the vmapped step ---------------------------------------------------
    def _client_step(
        self,
        params: Tensors,
        buffers: Tensors,
        opt_state: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
        lr: Any,
        anchor: Tensors | None,
        mu: Any,
        *,
        masked: bool,
    ) -> tuple[Tensors, Tensors, Tensors, torch.Tensor]:
        penalty = None
        if anchor is not None:
            assert self.proximal is not None
            penalty = self.proximal(anchor, mu)
        step = make_step(self.runner, self.task, self.cfg, penalty, transform=True)
        with self.mask.use(weight if masked else None):
            return step(params, buffers, opt_state, x, y, weight, lr)

    def _vstep(
        self, masked: bool, lr_each: bool, prox: bool, mu_each: bool
    ) -> Callable[..., Any]:
        key = (masked, lr_each, prox, mu_each)
        if key not in self._steps:

            def one(*args: Any) -> tuple[Tensors, Tensors, Tensors, torch.Tensor]:
                return self._client_step(*args, masked=masked)

            dims: tuple[int | None, ...] = (0, 0, 0, 0, 0, 0, 0 if lr_each else None)
            dims += (0 if prox else None, 0 if mu_each else None)
            self._steps[key] = vmap(one, in_dims=dims)
        return self._steps[key]

    # -- training -----------------------------------------------------------
    def train(
        self,
        states: Tensors,
        store: ClientStore,
        clients: Sequence[int],
        generators: Sequence[torch.Generator],
        *,
        lr: float | Sequence[float],
        mu: float | Sequence[float] = 0.0,
        max_chunk: int | None = None,
    ) -> CohortResult:
        """Train ``clients`` (store ids) from their stacked initial ``states``.

        The chunks' results stacked in the cohort's order (one copy of every
        trained state; :meth:`train_chunks` leaves them apart).

        Parameters
        ----------
        states : dict of str to torch.Tensor
            Every state-dict key of the model, stacked ``(C, ...)``, on the
            store's device.
        generators : sequence of torch.Generator
            Each client's own generator (its data order), in the state
            per-client training would receive it; copied, not advanced.
        lr, mu : float or sequence of float
            One value for every client, or one per client.
        max_chunk : int, optional
            Most clients trained in one batched call (default: all).
        """
        pieces = self.train_chunks(
            states, store, clients, generators, lr=lr, mu=mu, max_chunk=max_chunk
        )
        return _reassemble(pieces, len(clients))

    def train_chunks(
        self,
        states: Tensors,
        store: ClientStore,
        clients: Sequence[int],
        generators: Sequence[torch.Generator],
        *,
        lr: float | Sequence[float],
        mu: float | Sequence[float] = 0.0,
        max_chunk: int | None = None,
    ) -> list[tuple[list[int], CohortResult]]:
        """:meth:`train`, chunk by chunk: each chunk's clients (positions in
        ``clients``) and its result, not copied into one stack."""
        size = len(clients)
        if size == 0:
            raise ValueError("a cohort needs at least one client")
        lrs = [float(lr)] * size if isinstance(lr, int | float) else list(lr)
        mus = [float(mu)] * size if isinstance(mu, int | float) else list(mu)
        if len(lrs) != size or len(mus) != size:
            raise ValueError(
                f"got {len(lrs)} learning rates and {len(mus)} mu values for "
                f"{size} clients; give one value or one per client"
            )
        if any(m > 0 for m in mus) and self.proximal is None:
            raise ValueError("mu > 0 needs the proximal term; pass proximal=")
        counts = [store.count(c) for c in clients]
        batch = self.cfg.batch_size
        # clients with similar numbers of steps train in the same chunk
        order = sorted(range(size), key=lambda i: -((counts[i] + batch - 1) // batch))
        chunk = max(1, min(size, max_chunk or size))
        pieces: list[tuple[list[int], CohortResult]] = []
        at = 0
        while at < size:
            members = order[at : at + chunk]
            picked = torch.tensor(members, device=store.device)
            try:
                result = self._train_chunk(
                    {k: _pick(v, picked) for k, v in states.items()},
                    store,
                    [clients[i] for i in members],
                    [generators[i] for i in members],
                    [lrs[i] for i in members],
                    [mus[i] for i in members],
                )
            except Exception as err:
                if not is_out_of_memory(err) or chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                if store.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            pieces.append((members, result))
            at += len(members)
        return pieces

    def _train_chunk(
        self,
        states: Tensors,
        store: ClientStore,
        clients: list[int],
        generators: list[torch.Generator],
        lrs: list[float],
        mus: list[float],
    ) -> CohortResult:
        # copies: a chunk retried after running out of memory draws the same order
        plan = make_plan(
            store,
            clients,
            [_copy_generator(g) for g in generators],
            epochs=self.cfg.epochs,
            batch_size=self.cfg.batch_size,
        )
        device = store.device
        params = {k: states[k] for k in self.param_keys}
        buffers = {k: states[k].clone() for k in self.buffer_keys}
        opt_state = _stacked_optimizer_state(params, self.cfg)
        lr_each = len(set(lrs)) > 1
        lr: Any = torch.tensor(lrs, device=device) if lr_each else lrs[0]
        prox = any(m > 0 for m in mus)
        mu_each = len(set(mus)) > 1
        mu: Any = torch.tensor(mus, device=device) if mu_each else mus[0]
        anchor = params if prox else None
        return self._run_steps(plan, store, params, buffers, opt_state, lr, mu, anchor)

    def _run_steps(
        self,
        plan: CohortPlan,
        store: ClientStore,
        params: Tensors,
        buffers: Tensors,
        opt_state: Tensors,
        lr: Any,
        mu: Any,
        anchor: Tensors | None,
    ) -> CohortResult:
        lr_each = isinstance(lr, torch.Tensor)
        mu_each = isinstance(mu, torch.Tensor)
        losses = []
        for t in range(plan.num_steps):
            rows = plan.index[t]
            step = self._vstep(plan.padded[t], lr_each, anchor is not None, mu_each)
            x, y, w = _rows(store.x, rows), _rows(store.y, rows), plan.weight[t]
            if plan.all_active[t]:
                params, buffers, opt_state, loss = step(
                    params, buffers, opt_state, x, y, w, lr, anchor, mu
                )
            else:
                active = plan.active[t]
                trial = {k: v.clone() for k, v in buffers.items()}
                new_p, new_b, new_o, loss = step(
                    params, trial, opt_state, x, y, w, lr, anchor, mu
                )
                params = _where(active, new_p, params)
                buffers = _where(active, new_b, buffers)
                opt_state = _where(active, new_o, opt_state)
            losses.append(loss)
        stacked = torch.stack(losses)
        counted = torch.where(plan.last_epoch, stacked, torch.zeros_like(stacked))
        train_loss = counted.sum(dim=0) / plan.epoch_steps.to(stacked.dtype)
        merged = {**buffers, **params}
        return CohortResult(
            state={k: merged[k] for k in self.keys},
            train_loss=train_loss,
            num_steps=plan.steps,
        )

    # -- memory ---------------------------------------------------------------
    def footprint(self, sample: torch.Tensor) -> Footprint:
        """Estimated memory one client of a batched step needs
        (:func:`fedsim._cohort_memory.footprint`)."""
        return footprint(
            self.runner, self.cfg, sample, proximal=self.proximal is not None
        )


def _copy_generator(gen: torch.Generator) -> torch.Generator:
    copy_ = torch.Generator(device=gen.device)
    copy_.set_state(gen.get_state())
    return copy_


def _stacked_optimizer_state(params: Tensors, cfg: Any) -> Tensors:
    """Zero optimiser state for stacked ``params`` (one per client)."""
    size = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    single = init_optimizer_state({k: v[0] for k, v in params.items()}, cfg)
    return {
        k: torch.zeros((size, *v.shape), dtype=v.dtype, device=device)
        for k, v in single.items()
    }


def _pick(stacked: torch.Tensor, clients: torch.Tensor) -> torch.Tensor:
    """Rows ``clients`` of a stacked state; a state every client shares
    (expanded, stride 0 along clients) stays shared, not copied per client."""
    if stacked.dim() > 0 and stacked.stride(0) == 0:
        return stacked[: clients.numel()]
    return stacked.index_select(0, clients)


def _rows(data: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``data[rows]`` for a (C, B) index (index_select: much faster on CPU)."""
    picked = data.index_select(0, rows.reshape(-1))
    return picked.reshape(*rows.shape, *data.shape[1:])


def _reassemble(
    pieces: list[tuple[list[int], CohortResult]], size: int
) -> CohortResult:
    """Chunk results back in the cohort's order."""
    first = pieces[0][1]

    def gather(pick: Callable[[CohortResult], torch.Tensor]) -> torch.Tensor:
        sample = pick(first)
        out = sample.new_empty((size, *sample.shape[1:]))
        for members, result in pieces:
            where = torch.tensor(members, device=out.device)
            out.index_copy_(0, where, pick(result))
        return out

    def state_of(key: str) -> Callable[[CohortResult], torch.Tensor]:
        return lambda r: r.state[key]

    return CohortResult(
        state={k: gather(state_of(k)) for k in first.state},
        train_loss=gather(lambda r: r.train_loss),
        num_steps=gather(lambda r: r.num_steps),
    )
