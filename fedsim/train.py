"""Local training and evaluation as a pure step over (params, buffers, state, batch).

:func:`make_step` returns a function ``step(params, buffers, opt_state, x, y,
weight, lr) -> (params, buffers, opt_state, loss)`` built from
``torch.func.functional_call`` and ``torch.func.grad_and_value``, with the
optimiser update written out (SGD with momentum/Nesterov/weight decay, Adam and
AMSGrad, matching ``torch.optim`` to float precision). Nothing in it mutates
parameters, so the same step runs for one client here and, vmapped, for a whole
cohort in the vectorised engine. ``weight`` is a per-example 0/1 mask so that
padded batches of clients of different sizes can share one shape.

:func:`local_train` runs the step over a client's in-memory tensors for some
epochs (one shuffled index tensor per epoch, no per-sample Python work).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import functional_call, grad_and_value

from fedsim.tasks import Task

if TYPE_CHECKING:  # a type only: the GPU check script runs without Hydra
    from fedsim.config import ClientConfig

__all__ = [
    "Penalty",
    "TrainResult",
    "derive_seed",
    "evaluate",
    "init_optimizer_state",
    "local_train",
    "make_step",
    "optimizer_update",
    "split_state",
]

Tensors = dict[str, torch.Tensor]
Penalty = Callable[[Tensors], torch.Tensor]
"""A regulariser of the trainable parameters added to the batch loss."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, round, client, ...)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def split_state(model: torch.nn.Module) -> tuple[Tensors, Tensors]:
    """Detached copies of (trainable parameters, everything else in the state dict).

    Frozen parameters (``requires_grad=False``) travel with the buffers, so the
    step neither differentiates nor updates them.
    """
    trainable = {
        k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad
    }
    rest = {
        k: v.detach().clone()
        for k, v in model.state_dict(keep_vars=True).items()
        if k not in trainable
    }
    return trainable, rest


def init_optimizer_state(params: Tensors, cfg: ClientConfig) -> Tensors:
    """Zero optimiser state for ``params`` (flat dict, vmappable).

    Every moment buffer starts as a 0-d zero of the parameter's dtype, which
    the first step broadcasts to the parameter's shape: the same values as a
    zero tensor of that shape, without allocating and reading one (a
    cohort's stacked buffers are tens of MB).
    """
    dtype = next(iter(params.values())).dtype if params else torch.float32
    state: Tensors = {"step": torch.zeros((), dtype=dtype)}
    for key, p in params.items():
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        if cfg.optimizer == "sgd":
            if cfg.momentum > 0:
                state[f"momentum.{key}"] = zero
        else:
            state[f"exp_avg.{key}"] = zero
            state[f"exp_avg_sq.{key}"] = zero
            if cfg.amsgrad:
                state[f"max_exp_avg_sq.{key}"] = zero
    return state


