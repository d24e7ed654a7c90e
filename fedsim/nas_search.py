"""``fedsim nas``: NAS-Bench-101 random search, every cell trained federatedly.

The search draws ``nas.cells`` random valid, pairwise non-isomorphic cells with
``nas.seed`` (:func:`fedsim.models.nasbench.sample_specs`), trains the
``nasbench`` network of each one as an ordinary fedsim run
(``model.sample=<i> model.sample_seed=<seed>``) into ``<folder>/cell_<i>/``,
and ranks the cells by their final server test metric (accuracy for
classification) in ``<folder>/ranking.csv`` and ``<folder>/ranking.md``, with
each cell's NAS-Bench-101 hash, parameter count, vertices, edges and ops.

Every cell uses the same run seed, so the same data split, partition, cohorts
and client data order: only the architecture differs. The search folder is
``output_dir`` (a new timestamped folder under ``outputs/nas/`` when unset).
Running the same command again with that ``output_dir`` continues the search:
finished cells are read back, not retrained; a cell whose run did not finish
is trained again from scratch.

Command line: ``fedsim nas [overrides...]`` with the overrides of ``fedsim
run``; without an ``experiment=`` override it uses
``configs/experiment/nas_random_search.yaml`` (a small 8x8-digits setup).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.config import compose, from_dictconfig
from fedsim.exceptions import ConfigError
from fedsim.models.nasbench import sample_specs
from fedsim.results import (
    RESULTS_FILE,
    Results,
    atomic_write_text,
    load_results,
    rows_to_markdown,
)

__all__ = ["CellResult", "cli", "rank", "search", "write_ranking"]

DEFAULT_EXPERIMENT = "nas_random_search"
HEADER = (
    "rank",
    "cell",
    "hash",
    "num_params",
    "metric",
    "value",
    "best_value",
    "vertices",
    "edges",
    "ops",
)

USAGE = """\
usage: fedsim nas [overrides...]

NAS-Bench-101 random search: trains nas.cells random cells (drawn with
nas.seed) federatedly, one fedsim run each, into <output_dir>/cell_<i>/, and
writes ranking.csv and ranking.md ranked by the final server test metric.
Without experiment=... it uses experiment=nas_random_search (8x8 digits).
Running it again with the same output_dir skips the finished cells.

