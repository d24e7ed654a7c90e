"""Hydra's multirun launcher over fedsim's configs, for ``fedsim run -m`` and
``fedsim compare``.

Hydra reads its command line from ``sys.argv``; :func:`hydra_multirun` hands
it one for the duration of the sweep and restores the caller's afterwards.
Jobs keep the working folder (``hydra.job.chdir=false``) and Hydra's own
logging stays off, so the task function's prints are the only output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from fedsim.config import config_dir

__all__ = ["hydra_multirun"]


def hydra_multirun(
    prog: str,
    overrides: Sequence[str],
    task: Callable[[DictConfig], None],
    *,
    sweep_dir: str,
    sweep_subdir: str,
) -> None:
    """Run ``task`` on the composed config of every job of a Hydra multirun.

    Parameters
    ----------
    prog : str
        The program name Hydra shows in its messages.
    overrides : sequence of str
        Hydra overrides; comma-separated values are swept.
    task : callable
        Hydra's task function, called once per job.
    sweep_dir, sweep_subdir : str
        ``hydra.sweep.dir`` and ``hydra.sweep.subdir`` (Hydra interpolations
        allowed).

    Raises
    ------
    SystemExit
        As Hydra raises it, e.g. for an override it cannot parse.
    """
    import hydra

    main: Callable[[], None] = hydra.main(
        config_path=str(config_dir()), config_name="config", version_base=None
    )(task)
    saved = sys.argv
    sys.argv = [
        prog,
        "--multirun",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweep.subdir={sweep_subdir}",
        "hydra.job.chdir=false",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    try:
        main()
    finally:
        sys.argv = saved
