"""The figures of a comparison folder, drawn from its records.

``accuracy_vs_round.png`` has one line per strategy: the mean over seeds of the
test metric after each round, with a band of one sample standard deviation;
``accuracy_vs_bytes.png`` plots the same means against the mean cumulative
array bytes the server sent plus received up to that round. Both draw the
reference models (central, ensemble, mean local model) as horizontal lines and
the target as a dotted line. Everything is read from the folder
(``comparison.csv`` for the rows, ``runs/<strategy>/seed_<s>/results.json`` for
the curves), so ``fedsim plot <comparison folder>`` redraws them at any time.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsim.comparison import (
    CENTRAL,
    CSV_FILE,
    ENSEMBLE,
    LOCAL_MEAN,
    ComparisonRow,
    ComparisonTable,
    mean_std,
    run_path,
)
from fedsim.exceptions import ConfigError
from fedsim.results import Results, atomic_write_bytes, load_results

__all__ = ["BYTES_FIGURE", "ROUND_FIGURE", "Curve", "curves", "plot_comparison"]

ROUND_FIGURE = "accuracy_vs_round.png"
BYTES_FIGURE = "accuracy_vs_bytes.png"

#: (x, mean, low, high) points of one strategy
Curve = list[tuple[float, float, float, float]]

_REFERENCE_STYLE = {CENTRAL: "--", ENSEMBLE: "-.", LOCAL_MEAN: ":"}


def _band(values: Sequence[float]) -> tuple[float, float, float]:
    mean, std = mean_std(values)
    spread = std or 0.0
    return mean, mean - spread, mean + spread


def curves(runs: Sequence[Results]) -> tuple[Curve, Curve]:
    """Per-round (mean, mean - std, mean + std) of the test metric over runs.

    Returns the curve against the round number and against the mean cumulative
    bytes (sent + received) at that round. Only rounds evaluated in every run
    are kept.
    """
    if not runs:
        return [], []
    key = f"test_{runs[0].primary}"
    per_run = [dict(r.metric(key)) for r in runs]
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    cumulative = []
    for result in runs:
        total, by_round = 0, {}
        for rec in result.rounds:
            total += int(rec.get("bytes_sent") or 0) + int(
                rec.get("bytes_received") or 0
            )
            by_round[int(rec["round"])] = total
        cumulative.append(by_round)
    vs_round: Curve = []
    vs_bytes: Curve = []
    for rnd in common:
        mean, low, high = _band([p[rnd] for p in per_run])
        sent = sum(c[rnd] for c in cumulative) / len(cumulative)
        vs_round.append((float(rnd), mean, low, high))
        vs_bytes.append((sent / 1e6, mean, low, high))
    return vs_round, vs_bytes


def _load_runs(folder: Path, row: ComparisonRow) -> list[Results]:
    runs = []
    for seed in row.seeds:
        path = folder / run_path(row.name, seed)
        if not (path / "results.json").is_file():
            raise ConfigError(
                f"{str(path)!r} has no results.json; the comparison folder is "
                "incomplete (repeat the fedsim compare command to finish it)"
            )
        runs.append(load_results(path))
    return runs


def _draw(
    path: Path,
    lines: dict[str, Curve],
    references: list[ComparisonRow],
    *,
    metric: str,
    target: float,
    xlabel: str,
    integer_x: bool = False,
) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.6, 4.2), dpi=150)
    for name, points in lines.items():
        if not points:
            continue
        xs, means, lows, highs = zip(*points, strict=True)
        (line,) = ax.plot(xs, means, marker="o", markersize=2.5, label=name)
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, lw=0)
    for row in references:
        ax.axhline(
            row.final_mean,
            color="0.35",
            linestyle=_REFERENCE_STYLE[row.name],
            linewidth=1.0,
            label=row.name,
        )
    if target > 0:
        ax.axhline(
            target,
            color="tab:red",
            alpha=0.5,
            linestyle=(0, (1, 3)),
            linewidth=1.0,
            label=f"target {target:g}",
        )
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_comparison(folder: str | Path, table: ComparisonTable | None = None) -> None:
    """Draw both figures of a comparison folder.

    Parameters
    ----------
    folder : str or Path
        A folder written by ``fedsim compare`` (it holds ``comparison.csv``).
    table : ComparisonTable, optional
        The table, if already in memory; otherwise ``comparison.csv`` is read.
    """
    folder = Path(folder)
    if table is None:
        if not (folder / CSV_FILE).is_file():
            raise ConfigError(
                f"{str(folder)!r} is not a fedsim comparison folder (no {CSV_FILE})"
            )
        table = ComparisonTable.read_csv(folder / CSV_FILE)
    by_round: dict[str, Curve] = {}
    by_bytes: dict[str, Curve] = {}
    for row in table.rows:
        if row.kind == "strategy":
            by_round[row.name], by_bytes[row.name] = curves(_load_runs(folder, row))
    references = [r for r in table.rows if r.name in _REFERENCE_STYLE]
    common: dict[str, Any] = {
        "metric": table.metric,
        "target": table.target,
    }
    _draw(
        folder / ROUND_FIGURE,
        by_round,
        references,
        xlabel="round",
        integer_x=True,
        **common,
    )
    _draw(
        folder / BYTES_FIGURE,
        by_bytes,
        references,
        xlabel="cumulative MB sent + received by the server",
        **common,
    )
