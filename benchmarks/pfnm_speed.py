"""Speed of fedsim's PFNM matcher against the plain-loop oracle.

Run from the repository root::

    python benchmarks/pfnm_speed.py [--repeats 5] [--oracle-limit 60] [--skip-1000]

Inputs are realistic client MLPs (784-w-10): each client is a noisy copy of one
of a few "true" networks (client ``j`` copies true net ``j % 3``) with its
hidden units permuted, 20% of its units replaced by fresh random units (its own
features), and N(0, 0.01^2) noise on every weight; true and fresh weights are
N(0, 0.1^2) and biases 0.1 + N(0, 0.01^2), as the reference initialises them.
Class counts are hetero-Dirichlet (alpha 0.5) over 10 classes. PFNM runs with
the reference defaults (sigma2 = sigma0_2 = gamma = 1) and ``iters=5``.

The oracle is ``tests/fedsim/matching/pfnm_oracle.py`` (imported with the
repository root on ``sys.path``): the same formulas with the reference code's
structure (a Python loop over units to score, ``vstack`` per new atom, nested
renumbering loops). It runs in a child process and counts as not run when it
takes longer than ``--oracle-limit`` seconds.

The output ends with one JSON line per case: ``J``, ``width``, ``fast_s``
(median wall seconds), ``loop_s`` (oracle median, or null when not run),
``global_width``, and the same medians in CPU seconds (``fast_cpu_s``,
``loop_cpu_s``), the fairer numbers on a shared machine (the matcher keeps BLAS
on one thread, so CPU time is one core's busy time).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.matching.pfnm import pfnm_mlp_with_assignments  # noqa: E402
from tests.fedsim.matching.pfnm_oracle import oracle_pfnm_mlp  # noqa: E402

N_IN, N_CLASSES, N_TRUE, FRESH, NOISE = 784, 10, 3, 0.2, 0.01


def make_clients(
    n_clients: int, width: int, seed: int
) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Client nets (float32, torch layout) and their (J, K) class counts."""
    rng = np.random.default_rng(seed)

    def units(n: int) -> list[np.ndarray]:
        return [
            rng.normal(0, 0.1, (n, N_IN)),
            0.1 + rng.normal(0, 0.01, n),
            rng.normal(0, 0.1, (N_CLASSES, n)),
        ]

    true = [
        [*units(width), 0.1 + rng.normal(0, 0.01, N_CLASSES)] for _ in range(N_TRUE)
    ]
    nets = []
    for j in range(n_clients):
        w0, b0, w1, b1 = true[j % N_TRUE]
        perm = rng.permutation(width)
        w0, b0, w1 = w0[perm], b0[perm], w1[:, perm]
        own = rng.choice(width, int(FRESH * width), replace=False)
        f0, fb, f1 = units(len(own))
        w0[own], b0[own], w1[:, own] = f0, fb, f1
        net = [w0, b0, w1, b1]
        nets.append(
            [(w + rng.normal(0, NOISE, w.shape)).astype(np.float32) for w in net]
        )
    share = rng.dirichlet(np.full(n_clients, 0.5), size=N_CLASSES).T
    counts = np.floor(share * 6000).astype(np.int64)
    counts[0] += 1  # no class is empty
    return nets, counts


def fast(nets: list[list[np.ndarray]], counts: np.ndarray) -> int:
    res = pfnm_mlp_with_assignments(nets, counts, iters=5, seed=0)
    return res.widths[0]


