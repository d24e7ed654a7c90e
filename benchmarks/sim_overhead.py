"""Simulation overhead: fedsim's round time against the ideal, for N clients.

For each client count N the benchmark runs the same R rounds twice:

* **ideal**: every client update of every round run one after another in this
  process (``fedsim.node.train_client``, exactly what a ClientApp does): the
  median round's total, divided by the number of clients that can train in
  parallel (``min(cohort, CPUs // client CPUs)``), measured right before each
  engine's run and under the same malloc settings (:mod:`fedsim.malloc`);
* **fedsim**: a real simulation, on each engine asked for (``--engines``,
  default all three): ``flower`` is Flower's own runtime on Ray, one Ray call
  per client message; ``sharded`` calls each Ray worker once per round with all
  of its clients' messages; ``vectorized`` trains the cohort batched in this
  process and answers with the same reply messages.

It prints the ideal per-round time; fedsim's median training-phase time per
round after the first (``train_seconds``: the clients, the screening of their
replies and the strategy's aggregation; start-up excluded) and, of it, the
client phase (``client_seconds``: from sending the train messages until the
last reply is in this process); the start-up time (from the call until round 1
starts: Ray, actors, node discovery, round-0 evaluation); the ratio of the
round time to the ideal (``ratio``, the target) and of the client phase to it
(``client ratio``); the CPU seconds the whole process tree (driver, Ray daemons
and workers) uses per whole round (training, evaluation, checkpoint) and that
divided by the cores and the ideal (``cpu ratio``: what a whole round's ratio
would be with its work spread perfectly over the cores, so the work itself,
not waiting, when it is above 1.5); and the peak resident memory of the
process tree. It ends with one JSON line per N.

Usage::

    python benchmarks/sim_overhead.py --clients 10 100 --rounds 5
    python benchmarks/sim_overhead.py --clients 1000 --fraction 0.1
    python benchmarks/sim_overhead.py --clients 100 --set client.epochs=5
    python benchmarks/sim_overhead.py --gpu 0.25     # GPU check: 4 clients per GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tree_pids(root_pid: int) -> set[int]:
    """``root_pid`` and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    family, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in family:
                family.add(child)
                frontier.append(child)
    return family


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in tree_pids(root_pid):
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU time (user + system) used so far by the living process tree."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root_pid):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


