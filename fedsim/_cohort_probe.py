"""Does a model train batched exactly as it trains alone? A two-client probe.

The vectorised engine batches a model only when :func:`batching_problem`
finds nothing wrong with it on a tiny cohort built from real rows, in float64
(so that float32 rounding cannot hide a difference or fake one): the task's
per-example losses and metrics must not depend on the rest of the batch, vmap
must run the training step, padding and finished clients must leave no trace,
no layer may mix the examples of a batch (beyond the BatchNorm layers the
engine masks), and no module may keep Python-side state that training
changes. Anything else falls back to per-client training.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from fedsim._cohort import CohortTrainer
from fedsim._cohort_plan import ClientStore
from fedsim.train import local_train

__all__ = ["batching_problem", "first_line"]

BATCH = 4  # the probe's batch size
RTOL, ATOL = 1e-7, 1e-9  # float64: far above rounding, far below any real change


def _float64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.is_floating_point() else t


def _rows(t: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` rows of ``t``, cycling when it has fewer."""
    reps = -(-count // max(1, int(t.shape[0])))
    return _float64(t.repeat(reps, *([1] * (t.dim() - 1)))[:count])


def batching_problem(
    model: nn.Module,
    task: Any,
    cfg: Any,
    x: torch.Tensor,
    y: torch.Tensor,
) -> str | None:
    """Why ``model`` cannot train batched exactly as it trains alone; None if it can.

    First the task: on 2 x 4 rows, the per-example losses and metrics of the
    first 4 must not change when the other 4 join their batch (the batched
    path pads batches and evaluates many clients' rows together). Then two
    clients train with batches of 4: one takes two full steps, the other one
    padded step and then sits out a step. The batched result must equal
    per-client :func:`~fedsim.train.local_train` of each, vmap must not raise,
    and no module may change a Python attribute while training (state that a
    batched step cannot keep per client). Torch's global random state is left
    as it was (models that draw from it would otherwise see other numbers in
    their real training).
    """
    with torch.random.fork_rng(devices=[]):
        return _probe(model, task, cfg, x, y)


def _probe(
    model: nn.Module, task: Any, cfg: Any, x: torch.Tensor, y: torch.Tensor
) -> str | None:
    model = copy.deepcopy(model).double()
    need = 3 * BATCH - 1
    xs, ys = _rows(x, need), _rows(y, need)
    problem = _task_problem(model, task, xs[: 2 * BATCH], ys[: 2 * BATCH])
    if problem is not None:
        return problem
    probe_cfg = dataclasses.replace(cfg, batch_size=BATCH, epochs=1)
    data = {
        0: (xs[: 2 * BATCH], ys[: 2 * BATCH]),
        1: (xs[2 * BATCH :], ys[2 * BATCH :]),
    }
    seeds = {0: 1, 1: 2}
    expected = {}
    try:
        for cid, (xc, yc) in data.items():
            gen = torch.Generator().manual_seed(seeds[cid])
            alone = copy.deepcopy(model)
            expected[cid] = local_train(alone, xc, yc, probe_cfg, task, generator=gen)
    except Exception as err:
        return f"it does not train alone on a probe batch ({first_line(err)})"
    trainer = CohortTrainer(model=model, task=task, cfg=probe_cfg)
    store = ClientStore.stack(data, device=x.device)
    initial = model.state_dict()
    states = {k: torch.stack([initial[k]] * 2) for k in trainer.keys}
    before = _python_state(trainer.runner)
    try:
        got = trainer.train(
            states,
            store,
            [0, 1],
            [torch.Generator().manual_seed(seeds[c]) for c in (0, 1)],
            lr=float(cfg.lr),
        )
    except Exception as err:
        return f"torch.func.vmap cannot train it ({first_line(err)})"
    changed = _changed_attribute(before, _python_state(trainer.runner))
    if changed is not None:
        return f"it keeps Python-side state that training changes ({changed})"
    for cid in (0, 1):
        alone_state = expected[cid].state_dict
        for key in trainer.keys:
            a, b = alone_state[key], got.state[key][cid]
            same = (
                torch.allclose(a, b, rtol=RTOL, atol=ATOL)
                if a.is_floating_point()
                else torch.equal(a, b)
            )
            if not same:
                return (
                    f"batched training changes {key!r} differently from training "
                    "alone (a layer mixes the examples of a batch, or a padded "
                    "step is not inert)"
                )
    return None


@torch.no_grad()
def _task_problem(
    model: nn.Module, task: Any, x: torch.Tensor, y: torch.Tensor
) -> str | None:
    """Whether per-example losses and metrics depend on the rest of the batch."""
    half = x.shape[0] // 2
    try:
        model.eval()
        whole, part = model(x), model(x[:half])
        pairs = [("loss", task.loss(whole, y)[:half], task.loss(part, y[:half]))]
        full_metrics, part_metrics = (
            task.metrics(whole, y),
            task.metrics(part, y[:half]),
        )
        pairs += [
            (f"metric {k!r}", v[:half], part_metrics[k])
            for k, v in full_metrics.items()
        ]
    except Exception as err:
        return f"it does not run on a probe batch ({first_line(err)})"
    finally:
        model.train()
    for what, together, alone in pairs:
        if not torch.allclose(together, alone, rtol=RTOL, atol=ATOL):
            return (
                "the task or the model mixes the examples of a batch (the "
                f"per-example {what} changes with the rest of the batch)"
            )
    return None


def first_line(err: BaseException, limit: int = 160) -> str:
    """``Type: message`` of an exception, its first line cut to ``limit`` chars."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


_SKIPPED = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def _fingerprint(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, bool | int | float | str | bytes | type(None)):
        return value
    if isinstance(value, list | tuple):
        return type(value)(_fingerprint(v) for v in value)
    if isinstance(value, dict):
        return {k: _fingerprint(v) for k, v in value.items()}
    return ("object", id(value))


def _python_state(model: nn.Module) -> dict[str, Any]:
    """Every module's plain attributes (not parameters, buffers or hooks)."""
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in _SKIPPED or "hook" in key:
                continue
            out[f"{name}.{key}" if name else key] = _fingerprint(value)
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _changed_attribute(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after or not _equal(before[key], after[key]):
            return key
    return None