examples:
  fedsim nas
  fedsim nas nas.cells=20 num_rounds=5 output_dir=outputs/nas/run1
  fedsim nas dataset=mnist5k model.num_stacks=3 simulation.engine=inprocess"""


@dataclass(frozen=True)
class CellResult:
    """One trained cell of the search.

    Attributes
    ----------
    index : int
        The cell's position in the sampled list (``model.sample``).
    hash : str
        Its NAS-Bench-101 graph hash (``spec_hash``).
    num_params : int
        Trainable parameters of its network.
    metric : str
        The task's primary metric (``accuracy`` for classification).
    value : float
        ``test_<metric>`` after the last round.
    best_value : float
        The best ``test_<metric>`` over the rounds.
    higher_is_better : bool
        Direction of ``metric``.
    vertices, edges : int
        Size of the pruned cell.
    ops : tuple of str
        The interior vertices' ops.
    folder : Path
        The cell's run folder.
    """

    index: int
    hash: str
    num_params: int
    metric: str
    value: float
    best_value: float
    higher_is_better: bool
    vertices: int
    edges: int
    ops: tuple[str, ...]
    folder: Path


def _search_folder(output_dir: Any) -> Path:
    if output_dir is not None:
        return Path(str(output_dir))
    stamp = dt.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    base = Path("outputs") / "nas" / stamp
    path, n = base, 1
    while path.exists():
        path = Path(f"{base}-{n}")
        n += 1
    return path


def _settings(overrides: Sequence[str]) -> tuple[list[str], int, int, Path]:
    """The overrides with the default experiment, ``nas.cells``, ``nas.seed`` and
    the search folder."""
    args = list(overrides)
    if not any(a.lstrip("+").split("=", 1)[0] == "experiment" for a in args):
        args.insert(0, f"experiment={DEFAULT_EXPERIMENT}")
    cfg = compose(args)
    nas = cfg.get("nas")
    if nas is None:
        raise ConfigError(
            "fedsim nas needs a nas block (nas.cells, nas.seed); use "
            f"experiment={DEFAULT_EXPERIMENT} or an experiment that defines one"
        )
    cells, seed = nas.get("cells"), nas.get("seed", 0)
    if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
        raise ConfigError(f"nas.cells must be an integer >= 1, got {cells!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"nas.seed must be an integer >= 0, got {seed!r}")
    if cfg.model.name != "nasbench":
        raise ConfigError(
            f"fedsim nas searches nasbench cells, but model={cfg.model.name!r}; "
            "leave the model at nasbench"
        )
    return args, cells, seed, _search_folder(cfg.get("output_dir"))


def _finished(folder: Path, index: int, seed: int) -> Results | None:
    """The completed run in ``folder``, if any; a partial run is removed."""
    if not (folder / RESULTS_FILE).is_file():
        return None
    results = load_results(folder)
    options = results.config.get("model", {}).get("options", {})
    if (options.get("sample"), options.get("sample_seed")) != (index, seed):
        raise ConfigError(
            f"{str(folder)!r} holds cell {options.get('sample')!r} of seed "
            f"{options.get('sample_seed')!r}, not cell {index} of nas.seed={seed}; "
            "choose another output_dir"
        )
    if results.status == "completed":
        return results
    shutil.rmtree(folder)
    return None


def _cell_result(index: int, results: Results, folder: Path) -> CellResult:
    options = results.config["model"]["options"]
    key = f"test_{results.primary}"
    series = [v for _, v in results.metric(key)]
    if not series:
        raise ConfigError(f"the run in {str(folder)!r} recorded no {key}")
    best = max(series) if results.higher_is_better else min(series)
    spec = sample_specs(index + 1, int(options["sample_seed"]))[index]
    return CellResult(
        index=index,
        hash=spec.hash(),
        num_params=int(results.final.get("num_params", 0)),
        metric=results.primary,
        value=series[-1],
        best_value=best,
        higher_is_better=results.higher_is_better,
        vertices=spec.num_vertices,
        edges=spec.num_edges,
        ops=tuple(spec.ops[1:-1]),
        folder=folder,
    )


def rank(cells: Sequence[CellResult]) -> list[CellResult]:
    """Cells from best to worst final value (ties: lower cell index first)."""

    def key(cell: CellResult) -> tuple[float, int]:
        value = cell.value if math.isfinite(cell.value) else -math.inf
        return (-value if cell.higher_is_better else value, cell.index)

    return sorted(cells, key=key)


def _row(position: int, cell: CellResult) -> list[Any]:
    return [
        position,
        cell.index,
        cell.hash,
        cell.num_params,
        cell.metric,
        f"{cell.value:.4f}",
        f"{cell.best_value:.4f}",
        cell.vertices,
        cell.edges,
        " ".join(cell.ops) or "-",  # "-": the input feeds the output directly
    ]


def write_ranking(folder: Path, cells: Sequence[CellResult]) -> list[CellResult]:
    """Write ``ranking.csv`` and ``ranking.md`` (atomically); return the ranking."""
    ranked = rank(cells)
    rows = [_row(i + 1, cell) for i, cell in enumerate(ranked)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(HEADER)
    writer.writerows(rows)
    atomic_write_text(folder / "ranking.csv", buf.getvalue())
    atomic_write_text(folder / "ranking.md", rows_to_markdown(HEADER, rows))
    return ranked


def search(
    overrides: Sequence[str] = (),
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_cell: Callable[[CellResult, bool], None] | None = None,
) -> tuple[Path, list[CellResult]]:
    """Run (or continue) a random search; return its folder and the ranking.

    Parameters
    ----------
    overrides : sequence of str
        Hydra overrides as for ``fedsim run``; ``nas.cells`` and ``nas.seed``
        set the search (defaults from ``experiment=nas_random_search``).
    progress : callable, optional
        Each cell's per-round progress (as :func:`fedsim.runner.run`).
    on_cell : callable, optional
        ``on_cell(cell, trained)`` after each cell; ``trained`` is False for a
        finished cell read back from its folder.

    Raises
    ------
    fedsim.exceptions.ConfigError
        For a bad override, a model other than ``nasbench``, or a folder that
        holds another search.
    """
    from fedsim.runner import run

    args, cells, seed, folder = _settings(overrides)
    results: list[CellResult] = []
    for index in range(cells):
        cell_folder = folder / f"cell_{index}"
        done = _finished(cell_folder, index, seed)
        if done is None:
            exp = from_dictconfig(
                compose(
                    [
                        *args,
                        f"model.sample={index}",
                        f"model.sample_seed={seed}",
                        f"output_dir={cell_folder}",
                    ]
                )
            )
            done = run(exp, progress=progress)
            trained = True
        else:
            trained = False
        cell = _cell_result(index, done, cell_folder)
        results.append(cell)
        if on_cell is not None:
            on_cell(cell, trained)
    return folder, write_ranking(folder, results)


def cli(args: Sequence[str]) -> int:
    """``fedsim nas [overrides...]``; returns the exit status."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    from rich.console import Console

    console = Console(highlight=False)

    def announce(cell: CellResult, trained: bool) -> None:
        how = "trained" if trained else "already finished"
        console.print(
            f"[bold]cell {cell.index}[/bold] {cell.hash[:12]}  "
            f"{cell.num_params} params  {cell.metric} {cell.value:.4f}  ({how})"
        )

    folder, ranked = search(list(args), on_cell=announce)
    rows = [_row(i + 1, cell) for i, cell in enumerate(ranked)]
    print(rows_to_markdown(HEADER, rows), end="")  # unwrapped: a markdown table
    console.print(f"ranking written to {folder / 'ranking.csv'} and ranking.md")
    return 0
