"""Cohort engine: client updates per second, per-client path against vectorized.

For each model (``mlp`` and ``cnn`` at their ``configs/model`` widths) and each
client count N, one cohort of N clients trains one round of local SGD
(``configs/client/sgd.yaml``: lr 0.05, momentum 0.9, batch 32, one epoch) on
real data: every client holds its own sample of sklearn's 8x8 digits, of a size
drawn uniformly from ``--examples`` (default 32..96, so clients differ in size
and take 1 to 3 steps). Both paths get the same clients, the same starting
state and the same torch threads (``--threads``, default 1: one client's CPU
share, which is what the per-client path gives each client):

* **per-client**: :func:`fedsim.node.train_client` for every client, one after
  another (what the ClientApp does for each train message, minus Flower);
* **vectorized**: :func:`fedsim._cohort_shard.train_shard` for the whole cohort
  (stack the starting states, batched training in memory-sized chunks,
  per-client states back on the CPU), with the client data stacked once
  beforehand as the engine caches it.

Each case runs once to warm up, then ``--repeats`` times alternating the two
paths; the medians are reported, with the largest difference between the two
paths' trained weights. Ends with one JSON line per case.

Usage::

    python benchmarks/cohort_engine.py                    # 10, 100, 1000 clients
    python benchmarks/cohort_engine.py --clients 100 --models mlp --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_clients(
    count: int, low: int, high: int, seed: int
) -> dict[int, tuple[Any, Any]]:
    """``count`` clients, each a random sample of the digits training split."""
    import torch

    from fedsim.data import load

    train = load("digits", seed=seed).train
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=gen)
    clients = {}
    for pid, size in enumerate(sizes.tolist()):
        rows = torch.randperm(len(train.y), generator=gen)[:size]
        clients[pid] = (train.x.index_select(0, rows), train.y.index_select(0, rows))
    return clients


def one_case(model: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedsim import node
    from fedsim._cohort_plan import ClientStore
    from fedsim._cohort_shard import ShardJob, train_shard, trainer_for
    from fedsim.config import compose, from_dictconfig

    exp = from_dictconfig(
        compose(
            [
                "dataset=digits",
                f"model={model}",
                "client=sgd",
                f"num_clients={count}",
                "partition=iid",
                f"client.device={args.device}",
                f"client.num_threads={args.threads}",  # what train_client sets
            ]
        )
    )
    device = torch.device(args.device)
    clients = make_clients(count, args.examples[0], args.examples[1], args.seed)
    nodes = [
        node.NodeData(
            partition_id=pid,
            x_train=x,
            y_train=y,
            x_test=x[:0],
            y_test=y[:0],
            num_classes=10,
            input_shape=(1, 8, 8),
        )
        for pid, (x, y) in clients.items()
    ]
    splits = node.load_dataset(exp)
    state = node.build_global_model(exp, splits).state_dict()
    config = {"server-round": 1}
    built = time.perf_counter()
    store = ClientStore.stack(clients, device=device)
    stack_s = time.perf_counter() - built
    trainer = trainer_for(exp, state, device)
    job = ShardJob(
        partition_ids=tuple(clients),
        rounds=(1,) * count,
        states=(state,),
        state_of=(0,) * count,
        lrs=(exp.client.lr,) * count,
        mus=(0.0,) * count,
    )

    def per_client() -> list[dict[str, Any]]:
        return [
            node.train_client(exp, n, state, server_round=1, config=config).state
            for n in nodes
        ]

    def vectorized() -> Any:
        result = train_shard(trainer, store, job, seed=exp.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result

    def timed(fn: Any) -> tuple[float, Any]:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    _, alone = timed(per_client)  # warm-up (and the reference weights)
    _, batched = timed(vectorized)
    trained = [batched.state(i) for i in range(count)]
    diff = max(
        float((trained[i][k] - alone[i][k].to(trained[i][k].dtype)).abs().max())
        for i in range(count)
        for k in alone[i]
        if alone[i][k].is_floating_point()
    )
    per_client_s, vectorized_s = [], []
    for _ in range(args.repeats):
        per_client_s.append(timed(per_client)[0])
        vectorized_s.append(timed(vectorized)[0])
    p, v = statistics.median(per_client_s), statistics.median(vectorized_s)
    steps = sum(batched.num_steps)
    return {
        "model": model,
        "clients": count,
        "per_client_s": p,
        "vectorized_s": v,
        "speedup": p / v,
        "device": str(device),
        "threads": args.threads,
        "per_client_updates_per_s": count / p,
        "vectorized_updates_per_s": count / v,
        "local_steps": steps,
        "stack_data_s": stack_s,
        "max_abs_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--examples", type=int, nargs=2, default=[32, 96])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
        for count in args.clients:
            row = one_case(model, count, args)
            rows.append(row)
            print(
                f"{model:4s} {count:5d} clients: per-client "
                f"{row['per_client_s']:.3f} s "
                f"({row['per_client_updates_per_s']:.0f} updates/s), vectorized "
                f"{row['vectorized_s']:.3f} s ({row['vectorized_updates_per_s']:.0f} "
                f"updates/s), speedup {row['speedup']:.2f}x, max |diff| "
                f"{row['max_abs_diff']:.1e}",
                flush=True,
            )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
