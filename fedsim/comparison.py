"""The comparison table: one row per strategy (over seeds) and per reference model.

``fedsim compare`` runs every strategy with every seed and summarises the run
records (``results.json``) here. A strategy row holds, over its seeds:

* the final and the best test metric (mean and sample standard deviation,
  ``ddof=1``; no standard deviation for a single seed),
* the rounds to reach the target (first evaluated round whose metric reaches
  it, averaged over the seeds that reached it; how many did is kept too),
* the wall time of a run (the sum of its rounds' ``round_seconds``: training,
  aggregation and evaluation, without process or Ray start-up), mean over seeds,
* the array bytes the server sent and received over the run (counted from the
  actual messages by :class:`fedsim.grid.FedsimGrid`), mean over seeds,
* the final global model's parameter count (matching strategies can grow it).

Reference rows (local models, their ensemble, a central model; see
:mod:`fedsim.baselines`) come from :class:`ReferenceRecord` files, one per seed.

The table is written as ``comparison.csv`` (full precision, read back by
:meth:`ComparisonTable.read_csv`) and ``comparison.md`` (rounded, for papers
and READMEs).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedsim.results import Results, atomic_write_text, rows_to_markdown

__all__ = [
    "CENTRAL",
    "CSV_FILE",
    "ENSEMBLE",
    "LOCAL_BEST",
    "LOCAL_MEAN",
    "MARKDOWN_FILE",
    "RUN_SUBDIR",
    "ComparisonRow",
    "ComparisonTable",
    "ReferenceRecord",
    "mean_std",
    "reference_rows",
    "rounds_to_target",
    "run_path",
    "strategy_row",
]

CSV_FILE = "comparison.csv"
MARKDOWN_FILE = "comparison.md"

#: Hydra's ``hydra.sweep.subdir`` for a comparison's runs (see :func:`run_path`)
RUN_SUBDIR = "runs/${strategy.name}/seed_${seed}"


def run_path(strategy: str, seed: int) -> Path:
    """A run's folder inside the comparison folder (what :data:`RUN_SUBDIR` makes)."""
    return Path("runs") / strategy / f"seed_{seed}"


#: names of the reference rows, in table order
LOCAL_MEAN = "local models (mean over clients)"
LOCAL_BEST = "local models (best client)"
ENSEMBLE = "uniform ensemble of local models"
CENTRAL = "central model (union of client data)"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``; ``None`` for one value)."""
    if not values:
        raise ValueError("mean_std needs at least one value, got none")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def rounds_to_target(
    series: Sequence[tuple[int, float]], target: float, higher_is_better: bool = True
) -> int | None:
    """First round whose value reaches ``target`` (``None`` if none does)."""
    for rnd, value in series:
        if (value >= target) if higher_is_better else (value <= target):
            return rnd
    return None


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the table; ``None`` where a column does not apply."""

    name: str
    kind: str  # "strategy" or "reference"
    seeds: tuple[int, ...]
    final_mean: float
    final_std: float | None = None
    best_mean: float | None = None
    best_std: float | None = None
    rounds_to_target: float | None = None
    reached_target: int | None = None
    wall_seconds: float | None = None
    bytes_sent: float | None = None
    bytes_received: float | None = None
    num_params: int | None = None
    missing_seeds: tuple[int, ...] = ()


