"""One experiment end to end (composition root); ``fedsim.run`` calls :func:`run`.

Everything that can fail on bad input (unknown names, an impossible partition,
a model that does not fit the data) fails in :func:`~fedsim.server_app.prepare`,
before the output folder is created, so bad input never leaves a half-written
folder behind.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedsim import tasks
from fedsim.config import ExperimentConfig, compose, from_dictconfig
from fedsim.data import DataSplits
from fedsim.exceptions import ConfigError
from fedsim.malloc import tune_this_process
from fedsim.results import RESULTS_FILE, Results, load_results

__all__ = ["open_results", "print_progress", "resolve_output_dir", "resume", "run"]


def resolve_output_dir(exp: ExperimentConfig) -> Path:
    """The run folder: ``output_dir`` or a new timestamped one under ``outputs/``."""
    if exp.output_dir:
        path = Path(exp.output_dir)
        if (path / RESULTS_FILE).exists():
            raise ConfigError(
                f"output_dir={str(path)!r} already holds a run; choose another folder "
                "or remove it"
            )
        return path
    stamp = dt.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    base = Path("outputs") / stamp
    path, n = base, 1
    while path.exists():
        path = Path(f"{base}-{n}")
        n += 1
    return path


def open_results(exp: ExperimentConfig, splits: DataSplits) -> Results:
    """Create the run folder and an empty ``results.json``."""
    task = tasks.build(exp.task.name, **exp.task.options)
    folder = resolve_output_dir(exp)
    folder.mkdir(parents=True, exist_ok=True)
    results = Results(
        output_dir=folder,
        config=exp.to_dict(),
        primary=task.primary,
        higher_is_better=task.higher_is_better,
    )
    results.extra["dataset"] = {
        "train_examples": len(splits.train),
        "test_examples": len(splits.test),
        "num_classes": splits.num_classes,
        "input_shape": list(splits.input_shape),
    }
    results.save()
    return results


def print_progress(exp: ExperimentConfig) -> Callable[[dict[str, Any]], None]:
    """A per-round progress printer (one line per round, rich-formatted)."""
    from rich.console import Console

    console = Console(stderr=False, highlight=False, soft_wrap=True)
    started = time.perf_counter()

    def show(record: dict[str, Any]) -> None:
        rnd = int(record["round"])
        parts = [f"[bold]round {rnd:>3}/{exp.num_rounds}[/bold]"]
        for key, value in record.items():
            if key.startswith("test_") and isinstance(value, float):
                parts.append(f"{key[5:]} {value:.4f}")
        if "train_loss" in record:
            parts.append(f"train_loss {record['train_loss']:.4f}")
        if rnd > 0:
            parts.append(f"replies {record.get('num_replies', 0)}")
            failed = record.get("num_failures", 0) + record.get("num_timeouts", 0)
            if failed or record.get("num_rejected"):
                rejected = record.get("num_rejected", 0)
                parts.append(f"[red]failed {failed} rejected {rejected}[/red]")
            parts.append(f"{record.get('round_seconds', 0.0):.1f} s")
        parts.append(f"[dim](elapsed {time.perf_counter() - started:.0f} s)[/dim]")
        console.print("  ".join(parts))

    return show


def run(
    config: ExperimentConfig | DictConfig | Sequence[str] = (),
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Results:
    """Run one experiment and return its :class:`~fedsim.results.Results`.

    Parameters
    ----------
    config : ExperimentConfig, DictConfig or list of str
        The experiment, a composed Hydra config, or Hydra overrides of
        ``configs/config.yaml`` (``["strategy=fedprox", "num_rounds=5"]``).
        An experiment with ``resume`` set continues that run (see :func:`resume`).
    progress : callable, optional
        Called with each round's record; defaults to a printed line per round.
    """
    from fedsim.server_app import prepare
    from fedsim.simulation import quiet

    if isinstance(config, ExperimentConfig):
        exp = config
    elif isinstance(config, DictConfig):
        exp = from_dictconfig(config)
    else:
        exp = from_dictconfig(compose(list(config)))
    if exp.resume:
        return resume(exp.resume, progress=progress)
    quiet(exp.simulation.ray_log_level)
    prepared = prepare(exp)
    results = open_results(exp, prepared.splits)
    return _execute(exp, prepared, results, progress or print_progress(exp), None)


def resume(
    folder: str | Path,
    *,
    num_rounds: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Results:
    """Continue the run in ``folder`` from its last completed round.

    The stored config is used as it was; ``num_rounds`` may extend the run.
    """
    from fedsim.checkpoint import load_checkpoint
    from fedsim.config import experiment_from_dict
    from fedsim.server_app import prepare
    from fedsim.simulation import quiet

    path = Path(folder)
    if not (path / RESULTS_FILE).is_file():
        raise ConfigError(
            f"resume={str(path)!r} is not a fedsim run folder (no {RESULTS_FILE})"
        )
    stored = load_results(path)
    exp = experiment_from_dict(stored.config)
    exp = dataclasses.replace(
        exp,
        output_dir=str(path),
        resume=None,
        num_rounds=exp.num_rounds if num_rounds is None else num_rounds,
    )
    ckpt = load_checkpoint(path)
    if ckpt.server_round >= exp.num_rounds:
        raise ConfigError(
            f"the run in {str(path)!r} already finished round {ckpt.server_round} of "
            f"num_rounds={exp.num_rounds}; pass a larger num_rounds to extend it"
        )
    quiet(exp.simulation.ray_log_level)
    prepared = prepare(exp)
    stored.config = exp.to_dict()
    return _execute(exp, prepared, stored, progress or print_progress(exp), ckpt)


def _execute(
    exp: ExperimentConfig,
    prepared: Any,
    results: Results,
    progress: Callable[[dict[str, Any]], None],
    resume_from: Any,
) -> Results:
    """Run the server loop on the experiment's engine; mark failures in results."""
    from clients.client_app import build_client_app
    from fedsim.server import ServerLoop
    from fedsim.server_app import build_server_app
    from fedsim.simulation import run_simulation

    # this process decodes and aggregates every reply (and, in the in-process
    # and vectorized engines, trains the clients): fedsim's malloc settings
    tune_this_process()
    try:
        if exp.simulation.engine != "flower":
            grid = _engine_grid(exp, build_client_app(exp))
            loop = ServerLoop(
                exp,
                prepared.strategy,
                prepared.splits,
                prepared.model,
                results,
                progress=progress,
                resume_from=resume_from,
            )
            try:
                loop.run(grid)
            finally:
                close = getattr(grid, "close", None)
                if close is not None:
                    close()
        else:
            server_app = build_server_app(
                exp,
                prepared=prepared,
                results=results,
                progress=progress,
                resume_from=resume_from,
            )
            run_simulation(server_app, build_client_app(exp), exp)
    except BaseException:
        if results.status == "running":
            results.finish("failed")
        raise
    if results.status == "running":
        results.finish("failed")
        raise RuntimeError("the simulation ended before the server loop finished")
    return results


def _engine_grid(exp: ExperimentConfig, app: Any) -> Any:
    """The Grid of an engine other than Flower's own runtime."""
    if exp.simulation.engine == "vectorized":
        from fedsim.vectorized import VectorizedGrid

        return VectorizedGrid(app, exp)
    if exp.simulation.engine == "sharded":
        from fedsim.sharded import ShardedGrid

        return ShardedGrid(app, exp)
    from fedsim.inprocess import InProcessGrid

    return InProcessGrid(app, exp.num_clients)
