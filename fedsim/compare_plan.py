"""What a ``fedsim compare`` will do (its runs and references), decided up front.

:func:`plan` reads the ``compare:`` block (``configs/config.yaml``, an experiment
file or the command line), composes every strategy x seed experiment, checks
each can start (data, partition, model and strategy are built), and looks at
the comparison folder: a run whose folder holds a completed ``results.json`` of
the same experiment is skipped, one that failed (``failure.txt``) or was killed
(``results.json`` still ``running``) is run again, and a completed run of a
different experiment is refused. Reference models are recomputed when their
file is missing or was made for another experiment or epoch count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.comparison import ReferenceRecord, run_path
from fedsim.config import (
    ExperimentConfig,
    check_group_choices,
    compose,
    from_dictconfig,
)
from fedsim.exceptions import ConfigError
from fedsim.results import RESULTS_FILE

__all__ = [
    "FAILURE_FILE",
    "REFERENCES",
    "CompareSettings",
    "Plan",
    "PlannedRun",
    "plan",
    "reference_config",
    "reference_epochs_for",
    "references_apply",
    "translate",
]

#: command-line short forms of the ``compare:`` block's keys
SHORTHANDS = {
    "strategies": "compare.strategies",
    "seeds": "compare.seeds",
    "target_accuracy": "compare.target_accuracy",
    "compare_dir": "compare.dir",
}
#: keys the comparison sets itself for every run
RESERVED = (
    "strategy",
    "seed",
    "output_dir",
    "resume",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.job.chdir",
)
SETTINGS_KEYS = (
    "strategies",
    "seeds",
    "target_accuracy",
    "dir",
    "references",
    "reference_epochs",
)
#: written into a run folder when its run raised (the run is repeated next time)
FAILURE_FILE = "failure.txt"
REFERENCES = "references"


@dataclass(frozen=True)
class CompareSettings:
    """The ``compare:`` block, validated."""

    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    target_accuracy: float
    dir: Path
    references: bool = True
    reference_epochs: int | None = None


@dataclass(frozen=True)
class PlannedRun:
    """One strategy x seed run and what the command will do with it."""

    strategy: str
    seed: int
    exp: ExperimentConfig
    action: str  # "run" (new), "rerun" (failed or killed) or "skip" (completed)
    reason: str

    @property
    def folder(self) -> Path:
        """The run folder, relative to the comparison folder."""
        return run_path(self.strategy, self.seed)


@dataclass(frozen=True)
class Plan:
    """Everything a comparison will do, decided before anything runs."""

    settings: CompareSettings
    command: tuple[str, ...]  # the overrides as given
    overrides: tuple[str, ...]  # with the short forms expanded
    runs: tuple[PlannedRun, ...]
    references: dict[int, str]  # seed -> "compute", "skip" or "n/a"

    def pending(self) -> list[PlannedRun]:
        """The runs to do (new, failed or killed)."""
        return [r for r in self.runs if r.action != "skip"]

    def describe(self) -> str:
        """The plan as ``--dry-run`` prints it."""
        lines = [f"comparison folder: {self.settings.dir}"]
        for r in self.runs:
            lines.append(f"  {r.action:<6} {r.folder!s:<32} {r.reason}")
        for seed, action in self.references.items():
            if action == "n/a":
                continue
            path = f"{REFERENCES}/seed_{seed}.json"
            lines.append(f"  {action:<6} {path:<32} reference models")
        todo = len(self.pending())
        lines.append(f"{todo} of {len(self.runs)} runs to do")
        return "\n".join(lines)


def translate(args: Sequence[str]) -> list[str]:
    """Expand the short forms and refuse the keys a comparison sets itself."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if not sep:
            raise ConfigError(
                f"cannot read {arg!r}; fedsim compare takes key=value overrides "
                "and --dry-run"
            )
        if bare in RESERVED:
            raise ConfigError(
                f"{bare}= is set by fedsim compare itself; choose the runs with "
                "strategies=[...] and seeds=[...] and the folder with compare_dir=..."
            )
        full = SHORTHANDS.get(bare, bare)
        if full.startswith("compare.") and full[8:] not in SETTINGS_KEYS:
            raise ConfigError(
                f"unknown compare setting {full[8:]!r}; choose among: "
                f"{', '.join(SETTINGS_KEYS)}"
            )
        out.append(f"{full}={value}" if bare in SHORTHANDS else arg)
    return out