def strategy_row(
    name: str,
    runs: Mapping[int, Results],
    *,
    target: float,
    missing_seeds: Sequence[int] = (),
) -> ComparisonRow:
    """Summarise one strategy's completed runs (``runs[seed]``) as a row."""
    if not runs:
        raise ValueError(f"strategy {name!r} has no completed run to summarise")
    finals: list[float] = []
    bests: list[float] = []
    reached: list[int] = []
    first = next(iter(runs.values()))
    key = f"test_{first.primary}"
    for result in runs.values():
        series = result.metric(key)
        if not series:
            raise ValueError(f"{result.output_dir} has no {key} record")
        values = [v for _, v in series]
        finals.append(values[-1])
        bests.append(max(values) if result.higher_is_better else min(values))
        hit = rounds_to_target(series, target, result.higher_is_better)
        if hit is not None:
            reached.append(hit)
    final_mean, final_std = mean_std(finals)
    best_mean, best_std = mean_std(bests)
    last = [r.rounds[-1] for r in runs.values()]
    return ComparisonRow(
        name=name,
        kind="strategy",
        seeds=tuple(sorted(runs)),
        final_mean=final_mean,
        final_std=final_std,
        best_mean=best_mean,
        best_std=best_std,
        rounds_to_target=mean_std(reached)[0] if reached else None,
        reached_target=len(reached),
        wall_seconds=mean_std([float(r.final["total_seconds"]) for r in runs.values()])[
            0
        ],
        bytes_sent=mean_std([float(r.final["bytes_sent"]) for r in runs.values()])[0],
        bytes_received=mean_std(
            [float(r.final["bytes_received"]) for r in runs.values()]
        )[0],
        num_params=max(int(rec["num_params"]) for rec in last),
        missing_seeds=tuple(sorted(missing_seeds)),
    )


@dataclass(frozen=True)
class ReferenceRecord:
    """The reference models of one seed (``references/seed_<s>.json``).

    Attributes
    ----------
    seed : int
        The experiment seed (same data split, partition and initial model as
        the federated runs of that seed).
    epochs : int
        Training epochs of each local model and of the central model.
    config : dict
        The experiment the references were made for (to detect stale files).
    local_accuracy : list of float
        Test accuracy of each client's local model, by partition id.
    ensemble_accuracy : float
        Test accuracy of the uniform softmax ensemble of the local models.
    central_accuracy : float
        Test accuracy of the central model.
    local_seconds, central_seconds : float
        Training wall time of all local models, and of the central model.
    num_params : int
        Parameters of one model.
    """

    seed: int
    epochs: int
    config: dict[str, Any]
    local_accuracy: list[float]
    ensemble_accuracy: float
    central_accuracy: float
    local_seconds: float
    central_seconds: float
    num_params: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReferenceRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def reference_rows(records: Sequence[ReferenceRecord]) -> list[ComparisonRow]:
    """The four reference rows, each a mean (and std) over the seeds' records."""
    if not records:
        return []
    seeds = tuple(sorted(r.seed for r in records))
    local_seconds = mean_std([r.local_seconds for r in records])[0]
    params = records[0].num_params
    num_clients = len(records[0].local_accuracy)

    def row(name: str, values: list[float], seconds: float, size: int) -> ComparisonRow:
        mean, std = mean_std(values)
        return ComparisonRow(
            name=name,
            kind="reference",
            seeds=seeds,
            final_mean=mean,
            final_std=std,
            wall_seconds=seconds,
            num_params=size,
        )

    return [
        row(
            LOCAL_MEAN,
            [sum(r.local_accuracy) / len(r.local_accuracy) for r in records],
            local_seconds,
            params,
        ),
        row(
            LOCAL_BEST, [max(r.local_accuracy) for r in records], local_seconds, params
        ),
        row(
            ENSEMBLE,
            [r.ensemble_accuracy for r in records],
            local_seconds,
            num_clients * params,
        ),
        row(
            CENTRAL,
            [r.central_accuracy for r in records],
            mean_std([r.central_seconds for r in records])[0],
            params,
        ),
    ]


