"""GPU check of the vectorised engine's batched training: sequential vs batched.

Trains C clients' models for S local SGD steps each (batch 32, lr 0.05,
momentum 0.9), two ways, on one device:

* **sequential**: :func:`fedsim.train.local_train` for one client after
  another (the per-client path's training loop, data already on the device);
* **batched**: :class:`fedsim._cohort.CohortTrainer` for all C at once
  (``torch.func.vmap`` over fedsim's training step), in one chunk when the
  device memory allows.

Models: ``mlp`` 784-100-10 and a small ``cnn`` (two conv3x3 + BatchNorm + ReLU
+ max-pool blocks of 16 and 32 channels, then a linear head) on 28x28 inputs;
every client holds its own random inputs, labelled by a fixed random linear
teacher. Prints both times, the speedup and the largest difference between the
two results, then one JSON line per case. The two compute the same maths (in
float64 they agree to 1e-12), but float32 rounding differences grow over many
steps: on CPU the cnn's weights drift apart by about 1e-3 after 20 steps and
1e-2 after 120, while the mlp's stay within 1e-6.

It needs torch and numpy and this repository, nothing else: no Ray, no Flower,
no Hydra (``fedsim.train`` reads its recipe by attribute and names
``fedsim.config`` only as a type).

Usage::

    python benchmarks/gpu_cohort_check.py                 # cuda; 100 and 400 clients
    python benchmarks/gpu_cohort_check.py --device cpu --clients 4 --steps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The local training recipe (the fields fedsim's training step reads)."""

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    epochs: int = 1
    batch_size: int = 32


def _fedsim_training() -> types.SimpleNamespace:
    """fedsim's training step and cohort trainer, importable without Hydra."""
    from fedsim._cohort import CohortTrainer, memory_budget
    from fedsim._cohort_plan import ClientStore
    from fedsim.tasks.classification import Classification
    from fedsim.train import local_train

    return types.SimpleNamespace(
        CohortTrainer=CohortTrainer,
        ClientStore=ClientStore,
        memory_budget=memory_budget,
        task=Classification(),
        local_train=local_train,
    )


def mlp() -> nn.Module:
    """784-100-10 with ReLU."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def cnn() -> nn.Module:
    """Two conv3x3 + BatchNorm + ReLU + max-pool blocks (16, 32), linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_case(
    name: str, clients: int, args: argparse.Namespace, fs: types.SimpleNamespace
) -> dict[str, Any]:
    device = torch.device(args.device)
    examples = min(args.examples, args.steps * args.batch)
    if (args.steps * args.batch) % examples:
        raise SystemExit(
            f"--steps={args.steps} x batch {args.batch} must be a multiple of "
            f"--examples={examples}"
        )
    recipe = Recipe(epochs=args.steps * args.batch // examples, batch_size=args.batch)
    torch.manual_seed(0)
    model = (mlp if name == "mlp" else cnn)().to(device)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(784, 10, generator=gen)  # learnable labels, stable loss
    data = {}
    for c in range(clients):
        x = torch.randn(examples, 1, 28, 28, generator=gen)
        data[c] = (x.to(device), (x.flatten(1) @ teacher).argmax(1).to(device))

    def seeds() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + c) for c in range(clients)]

    def sequential() -> list[dict[str, torch.Tensor]]:
        out = []
        for (x, y), g in zip(data.values(), seeds(), strict=True):
            result = fs.local_train(model, x, y, recipe, fs.task, generator=g)
            out.append(result.state_dict)
        sync(device)
        return out

    trainer = fs.CohortTrainer(model=model, task=fs.task, cfg=recipe)
    store = fs.ClientStore.stack(data, device=device)
    initial = model.state_dict()
    states = {
        k: initial[k].unsqueeze(0).expand(clients, *initial[k].shape)
        for k in trainer.keys
    }
    need = trainer.footprint(store.x[:8]).total
    chunk = max(1, fs.memory_budget(device, 0.5) // max(1, need))

    def batched() -> Any:
        result = trainer.train(
            states, store, list(data), seeds(), lr=recipe.lr, max_chunk=chunk
        )
        sync(device)
        return result

    def timed(fn: Any) -> tuple[float, Any]:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    _, alone = timed(sequential)  # warm-up, and the reference
    _, together = timed(batched)
    diff = max(
        float((together.state[k][c] - alone[c][k]).abs().max())
        for c in range(clients)
        for k in trainer.keys
        if alone[c][k].is_floating_point()
    )
    seq_times = [timed(sequential)[0] for _ in range(args.repeats)]
    bat_times = [timed(batched)[0] for _ in range(args.repeats)]
    seq, bat = statistics.median(seq_times), statistics.median(bat_times)
    return {
        "model": name,
        "clients": clients,
        "steps": args.steps,
        "sequential_s": seq,
        "batched_s": bat,
        "speedup": seq / bat,
        "chunk": min(chunk, clients),
        "max_abs_diff": diff,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--examples", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device=cuda but torch sees no CUDA device; use --device cpu"
        )
    fs = _fedsim_training()
    rows = []
    for name in args.models:
        for clients in args.clients:
            row = one_case(name, clients, args, fs)
            rows.append(row)
            print(
                f"{name:4s} {clients:4d} clients x {args.steps} steps on "
                f"{row['device_name']}: sequential {row['sequential_s']:.3f} s, "
                f"batched {row['batched_s']:.3f} s, speedup {row['speedup']:.1f}x, "
                f"max |diff| {row['max_abs_diff']:.1e}",
                flush=True,
            )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
