"""``fedsim compare``: several strategies on identical data, seeds and cohorts.

``fedsim compare strategies=[fedavg,fedprox] seeds=[0,1,2] partition=hetero_dir``
(plus any Hydra override of ``fedsim run``) runs every strategy with every
seed. For one seed, fedsim already gives every strategy the same train/test
split, partition, initial global model and clients per round (all derive from
``seed``), so the runs differ only by their strategy. The runs are a Hydra
multirun over ``strategy`` x ``seed`` whose sweep folder is the comparison
folder and whose job folders are ``runs/<strategy>/seed_<s>/``; Hydra's launcher
and sweeper (and a user's plugin config, ``hydra/launcher=...``) run them.

Then, for classification, the reference models of each seed
(:mod:`fedsim.baselines`) are trained once and cached in
``references/seed_<s>.json``, and the folder gets ``comparison.csv``,
``comparison.md`` (:mod:`fedsim.comparison`), ``accuracy_vs_round.png`` and
``accuracy_vs_bytes.png`` (:mod:`fedsim.comparison_plots`).

Repeating the command with the same ``compare_dir`` resumes: completed runs
(and fresh references) are kept, runs that failed or were killed are run again,
and a completed run made with a different experiment is refused rather than
mixed in (:mod:`fedsim.compare_plan` decides). ``--dry-run`` prints that plan
without running anything.

The settings live in the ``compare:`` block of ``configs/config.yaml`` (an
experiment file may set its own); ``strategies=``, ``seeds=``,
``target_accuracy=`` and ``compare_dir=`` are short for ``compare.strategies=``,
``compare.seeds=``, ``compare.target_accuracy=`` and ``compare.dir=``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from fedsim._multirun import hydra_multirun
from fedsim.compare_plan import (
    FAILURE_FILE,
    REFERENCES,
    Plan,
    plan,
    reference_config,
    reference_epochs_for,
)
from fedsim.comparison import (
    RUN_SUBDIR,
    ComparisonRow,
    ComparisonTable,
    ReferenceRecord,
    reference_rows,
    run_path,
    strategy_row,
)
from fedsim.config import from_dictconfig
from fedsim.exceptions import ConfigError, FedsimError
from fedsim.results import RESULTS_FILE, Results, atomic_write_text, load_results

__all__ = ["cli", "compare", "plan", "summarise"]

USAGE = """\
usage: fedsim compare [--dry-run] [strategies=[a,b,...]] [seeds=[0,1,...]]
                      [target_accuracy=0.9] [compare_dir=PATH] [overrides...]