class PeakMemory:
    """Samples the process tree's RSS in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(os.getpid()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(os.getpid()))


def ideal_round_seconds(exp, rounds: int, parallel: int) -> float:
    """Sequential client updates in this process, divided by the parallelism."""
    import random

    from fedsim import node
    from fedsim.strategy import StrategyContext
    from fedsim.train import derive_seed

    node.set_threads(node.client_threads(exp))
    splits = node.load_dataset(exp)
    model = node.build_global_model(exp, splits)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cohort = StrategyContext(
        num_clients=exp.num_clients, fraction_train=exp.fraction_train
    ).cohort_size()
    per_round = []
    for rnd in range(1, rounds + 1):
        random.seed(derive_seed(exp.seed, rnd, 1))
        clients = random.sample(range(exp.num_clients), cohort)
        total = 0.0
        for pid in clients:
            data = node.node_data(exp, pid)
            start = time.perf_counter()
            node.train_client(exp, data, state, server_round=rnd, config={})
            total += time.perf_counter() - start
        per_round.append(total)
    # the median round, as for fedsim's rounds (the first pays for warm-up)
    return statistics.median(per_round) / max(1, min(cohort, parallel))


def run_case(
    clients: int, rounds: int, fraction: float, cpus: int, engine: str, ideal: float
) -> dict:
    from fedsim.config import compose, from_dictconfig
    from fedsim.runner import run

    stamp = f"{clients}_{engine}_{time.time_ns()}"
    out = OUT[0] / f"sim_overhead_{stamp}"
    exp = from_dictconfig(
        compose(
            [
                *experiment_overrides(clients, rounds, fraction),
                f"simulation.engine={engine}",
                f"output_dir={out}",
            ]
        )
    )

    marks: dict[int, float] = {}
    cpu: dict[int, float] = {}
    started = time.perf_counter()

    def progress(record: dict) -> None:
        marks[int(record["round"])] = time.perf_counter()
        cpu[int(record["round"])] = tree_cpu_seconds(os.getpid())

    with PeakMemory() as memory:
        results = run(exp, progress=progress)

    def steady_median(key: str) -> float:
        times = [float(r[key]) for r in results.rounds[1:]]
        return statistics.median(times[1:] if len(times) > 1 else times)

    round_s = steady_median("train_seconds")
    client_s = steady_median("client_seconds")
    first_round_start = marks[0]
    # CPU seconds the whole process tree uses per round (rounds 2..R, each
    # whole: training, evaluation, checkpoint)
    last = max(cpu)
    cpu_round = (cpu[last] - cpu[1]) / max(1, last - 1)
    return {
        "engine": engine,
        "clients": clients,
        "cohort": len(results.rounds[1]["clients"]),
        "rounds": rounds,
        "ideal_round_s": round(ideal, 4),
        "round_s": round(round_s, 4),
        "client_s": round(client_s, 4),
        "startup_s": round(first_round_start - started, 2),
        "ratio": round(round_s / ideal, 3),
        "client_ratio": round(client_s / ideal, 3),
        "cpu_round_s": round(cpu_round, 4),
        "cpu_ratio": round(cpu_round / cpus / ideal, 3),
        "peak_rss_gib": round(memory.peak / 2**30, 3),
    }


#: extra overrides for every run (``--gpu`` adds the CUDA ones)
EXTRA: list[str] = []
#: where the runs write their results (``--out``)
OUT = [ROOT / "outputs" / "bench"]


def experiment_overrides(clients: int, rounds: int, fraction: float) -> list[str]:
    return [
        f"num_clients={clients}",
        f"num_rounds={rounds}",
        f"fraction_train={fraction}",
        "partition=iid",
        *EXTRA,
    ]


def ideal_for(clients: int, rounds: int, fraction: float, cpus: int) -> float:
    from fedsim.config import compose, from_dictconfig

    exp = from_dictconfig(compose(experiment_overrides(clients, rounds, fraction)))
    parallel = max(1, int(cpus // exp.simulation.client_resources.num_cpus))
    return ideal_round_seconds(exp, rounds, parallel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--engines", nargs="+", default=["flower", "sharded", "vectorized"]
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="further experiment overrides for every run and the ideal "
        "(e.g. client.epochs=5)",
    )
    parser.add_argument(
        "--gpu",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="train on CUDA with this GPU share per client (0.25: four clients "
        "share one GPU); the ideal runs on CUDA too",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT[0],
        help="folder for the runs' results (default: outputs/bench)",
    )
    args = parser.parse_args()
    OUT[0] = args.out
    EXTRA.extend(args.set)
    if args.gpu:
        EXTRA.extend(
            ["client.device=cuda", f"simulation.client_resources.num_gpus={args.gpu}"]
        )
    from fedsim.config import compose, from_dictconfig
    from fedsim.exceptions import ConfigError
    from fedsim.malloc import tune_this_process

    # every case's experiment is checked before anything runs or is written
    for n in args.clients:
        for engine in args.engines:
            overrides = experiment_overrides(n, args.rounds, args.fraction)
            try:
                from_dictconfig(compose([*overrides, f"simulation.engine={engine}"]))
            except ConfigError as err:
                parser.error(str(err))
    # the ideal runs under the malloc settings fedsim's runs get
    tune_this_process()
    rows = []
    for n in args.clients:
        for engine in args.engines:
            # measured right before each run: this machine's speed drifts
            ideal = ideal_for(n, args.rounds, args.fraction, args.cpus)
            rows.append(
                run_case(n, args.rounds, args.fraction, args.cpus, engine, ideal)
            )
    print()
    print(
        f"{'engine':>10} {'clients':>8} {'cohort':>7} {'ideal s/round':>14} "
        f"{'fedsim s/round':>15} {'clients s':>10} {'start-up s':>11} "
        f"{'ratio':>6} {'client ratio':>13} {'cpu s/round':>12} {'cpu ratio':>10} "
        f"{'peak GiB':>9}"
    )
    for r in rows:
        print(
            f"{r['engine']:>10} {r['clients']:>8} {r['cohort']:>7} "
            f"{r['ideal_round_s']:>14.3f} {r['round_s']:>15.3f} "
            f"{r['client_s']:>10.3f} {r['startup_s']:>11.1f} {r['ratio']:>6.2f} "
            f"{r['client_ratio']:>13.2f} {r['cpu_round_s']:>12.3f} "
            f"{r['cpu_ratio']:>10.2f} {r['peak_rss_gib']:>9.2f}"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