def _settings(cfg: DictConfig) -> CompareSettings:
    node = cfg.get("compare")
    raw = None if node is None else OmegaConf.to_container(node, resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"compare={raw!r} is not allowed; it must be the block of settings "
            "of configs/config.yaml"
        )
    data = {str(k): v for k, v in raw.items()}
    unknown = sorted(set(data) - set(SETTINGS_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown compare setting {unknown[0]!r}; choose among: "
            f"{', '.join(SETTINGS_KEYS)}"
        )
    strategies = data.get("strategies") or []
    seeds = data.get("seeds")
    if not isinstance(strategies, list) or not strategies:
        raise ConfigError(
            f"compare.strategies={strategies!r} is not allowed; it must be a "
            "non-empty list such as [fedavg,fedprox]"
        )
    if len(set(strategies)) != len(strategies):
        raise ConfigError(f"compare.strategies={strategies} names a strategy twice")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(
            f"compare.seeds={seeds!r} is not allowed; it must be a non-empty list "
            "of distinct integers such as [0,1,2]"
        )
    target = data.get("target_accuracy")
    if not isinstance(target, int | float) or isinstance(target, bool):
        raise ConfigError(
            f"compare.target_accuracy={target!r} is not allowed; it must be a number"
        )
    epochs = data.get("reference_epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(
            f"compare.reference_epochs={epochs!r} is not allowed; it must be null "
            "or at least 1"
        )
    folder = data.get("dir")
    if folder is None:
        folder = Path("outputs/compare") / dt.datetime.now().strftime(
            "%Y-%m-%d/%H-%M-%S"
        )
    return CompareSettings(
        strategies=tuple(str(s) for s in strategies),
        seeds=tuple(seeds),
        target_accuracy=float(target),
        dir=Path(folder),
        references=bool(data.get("references", True)),
        reference_epochs=epochs,
    )


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """An experiment dict without the keys that name the run folder."""
    plain = json.loads(json.dumps(dict(config), default=list))
    for key in ("output_dir", "resume"):
        plain.pop(key, None)
    return plain


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}={old!r} there, {new!r} now"]


def _run_state(folder: Path, exp: ExperimentConfig) -> tuple[str, str]:
    results = folder / RESULTS_FILE
    failure = folder / FAILURE_FILE
    if results.is_file():
        data = json.loads(results.read_text())
        status = str(data.get("status"))
        if status == "completed":
            diff = _differences(_comparable(data["config"]), _comparable(exp.to_dict()))
            if diff:
                raise ConfigError(
                    f"{folder} holds a completed run of a different experiment "
                    f"({diff[0]}); choose another compare_dir or remove that folder"
                )
            return "skip", "completed"
        why = "killed" if status == "running" else status
        return "rerun", f"{why} (round {len(data.get('rounds', [])) - 1} reached)"
    if failure.is_file():
        last = failure.read_text().strip().splitlines()[-1:] or ["unknown error"]
        return "rerun", f"failed: {last[0]}"
    return "run", "new"


def _references_state(folder: Path, exp: ExperimentConfig, epochs: int) -> str:
    path = folder / REFERENCES / f"seed_{exp.seed}.json"
    if not path.is_file():
        return "compute"
    record = ReferenceRecord.from_json(json.loads(path.read_text()))
    fresh = record.epochs == epochs and record.config == reference_config(exp)
    return "skip" if fresh else "compute"


def reference_config(exp: ExperimentConfig) -> dict[str, Any]:
    """What the references depend on: everything but the strategy and engine."""
    plain = _comparable(exp.to_dict())
    for key in ("strategy", "simulation", "experiment"):
        plain.pop(key, None)
    return plain


def reference_epochs_for(settings: CompareSettings, exp: ExperimentConfig) -> int:
    """``compare.reference_epochs``, else :func:`fedsim.baselines.reference_epochs`."""
    from fedsim.baselines import reference_epochs

    return settings.reference_epochs or reference_epochs(exp)


def references_apply(exp: ExperimentConfig) -> bool:
    """Whether the experiment's task is classification (the references need it)."""
    from fedsim import tasks
    from fedsim.tasks.classification import Classification

    return isinstance(tasks.build(exp.task.name, **exp.task.options), Classification)


def plan(overrides: Sequence[str] = ()) -> Plan:
    """Decide every run and reference of a comparison (validates everything).

    Parameters
    ----------
    overrides : list of str
        Hydra overrides as on the command line (short forms allowed).

    Raises
    ------
    ConfigError
        For bad settings or overrides, an impossible run (checked by building
        its data, model and strategy), or a completed run of another experiment
        in the comparison folder.
    """
    from fedsim.server_app import prepare

    args = translate(overrides)
    composable = [a for a in args if not a.lstrip("+~").startswith("hydra")]
    settings = _settings(compose(composable))
    check_group_choices([f"strategy={','.join(settings.strategies)}"])
    root = settings.dir
    runs = []
    references: dict[int, str] = {}
    for strategy in settings.strategies:
        cfg = compose([*composable, f"strategy={strategy}"])
        for seed in settings.seeds:
            cfg.seed = seed  # as the override seed=<s> would (interpolations follow)
            exp = from_dictconfig(cfg)
            action, reason = _run_state(root / run_path(strategy, seed), exp)
            if action != "skip":
                prepare(exp)
            exp = dataclasses.replace(
                exp, output_dir=str(root / run_path(strategy, seed)), resume=None
            )
            runs.append(PlannedRun(strategy, seed, exp, action, reason))
            if seed not in references:
                if settings.references and references_apply(exp):
                    epochs = reference_epochs_for(settings, exp)
                    references[seed] = _references_state(root, exp, epochs)
                else:
                    references[seed] = "n/a"
    return Plan(settings, tuple(overrides), tuple(args), tuple(runs), references)