def loop(nets: list[list[np.ndarray]], counts: np.ndarray) -> int:
    weights, _ = oracle_pfnm_mlp(nets, counts, iters=5, seed=0)
    return len(weights[1])


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds over ``repeats`` runs, and the global width."""
    wall, cpu, width = [], [], 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        width = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), width


def _oracle_child(n_clients: int, width: int, repeats: int, queue: Any) -> None:
    nets, counts = make_clients(n_clients, width, seed=n_clients + width)
    queue.put(timed(lambda: loop(nets, counts), repeats))


def oracle_within(
    n_clients: int, width: int, repeats: int, limit: float
) -> tuple[float, float, int] | None:
    """Oracle median in a child process, or None past ``limit`` seconds."""
    queue: Any = mp.get_context("fork").Queue()
    child = mp.get_context("fork").Process(
        target=_oracle_child, args=(n_clients, width, repeats, queue)
    )
    child.start()
    child.join(limit * repeats)
    if child.is_alive():
        child.terminate()
        child.join()
        return None
    if child.exitcode != 0:
        raise RuntimeError(f"the oracle run failed (exit code {child.exitcode})")
    return queue.get(timeout=10)


def _thousand_clients(queue: Any) -> None:
    nets, counts = make_clients(1000, 100, seed=1100)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fast_s, cpu_s, width = timed(lambda: fast(nets, counts), 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((fast_s, cpu_s, width, rss_before, rss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--oracle-limit", type=float, default=60.0)
    parser.add_argument("--skip-1000", action="store_true")
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()}")
    cases: list[dict[str, Any]] = []

    # head to head: J=10, 784-100-10, iters=5
    nets, counts = make_clients(10, 100, seed=110)
    fast_s, fast_cpu, width = timed(lambda: fast(nets, counts), args.repeats)
    slow = oracle_within(10, 100, 3, args.oracle_limit)
    print("\nJ=10, 784-100-10, iters=5 (medians; CPU seconds in brackets)")
    print(
        f"  fast   {fast_s:.4f} s ({fast_cpu:.4f} s CPU) over {args.repeats} runs, "
        f"global width {width}"
    )
    if slow is not None:
        print(
            f"  oracle {slow[0]:.3f} s ({slow[1]:.3f} s CPU) over 3 runs, global "
            f"width {slow[2]}"
        )
        print(
            f"  speed-up {slow[0] / fast_s:.0f}x wall, {slow[1] / fast_cpu:.0f}x CPU; "
            f"same width: {slow[2] == width}"
        )

    print("\nscaling (fast: median of 3; oracle: 1 run when under the limit)")
    print(
        f"{'J':>5} {'width':>6} {'fast_s':>8} {'fast_cpu':>9} {'loop_s':>8} "
        f"{'loop_cpu':>9} {'ratio':>6} {'global':>7}"
    )
    for n_clients in (10, 30, 100):
        for w in (100, 300):
            nets, counts = make_clients(n_clients, w, seed=n_clients + w)
            fast_s, fast_cpu, width = timed(
                lambda nets=nets, counts=counts: fast(nets, counts), 3
            )
            slow = oracle_within(n_clients, w, 1, args.oracle_limit)
            row = f"{n_clients:>5} {w:>6} {fast_s:>8.3f} {fast_cpu:>9.3f} "
            if slow is None:
                row += f"{'> limit':>8} {'-':>9} {'-':>6}"
            else:
                row += f"{slow[0]:>8.2f} {slow[1]:>9.2f} {slow[1] / fast_cpu:>5.0f}x"
            print(row + f" {width:>7}")
            cases.append(
                {
                    "J": n_clients,
                    "width": w,
                    "fast_s": round(fast_s, 4),
                    "loop_s": None if slow is None else round(slow[0], 3),
                    "global_width": width,
                    "fast_cpu_s": round(fast_cpu, 4),
                    "loop_cpu_s": None if slow is None else round(slow[1], 3),
                }
            )

    if not args.skip_1000:
        # a fresh process, so that its peak RSS is this case's alone
        spawn = mp.get_context("spawn")
        queue = spawn.Queue()
        child = spawn.Process(target=_thousand_clients, args=(queue,))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the J=1000 run failed (exit code {child.exitcode})")
        fast_s, cpu_s, width, rss_before, rss = queue.get(timeout=10)
        print(f"\nload average now {os.getloadavg()}")
        print(
            f"\nJ=1000, 784-100-10: {fast_s:.1f} s wall ({cpu_s:.1f} s CPU), global "
            f"width {width}; peak RSS {rss:.0f} MiB, {rss - rss_before:.0f} MiB "
            f"above the {rss_before:.0f} MiB held before the match (inputs included)"
        )
        cases.append(
            {
                "J": 1000,
                "width": 100,
                "fast_s": round(fast_s, 2),
                "loop_s": None,
                "global_width": width,
                "fast_cpu_s": round(cpu_s, 2),
                "loop_cpu_s": None,
            }
        )
    print()
    for case in cases:
        print(json.dumps(case))


if __name__ == "__main__":
    main()