Runs every strategy with every seed on identical partitions, initial weights and
client cohorts (a Hydra multirun), trains the reference models (local, ensemble,
central) per seed, and writes comparison.csv, comparison.md,
accuracy_vs_round.png and accuracy_vs_bytes.png to compare_dir (default
outputs/compare/<date>/<time>). Repeating the command with the same compare_dir
skips completed runs. Any `fedsim run` override applies to every run
(partition=hetero_dir model=mlp num_rounds=20 ...); experiment=compare_default
is the documented default comparison. More settings: compare.references=false,
compare.reference_epochs=N (default: a client's expected local epochs).

  --dry-run   list the runs it would do and the ones it would skip, then stop"""


def _quote(value: str) -> str:
    """A Hydra override value quoted so paths with any characters survive."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _clear(folder: Path) -> None:
    """Empty a run folder of an earlier attempt, keeping Hydra's ``.hydra``."""
    for entry in folder.iterdir():
        if entry.name == ".hydra":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _job(cfg: DictConfig) -> None:
    """Hydra's task function: one run into the job's folder (skipped if done)."""
    from hydra.core.hydra_config import HydraConfig

    from fedsim.runner import run

    folder = Path(HydraConfig.get().runtime.output_dir)
    results = folder / RESULTS_FILE
    if results.is_file() and json.loads(results.read_text())["status"] == "completed":
        print(f"fedsim compare: {folder} is complete; skipped")
        return
    _clear(folder)
    exp = from_dictconfig(cfg)
    exp = dataclasses.replace(exp, output_dir=str(folder), resume=None)
    print(f"fedsim compare: {exp.strategy.name} seed {exp.seed} -> {folder}")
    try:
        run(exp)
    except Exception as err:  # one run's failure must not stop the comparison
        atomic_write_text(folder / FAILURE_FILE, traceback.format_exc())
        print(f"fedsim compare: {folder} failed: {err}", file=sys.stderr)


def _launch(the_plan: Plan) -> None:
    """Run the plan's pending runs as one Hydra multirun over strategy x seed.

    The sweep covers the strategies and the seeds that have a pending run (all
    of them the first time); jobs whose run is already complete skip themselves.
    """
    settings = the_plan.settings
    pending = the_plan.pending()
    strategies = [
        s for s in settings.strategies if any(r.strategy == s for r in pending)
    ]
    seeds = [str(s) for s in settings.seeds if any(r.seed == s for r in pending)]
    overrides = [
        *the_plan.overrides,
        f"strategy={','.join(strategies)}",
        f"seed={','.join(seeds)}",
    ]
    try:
        hydra_multirun(
            "fedsim compare",
            overrides,
            _job,
            sweep_dir=_quote(str(settings.dir.resolve())),
            sweep_subdir=RUN_SUBDIR,
        )
    except SystemExit as stop:  # Hydra reports its own errors, then exits
        if stop.code:
            raise ConfigError(
                "Hydra's multirun stopped with an error (printed above)"
            ) from None


def _compute_references(the_plan: Plan) -> None:
    """Train and record the reference models of every seed that needs them."""
    from fedsim.baselines import (
        accuracy,
        central_model,
        ensemble_accuracy,
        train_local_models,
    )
    from fedsim.node import load_dataset

    root = the_plan.settings.dir
    for seed, action in the_plan.references.items():
        if action != "compute":
            continue
        exp = next(r.exp for r in the_plan.runs if r.seed == seed)
        epochs = reference_epochs_for(the_plan.settings, exp)
        test = load_dataset(exp).test
        started = time.perf_counter()
        local = train_local_models(exp, epochs)
        local_seconds = time.perf_counter() - started
        started = time.perf_counter()
        central = central_model(exp, epochs)
        central_seconds = time.perf_counter() - started
        record = ReferenceRecord(
            seed=seed,
            epochs=epochs,
            config=reference_config(exp),
            local_accuracy=[accuracy(m, test) for m in local],
            ensemble_accuracy=ensemble_accuracy(local, test),
            central_accuracy=accuracy(central, test),
            local_seconds=local_seconds,
            central_seconds=central_seconds,
            num_params=sum(p.numel() for p in central.parameters()),
        )
        text = json.dumps(record.to_json(), indent=2)
        atomic_write_text(root / REFERENCES / f"seed_{seed}.json", text + "\n")
        print(
            f"fedsim compare: references seed {seed} ({epochs} epochs): local "
            f"{min(record.local_accuracy):.3f}..{max(record.local_accuracy):.3f}, "
            f"ensemble {record.ensemble_accuracy:.3f}, central "
            f"{record.central_accuracy:.3f}"
        )


def _failure(folder: Path) -> str:
    """Why a run folder holds no completed run (one line)."""
    failure = folder / FAILURE_FILE
    if failure.is_file():
        lines = failure.read_text().strip().splitlines()
        return lines[-1] if lines else "failed"
    if (folder / RESULTS_FILE).is_file():
        status = json.loads((folder / RESULTS_FILE).read_text()).get("status")
        return f"status {status}"
    return "did not run"


def summarise(the_plan: Plan) -> ComparisonTable:
    """Build, write and plot the table from the folder's records."""
    from fedsim.comparison_plots import plot_comparison

    settings = the_plan.settings
    root = settings.dir
    rows: list[ComparisonRow] = []
    failed: dict[str, str] = {}
    metric = "accuracy"
    for strategy in settings.strategies:
        done: dict[int, Results] = {}
        for seed in settings.seeds:
            folder = root / run_path(strategy, seed)
            result = load_results(folder) if (folder / RESULTS_FILE).is_file() else None
            if result is not None and result.status == "completed":
                done[seed] = result
                metric = result.primary
            else:
                failed[str(run_path(strategy, seed))] = _failure(folder)
        if done:
            missing = [s for s in settings.seeds if s not in done]
            rows.append(
                strategy_row(
                    strategy,
                    done,
                    target=settings.target_accuracy,
                    missing_seeds=missing,
                )
            )
    records = [
        ReferenceRecord.from_json(
            json.loads((root / REFERENCES / f"seed_{seed}.json").read_text())
        )
        for seed, action in the_plan.references.items()
        if action != "n/a"
    ]
    rows += reference_rows(records)
    if not rows:
        raise FedsimError(f"no run of the comparison in {root} completed")
    notes = [
        f"Command: `fedsim compare {' '.join(the_plan.command)}`",
        f"Mean ± sample std over seeds {', '.join(map(str, settings.seeds))}; "
        "wall time and bytes per run (mean over seeds).",
    ]
    if records:
        notes.append(
            f"References (italic) trained {records[0].epochs} epochs with the "
            "client recipe from the runs' initial weights, on the same partitions; "
            "their wall time is the training time (all local models for the local "
            "and ensemble rows)."
        )
    table = ComparisonTable(
        rows=tuple(rows),
        metric=metric,
        target=settings.target_accuracy,
        folder=root,
        failed=failed,
        notes=tuple(notes),
    )
    table.write(root)
    plot_comparison(root, table)
    return table


def compare(config: Sequence[str] = ()) -> ComparisonTable:
    """Run a comparison and return its table (the programmatic ``fedsim compare``).

    Parameters
    ----------
    config : list of str
        Hydra overrides as on the command line, e.g. ``["strategies=[fedavg,
        fedprox]", "seeds=[0,1]", "dataset=digits", "compare_dir=out/cmp"]``.

    Returns
    -------
    ComparisonTable
        Its ``failed`` lists the runs that did not complete (repeat the call
        with the same ``compare_dir`` to retry them).
    """
    if isinstance(config, str):
        raise ConfigError(
            f"compare() takes a list of overrides, not the string {config!r}"
        )
    the_plan = plan(config)
    if the_plan.pending():
        _launch(the_plan)
    _compute_references(the_plan)
    return summarise(the_plan)


def cli(args: Sequence[str]) -> int:
    """``fedsim compare [--dry-run] [overrides...]``."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    dry_run = "--dry-run" in args
    overrides = [a for a in args if a != "--dry-run"]
    if dry_run:
        print(plan(overrides).describe())
        return 0
    table = compare(overrides)
    print(table.to_markdown())
    print(f"wrote {table.folder}")
    if table.failed:
        print(
            f"fedsim: error: {len(table.failed)} run(s) did not complete: "
            + "; ".join(f"{k} ({v})" for k, v in table.failed.items())
            + "; repeat the command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0