def optimizer_update(
    params: Tensors,
    grads: Tensors,
    state: Tensors,
    cfg: ClientConfig,
    lr: float | torch.Tensor,
) -> tuple[Tensors, Tensors]:
    """One optimiser step, written out functionally (same maths as torch.optim).

    The first SGD-momentum step gives the buffer the gradient itself, as
    ``torch.optim.SGD`` does: the buffer starts at zero (a 0-d zero, see
    :func:`init_optimizer_state`), so ``g + momentum * 0`` is ``g`` with no
    per-client branch (a ``torch.where`` over every weight, a fifth of a
    vmapped cohort step). ``grads`` may be modified in place.
    """
    step = state["step"] + 1
    new_params: Tensors = {}
    new_state: Tensors = {"step": step}
    for key, p in params.items():
        g = grads[key]
        if cfg.weight_decay:
            g = torch.add(g, p, alpha=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            if cfg.momentum > 0:
                old = state[f"momentum.{key}"]
                if cfg.nesterov:  # needs the gradient itself once more
                    buf = torch.add(g, old, alpha=cfg.momentum)
                    g = torch.add(g, buf, alpha=cfg.momentum)
                else:  # into the gradient, a fresh tensor nothing else holds
                    buf = g = g.add_(old, alpha=cfg.momentum)
                new_state[f"momentum.{key}"] = buf
            # one kernel when the rate is a number (per client); vmapped cohorts
            # pass a tensor of rates
            if isinstance(lr, torch.Tensor):
                new_params[key] = p - lr * g
            else:
                new_params[key] = torch.add(p, g, alpha=-lr)
            continue
        beta1, beta2 = cfg.betas
        m = beta1 * state[f"exp_avg.{key}"] + (1 - beta1) * g
        v = beta2 * state[f"exp_avg_sq.{key}"] + (1 - beta2) * g * g
        new_state[f"exp_avg.{key}"] = m
        new_state[f"exp_avg_sq.{key}"] = v
        if cfg.amsgrad:
            v = torch.maximum(state[f"max_exp_avg_sq.{key}"], v)
            new_state[f"max_exp_avg_sq.{key}"] = v
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = (v.sqrt() / bias2.sqrt()) + cfg.eps
        new_params[key] = p - (lr / bias1) * m / denom
    return new_params, new_state


def make_step(
    model: torch.nn.Module,
    task: Task,
    cfg: ClientConfig,
    penalty: Penalty | None = None,
    *,
    transform: bool = False,
) -> Callable[..., tuple[Tensors, Tensors, Tensors, torch.Tensor]]:
    """The pure training step for ``model`` under ``task`` and ``cfg``.

    Parameters
    ----------
    transform : bool
        Differentiate with ``torch.func.grad_and_value`` (composable with
        ``vmap``; the vectorised engine) instead of ``torch.autograd.grad`` on
        fresh leaves. Both differentiate the same loss function and give the
        same gradients; the autograd route costs about a fifth of the
        per-step Python overhead for one client.

    Returns
    -------
    callable
        ``step(params, buffers, opt_state, x, y, weight, lr)`` returning the new
        ``(params, buffers, opt_state, loss)``. Buffers that the forward pass
        updates (BatchNorm statistics) are updated in place on ``buffers``.
    """

    def loss_fn(
        params: Tensors,
        buffers: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        output = functional_call(model, {**params, **buffers}, (x,))
        per_example = task.loss(output, y)
        loss = (per_example * weight).sum() / weight.sum().clamp_min(1.0)
        if penalty is not None:
            loss = loss + penalty(params)
        return loss

    def autograd_fn(
        params: Tensors,
        buffers: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[Tensors, torch.Tensor]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = loss_fn(leaves, buffers, x, y, weight)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {
            k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(leaves.items(), grads, strict=True)
        }, loss.detach()

    grad_fn = grad_and_value(loss_fn) if transform else autograd_fn

    def step(
        params: Tensors,
        buffers: Tensors,
        opt_state: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        weight: torch.Tensor,
        lr: float | torch.Tensor,
    ) -> tuple[Tensors, Tensors, Tensors, torch.Tensor]:
        grads, loss = grad_fn(params, buffers, x, y, weight)
        new_params, new_state = optimizer_update(params, grads, opt_state, cfg, lr)
        return new_params, buffers, new_state, loss

    return step


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training produced."""

    state_dict: dict[str, torch.Tensor]
    train_loss: float  # mean batch loss over the last epoch
    num_steps: int
    num_examples: int


def local_train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: ClientConfig,
    task: Task,
    *,
    generator: torch.Generator,
    lr: float | None = None,
    penalty: Penalty | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``(x, y)`` for ``cfg.epochs`` epochs and return its state.

    The model object itself is left unchanged; the trained weights are returned
    as a state dict in the model's key order. Batches are drawn from one
    ``torch.randperm`` per epoch using ``generator`` (the client's own seed).
    ``before_step`` / ``after_step`` run around every step (AOFP's probes).
    """
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("a client with no training examples cannot train")
    model.train()
    device = x.device
    params, buffers = split_state(model)
    opt_state = {k: v.to(device) for k, v in init_optimizer_state(params, cfg).items()}
    step = make_step(model, task, cfg, penalty)
    rate = cfg.lr if lr is None else lr
    losses: list[torch.Tensor] = []
    steps = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        losses = []
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            weight = torch.ones(len(idx), dtype=x.dtype, device=device)
            if before_step is not None:
                before_step()
            params, buffers, opt_state, loss = step(
                params, buffers, opt_state, xb, yb, weight, rate
            )
            if after_step is not None:
                after_step()
            losses.append(loss.detach())
            steps += 1
    merged = {**buffers, **params}
    state = {k: merged[k] for k in model.state_dict()}
    return TrainResult(
        state_dict=state,
        train_loss=float(torch.stack(losses).mean()),
        num_steps=steps,
        num_examples=n,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Task,
    *,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean of the task's per-example metrics over ``(x, y)``, in eval mode."""
    model.eval()
    totals: dict[str, float] = {}
    n = int(x.shape[0])
    for start in range(0, n, batch_size):
        out = model(x[start : start + batch_size])
        for key, values in task.metrics(out, y[start : start + batch_size]).items():
            totals[key] = totals.get(key, 0.0) + float(values.sum())
    return {k: v / max(n, 1) for k, v in totals.items()}