_COLUMNS = (
    "name",
    "kind",
    "metric",
    "target",
    "seeds",
    "missing_seeds",
    "final_mean",
    "final_std",
    "best_mean",
    "best_std",
    "rounds_to_target",
    "reached_target",
    "wall_seconds",
    "bytes_sent",
    "bytes_received",
    "num_params",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _seeds(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split())


def _float(text: str) -> float | None:
    return float(text) if text else None


def _int(text: str) -> int | None:
    return int(text) if text else None


@dataclass(frozen=True)
class ComparisonTable:
    """Rows of a comparison, plus how they were made.

    Attributes
    ----------
    rows : tuple of ComparisonRow
        Strategies first (in the order they were asked for), then references.
    metric : str
        The task's primary metric (``accuracy`` for classification).
    target : float
        The target value of ``rounds_to_target``.
    folder : Path or None
        Where the table was written.
    failed : dict
        Run folders (relative to ``folder``) that did not complete, with why.
    notes : tuple of str
        Lines printed under the markdown table (how it was made).
    """

    rows: tuple[ComparisonRow, ...]
    metric: str = "accuracy"
    target: float = 0.0
    folder: Path | None = None
    failed: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def row(self, name: str) -> ComparisonRow:
        """The row called ``name``."""
        for row in self.rows:
            if row.name == name:
                return row
        names = ", ".join(r.name for r in self.rows)
        raise KeyError(f"no row {name!r} in the comparison; rows: {names}")

    def to_csv(self) -> str:
        """Every column at full precision (empty where it does not apply)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_COLUMNS)
        for row in self.rows:
            values = {**asdict(row), "metric": self.metric, "target": self.target}
            writer.writerow([_cell(values[c]) for c in _COLUMNS])
        return buf.getvalue()

    @classmethod
    def read_csv(cls, path: str | Path) -> ComparisonTable:
        """Read a ``comparison.csv`` written by :meth:`write`."""
        path = Path(path)
        with path.open(newline="") as fh:
            records = list(csv.DictReader(fh))
        rows = tuple(
            ComparisonRow(
                name=r["name"],
                kind=r["kind"],
                seeds=_seeds(r["seeds"]),
                final_mean=float(r["final_mean"]),
                final_std=_float(r["final_std"]),
                best_mean=_float(r["best_mean"]),
                best_std=_float(r["best_std"]),
                rounds_to_target=_float(r["rounds_to_target"]),
                reached_target=_int(r["reached_target"]),
                wall_seconds=_float(r["wall_seconds"]),
                bytes_sent=_float(r["bytes_sent"]),
                bytes_received=_float(r["bytes_received"]),
                num_params=_int(r["num_params"]),
                missing_seeds=_seeds(r["missing_seeds"]),
            )
            for r in records
        )
        metric = records[0]["metric"] if records else "accuracy"
        target = float(records[0]["target"]) if records else 0.0
        return cls(rows=rows, metric=metric, target=target, folder=path.parent)

    def to_markdown(self) -> str:
        """A GitHub-flavoured table, rounded for reading."""
        header = [
            "strategy",
            f"final {self.metric}",
            f"best {self.metric}",
            f"rounds to {self.target:g}",
            "wall time (s)",
            "sent (MB)",
            "received (MB)",
            "parameters",
        ]
        body = []
        for row in self.rows:
            name = row.name if row.kind == "strategy" else f"*{row.name}*"
            if row.missing_seeds:
                name += f" (seeds {', '.join(map(str, row.missing_seeds))} missing)"
            body.append(
                [
                    name,
                    _pm(row.final_mean, row.final_std),
                    _pm(row.best_mean, row.best_std),
                    _rounds(row),
                    _num(row.wall_seconds, "{:.1f}"),
                    _num(None if row.bytes_sent is None else row.bytes_sent / 1e6),
                    _num(
                        None if row.bytes_received is None else row.bytes_received / 1e6
                    ),
                    _num(row.num_params, "{:,}"),
                ]
            )
        table = rows_to_markdown(header, body)
        return table + "".join(f"\n{note}\n" for note in self.notes)

    def write(self, folder: str | Path) -> None:
        """Write ``comparison.csv`` and ``comparison.md`` into ``folder``."""
        folder = Path(folder)
        atomic_write_text(folder / CSV_FILE, self.to_csv())
        atomic_write_text(folder / MARKDOWN_FILE, self.to_markdown())


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def _rounds(row: ComparisonRow) -> str:
    if row.kind != "strategy":
        return "—"
    if row.rounds_to_target is None:
        return f"not reached (0/{len(row.seeds)})"
    text = f"{row.rounds_to_target:.1f}"
    if row.reached_target != len(row.seeds):
        text += f" ({row.reached_target}/{len(row.seeds)})"
    return text
