"""The ``fedsim`` command line (composition root).

``fedsim run [overrides...]``
    One experiment; ``-m``/``--multirun`` sweeps comma-separated values with
    Hydra's launcher (``fedsim run -m strategy=fedavg,fedprox seed=0,1``).
``fedsim plot <run folder>``
    Redraw a run's (or a comparison's) figures from its records.

Bad input prints one sentence naming the value and the choices and exits with
status 2; no traceback, no half-written output folder.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedsim.exceptions import FedsimError

__all__ = ["main"]

USAGE = """\
usage: fedsim <command> [options]

commands:
  run [overrides...]       run one experiment (-m to sweep values; --help for options)
  compare [overrides...]   run several strategies on identical data and cohorts
  plot <folder>            redraw the figures of a run or comparison folder
  sample <run folder>      draw samples from a trained density model (PNG grid)
  certs <dir>              create TLS certificates and SuperNode keys for deployment
  nas [overrides...]       NAS-Bench-101 random search: train sampled cells, rank them
  oneshot [overrides...]   one-shot PFNM table (PFNM, FedAvg, ensemble, local, central)

`fedsim <command> --help` describes each command."""


def _fail(message: str) -> int:
    print(f"fedsim: error: {message}", file=sys.stderr)
    return 2


def _run_help() -> str:
    from fedsim.config import GROUPS, group_options

    lines = [
        "usage: fedsim run [-m] [group=option ...] [key=value ...]",
        "",
        "Runs one federated experiment (Flower strategies, Ray-simulated clients)",
        "and writes results.json, metrics.csv and plots to output_dir.",
        "",
        "config groups (choose one option each, e.g. strategy=fedprox):",
    ]
    for group in GROUPS:
        options = group_options(group)
        if options:
            lines.append(f"  {group:<11} {', '.join(options)}")
    lines += [
        "",
        "run-level keys (defaults in configs/config.yaml):",
        "  seed=0 num_clients=10 num_rounds=10 fraction_train=1.0",
        "  fraction_evaluate=1.0 output_dir=null resume=null",
        "",
        "group options are set with dots: partition.alpha=0.1 client.lr=0.01",
        "model.hidden=[100] simulation.client_resources.num_cpus=1",
        "Every option is documented in its YAML file under configs/<group>/.",
        "",
        "flags:",
        "  -m, --multirun   sweep: strategy=fedavg,fedprox seed=0,1 runs 4 jobs",
        "  --cfg            print the composed config and exit",
    ]
    return "\n".join(lines)


def _cmd_run(args: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(_run_help())
        return 0
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun", "--cfg")]
    from fedsim.config import check_group_choices, compose, from_dictconfig

    if multirun:
        check_group_choices(overrides)
        return _hydra_multirun(overrides)
    resume = [o for o in overrides if o.startswith("resume=")]
    if resume:
        return _resume(resume[0].split("=", 1)[1], overrides)
    cfg = compose(overrides)
    if "--cfg" in args:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg))
        return 0
    from fedsim.runner import run

    results = run(from_dictconfig(cfg))
    _print_summary(results)
    return 0


def _resume(folder: str, overrides: Sequence[str]) -> int:
    """``fedsim run resume=<run> [num_rounds=N]``: continue a stopped run."""
    from fedsim.exceptions import ConfigError
    from fedsim.runner import resume

    num_rounds = None
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "num_rounds":
            num_rounds = int(value)
        elif key != "resume":
            raise ConfigError(
                f"resume continues a run with its stored config; {key!r} cannot "
                "change (only num_rounds can, to extend the run)"
            )
    _print_summary(resume(folder, num_rounds=num_rounds))
    return 0


def _hydra_multirun(overrides: Sequence[str]) -> int:
    """Sweep with Hydra's own multirun launcher; one output folder per job."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from fedsim._multirun import hydra_multirun
    from fedsim.config import from_dictconfig
    from fedsim.runner import run

    failures: list[str] = []

    def job(cfg: DictConfig) -> None:
        folder = HydraConfig.get().runtime.output_dir
        exp = from_dictconfig(cfg)
        import dataclasses

        try:
            results = run(dataclasses.replace(exp, output_dir=exp.output_dir or folder))
            _print_summary(results)
        except FedsimError as err:
            failures.append(str(err))
            print(f"fedsim: error: {err}", file=sys.stderr)

    hydra_multirun(
        "fedsim run",
        overrides,
        job,
        sweep_dir="multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}",
        sweep_subdir="${hydra.job.num}_${hydra.job.override_dirname}",
    )
    return 2 if failures else 0


def _print_summary(results: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedsim.results import Results

    assert isinstance(results, Results)
    final = results.final
    table = Table(title=f"fedsim run: {results.output_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in final.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        else:
            table.add_row(key, str(value))
    Console().print(table)


def _cmd_plot(args: Sequence[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: fedsim plot <folder>\n\nRedraws the figures of a run folder "
            "(results.json) or of a comparison folder (comparison.csv) from its "
            "records."
        )
        return 0 if args else 2
    from fedsim.results import RESULTS_FILE, load_results

    folder = Path(args[0])
    if (folder / "comparison.csv").is_file():
        from fedsim.comparison_plots import plot_comparison

        plot_comparison(folder)
        print(f"redrew the comparison figures in {folder}")
        return 0
    if not (folder / RESULTS_FILE).is_file():
        return _fail(f"{str(folder)!r} is not a fedsim run folder (no {RESULTS_FILE})")
    results = load_results(folder)
    results.write_csv()
    results.plot()
    print(f"redrew the figures in {folder}")
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int] | str] = {
    "run": _cmd_run,
    "plot": _cmd_plot,
    # commands living in their own modules, each exposing `cli(args) -> int`
    "compare": "fedsim.compare_runner",
    "sample": "fedsim.sample",
    "certs": "fedsim.certs",
    "nas": "fedsim.nas_search",
    "oneshot": "fedsim.oneshot",
}


def _resolve(
    command: Callable[[Sequence[str]], int] | str,
) -> Callable[[Sequence[str]], int]:
    if callable(command):
        return command
    import importlib

    module = importlib.import_module(command)
    entry: Callable[[Sequence[str]], int] = module.cli
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsim`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        return _fail(
            f"unknown command {args[0]!r}; choose one of: {', '.join(COMMANDS)}"
        )
    try:
        return _resolve(command)(args[1:])
    except FedsimError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())
