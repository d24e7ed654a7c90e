"""fedsim: federated-learning simulation on Flower and Ray, with PFNM matching.

The programmatic equivalents of the command line:

- :func:`run` runs one experiment (``fedsim run``) and returns its
  :class:`~fedsim.results.Results`;
- :func:`resume` continues a stopped run (``fedsim run resume=<run>``);
- :func:`compare` runs every strategy x seed on identical data and cohorts
  (``fedsim compare``) and returns a :class:`~fedsim.comparison.ComparisonTable`.

They import Flower, Ray and Hydra on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsim.comparison import ComparisonTable
    from fedsim.results import Results

__version__ = "0.1.0"
__all__ = ["compare", "resume", "run"]


def run(
    config: Any = (),
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Results:
    """Run one experiment: an ``ExperimentConfig``, a Hydra config or overrides.

    ``fedsim.run(["strategy=fedprox", "num_rounds=5"])``; see
    :func:`fedsim.runner.run`.
    """
    from fedsim.runner import run as run_experiment

    return run_experiment(config, progress=progress)


def resume(
    folder: str | Path,
    *,
    num_rounds: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Results:
    """Continue the run in ``folder``; see :func:`fedsim.runner.resume`."""
    from fedsim.runner import resume as resume_run

    return resume_run(folder, num_rounds=num_rounds, progress=progress)


def compare(config: Sequence[str] = ()) -> ComparisonTable:
    """Compare strategies (``fedsim compare`` overrides); see
    :func:`fedsim.compare_runner.compare`."""
    from fedsim.compare_runner import compare as compare_strategies

    return compare_strategies(config)
