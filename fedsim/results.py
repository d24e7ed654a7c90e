"""Per-round records of a run: ``results.json``, ``metrics.csv`` and plots.

``results.json`` holds the resolved config, one record per round (round 0 is
the initial model) and a ``final`` block; it is rewritten atomically (a temp
file then ``os.replace``) after every round, so a crash never leaves a torn
file and a run can be resumed from it. Plots are redrawn from the records, so
``fedsim plot <folder>`` reproduces them at any time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Results",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_results",
    "plot_label_histogram",
    "plot_metric",
    "write_label_histogram",
]

RESULTS_FILE = "results.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in results.json")


@dataclass
class Results:
    """The records of one run, kept in memory and mirrored to ``output_dir``.

    Attributes
    ----------
    output_dir : Path
        The run folder.
    config : dict
        The resolved experiment config.
    rounds : list of dict
        One record per completed round (round 0 = initial model).
    final : dict
        Summary written when the run ends.
    primary : str
        Headline metric name (``accuracy`` for classification).
    status : str
        ``running``, ``completed`` or ``failed``.
    """

    output_dir: Path
    config: dict[str, Any]
    primary: str = "accuracy"
    higher_is_better: bool = True
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    extra: dict[str, Any] = field(default_factory=dict)

    # -- recording --------------------------------------------------------
    def add_round(self, record: Mapping[str, Any]) -> None:
        """Append (or replace, on resume) the record of ``record["round"]``."""
        rnd = int(record["round"])
        self.rounds = [r for r in self.rounds if int(r["round"]) != rnd]
        self.rounds.append(dict(record))
        self.rounds.sort(key=lambda r: int(r["round"]))
        self.save()

    def metric(self, key: str) -> list[tuple[int, float]]:
        """(round, value) pairs of one metric where it was recorded."""
        return [
            (int(r["round"]), float(r[key]))
            for r in self.rounds
            if r.get(key) is not None and not _isnan(r[key])
        ]

    def finish(self, status: str = "completed", **extra: Any) -> None:
        """Fill the ``final`` block, write every file and plot."""
        key = f"test_{self.primary}"
        series = self.metric(key)
        final: dict[str, Any] = {
            "status": status,
            "rounds_completed": self.last_round(),
        }
        if series:
            values = [v for _, v in series]
            best = max(values) if self.higher_is_better else min(values)
            final[key] = values[-1]
            final[f"best_{key}"] = best
            final["best_round"] = series[values.index(best)][0]
        for name in ("test_loss",):
            s = self.metric(name)
            if s:
                final[name] = s[-1][1]
        final["total_seconds"] = sum(
            float(r.get("round_seconds") or 0) for r in self.rounds
        )
        final["bytes_sent"] = sum(int(r.get("bytes_sent") or 0) for r in self.rounds)
        final["bytes_received"] = sum(
            int(r.get("bytes_received") or 0) for r in self.rounds
        )
        if self.rounds and "num_params" in self.rounds[-1]:
            final["num_params"] = self.rounds[-1]["num_params"]
        final.update(extra)
        self.final = final
        self.status = status
        self.save()
        self.write_csv()
        self.plot()

    def last_round(self) -> int:
        """The last completed round (0 before any training round)."""
        return max((int(r["round"]) for r in self.rounds), default=-1)

    # -- files ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "primary": self.primary,
            "higher_is_better": self.higher_is_better,
            "config": self.config,
            "rounds": self.rounds,
            "final": self.final,
            **self.extra,
        }

    def save(self) -> None:
        """Write ``results.json`` atomically."""
        text = json.dumps(self.to_json(), indent=2, default=_json_default)
        atomic_write_text(self.output_dir / RESULTS_FILE, text + "\n")

    def write_csv(self) -> None:
        """Write ``metrics.csv``: one row per round, scalar columns only."""
        columns: list[str] = []
        for rec in self.rounds:
            for k, v in rec.items():
                if k not in columns and not isinstance(v, dict | list):
                    columns.append(k)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for rec in self.rounds:
            writer.writerow({k: rec.get(k) for k in columns})
        atomic_write_text(self.output_dir / "metrics.csv", buf.getvalue())

    def plot(self) -> None:
        """Draw ``accuracy.png`` (or ``<primary>.png``) from the records."""
        key = f"test_{self.primary}"
        series = self.metric(key)
        if not series:
            return
        fed = self.metric(f"fed_{self.primary}")
        curves = {"server test set": series}
        if fed:
            curves["clients' local splits"] = fed
        name = "accuracy.png" if self.primary == "accuracy" else f"{self.primary}.png"
        title = str(self.config.get("strategy", {}).get("name", ""))
        plot_metric(self.output_dir / name, curves, ylabel=self.primary, title=title)


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def load_results(folder: str | Path) -> Results:
    """Read a run folder's ``results.json`` back into :class:`Results`."""
    path = Path(folder) / RESULTS_FILE
    data = json.loads(path.read_text())
    known = {"status", "primary", "higher_is_better", "config", "rounds", "final"}
    return Results(
        output_dir=Path(folder),
        config=data["config"],
        primary=data.get("primary", "accuracy"),
        higher_is_better=bool(data.get("higher_is_better", True)),
        rounds=data["rounds"],
        final=data.get("final", {}),
        status=data.get("status", "running"),
        extra={k: v for k, v in data.items() if k not in known},
    )


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metric(
    path: Path,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    ylabel: str,
    xlabel: str = "round",
    title: str = "",
    bands: Mapping[str, Sequence[tuple[float, float, float]]] | None = None,
) -> None:
    """Line plot of one metric, one line per curve, saved atomically as PNG.

    ``bands[name]`` gives (x, low, high) triples drawn as a shaded band.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in curves.items():
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        (line,) = ax.plot(xs, ys, marker="o", markersize=2.5, label=name)
        if bands and bands.get(name):
            bx, lo, hi = zip(*bands[name], strict=True)
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_label_histogram(folder: Path, counts: np.ndarray) -> None:
    """Write ``partition.csv`` (clients x classes) and ``partition.png``."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["client", *[f"class_{k}" for k in range(counts.shape[1])], "total"]
    )
    for i, row in enumerate(counts):
        writer.writerow([i, *[int(v) for v in row], int(row.sum())])
    atomic_write_text(folder / "partition.csv", buf.getvalue())
    plot_label_histogram(folder / "partition.png", counts)


def plot_label_histogram(path: Path, counts: np.ndarray) -> None:
    """Stacked bar chart of each client's examples per class."""
    plt = _figure()
    num_clients, num_classes = counts.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * num_clients), 4), dpi=120)
    bottom = np.zeros(num_clients)
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for k in range(num_classes):
        ax.bar(
            np.arange(num_clients),
            counts[:, k],
            bottom=bottom,
            color=cmap(k % 20),
            label=str(k),
            width=0.85,
        )
        bottom += counts[:, k]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_title("examples per class and client")
    if num_classes <= 20:
        ax.legend(
            title="class",
            fontsize=7,
            ncols=2,
            bbox_to_anchor=(1.01, 1),
            loc="upper left",
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def rows_to_markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"
