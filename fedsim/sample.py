"""``fedsim sample <run folder>``: a PNG grid of images drawn from a trained flow.

The command loads the run's final global model from ``<run>/checkpoint.pt``
(its name, build kwargs and state dict; see :mod:`fedsim.checkpoint`), draws
``--n`` samples through the model's inverse with ``model.sample(n, generator)``
in eval mode, maps them back to pixels and writes them as one PNG grid,
``ceil(sqrt(n))`` images per row with a one-pixel grey border.

Samples live in the dequantised space of ``task=density``, ``(x + u) / L - 1/2``
for grey level ``x`` of ``L`` (see :mod:`fedsim.tasks.density`); a sample ``s``
is pixel ``floor((s + 1/2) L)``, clipped to 0..L-1 and scaled to 0..255. ``L``
is the run's ``task.levels`` (read from ``results.json``; 256 if the run
records none).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from fedsim import models
from fedsim.checkpoint import CHECKPOINT_FILE, load_checkpoint
from fedsim.exceptions import ConfigError
from fedsim.results import RESULTS_FILE

__all__ = ["cli", "draw", "run_levels", "tile", "to_pixels"]

USAGE = """\
usage: fedsim sample <run folder> [--n 64] [--seed 0] [--out PATH]

Draws --n images from the final global model of a density run (task=density,
model=iresnet_flow) through its inverse and writes them as one PNG grid.

options:
  --n N        number of samples (default 64)
  --seed S     seed of the prior draws (default 0)
  --out PATH   the PNG to write (default <run folder>/samples.png)"""

BORDER = 128
"""Grey value of the one-pixel border around every image of the grid."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports bad input as one :class:`ConfigError`."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see `fedsim sample --help`")


def _parse(args: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(prog="fedsim sample", add_help=False)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args(list(args))
    if options.n < 1:
        raise ConfigError(f"--n={options.n} must be at least 1")
    return options


def run_levels(run_dir: Path) -> int:
    """The run's grey levels ``L``: ``task.levels`` in ``results.json``, else 256."""
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return 256
    task = json.loads(path.read_text()).get("config", {}).get("task", {})
    levels = task.get("options", {}).get("levels", 256)
    return int(levels)


def draw(run_dir: Path, n: int, *, seed: int) -> torch.Tensor:
    """``n`` samples (n, C, H, W) from the final global model of ``run_dir``.

    Raises
    ------
    ConfigError
        If ``run_dir`` holds no checkpoint or its model cannot sample.
    """
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise ConfigError(
            f"{str(run_dir)!r} holds no {CHECKPOINT_FILE}; give the folder of a "
            "fedsim run that completed at least one round"
        )
    ckpt = load_checkpoint(run_dir)
    model = models.build(ckpt.model_name, **ckpt.model_kwargs)
    sampler = getattr(model, "sample", None)
    if not callable(sampler):
        raise ConfigError(
            f"the run in {str(run_dir)!r} trained model {ckpt.model_name!r}, which "
            "cannot draw samples; fedsim sample needs a density model such as "
            "iresnet_flow"
        )
    model.load_state_dict(ckpt.global_state, strict=True)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    samples = sampler(n, generator)
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ConfigError(
            f"model {ckpt.model_name!r} returned samples that are not an image "
            "batch (n, C, H, W)"
        )
    return samples


def to_pixels(samples: torch.Tensor, levels: int) -> np.ndarray:
    """8-bit pixels (n, C, H, W) of samples in the dequantised space.

    ``floor((s + 1/2) L)`` clipped to 0..L-1, then scaled to 0..255; NaN and
    ``-inf`` become 0, ``+inf`` 255.
    """
    s = torch.nan_to_num(samples.detach().double(), nan=-0.5, posinf=0.5, neginf=-0.5)
    level = torch.floor((s + 0.5) * levels).clamp(0, levels - 1)
    return torch.round(level * (255.0 / (levels - 1))).to(torch.uint8).numpy()


def tile(pixels: np.ndarray) -> np.ndarray:
    """One grid image of (n, C, H, W) pixels, ``ceil(sqrt(n))`` per row.

    Returns
    -------
    numpy.ndarray
        uint8 of shape (rows (H + 1) + 1, cols (W + 1) + 1) for one channel,
        with a trailing channel axis of size C otherwise; cells past the last
        image and the borders are :data:`BORDER` grey.
    """
    n, c, h, w = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), BORDER, np.uint8)
    for i in range(n):
        top, left = 1 + (i // cols) * (h + 1), 1 + (i % cols) * (w + 1)
        grid[top : top + h, left : left + w] = pixels[i].transpose(1, 2, 0)
    return grid[:, :, 0] if c == 1 else grid


def _write_png(path: Path, grid: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")


def cli(args: Sequence[str]) -> int:
    """``fedsim sample <run folder> [--n N] [--seed S] [--out PATH]``."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    options = _parse(args)
    run_dir: Path = options.run_dir
    if not run_dir.is_dir():
        raise ConfigError(f"{str(run_dir)!r} is not a folder; give a fedsim run folder")
    samples = draw(run_dir, options.n, seed=options.seed)
    bad = int((~torch.isfinite(samples)).flatten(1).any(dim=1).sum())
    if bad:
        print(
            f"fedsim sample: warning: {bad} of {options.n} samples hold non-finite "
            "values (the inverse diverged); NaN is drawn as 0",
            file=sys.stderr,
        )
    grid = tile(to_pixels(samples, run_levels(run_dir)))
    out: Path = options.out or run_dir / "samples.png"
    _write_png(out, grid)
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]} pixels, {options.n} samples)")
    return 0
