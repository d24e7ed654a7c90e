"""The one-shot PFNM table: the matched model beside its references.

PFNM's paper compares one matching of independently trained local models with
what else could be done with the *same* local models: average them
coordinate-wise (one-shot FedAvg), keep them all (their uniform ensemble), or
pick one (the best, and the mean, local model), and with a model trained on all
the data in one place (the oracle). This module builds that table for a
finished run of the ``pfnm`` strategy, whose final round's local models the
strategy keeps (``strategy.keep_local_models``; they are pickled with it in the
run's ``checkpoint.pt``)::

    python -m fedsim.oneshot experiment=pfnm_oneshot [overrides...]
    python -m fedsim.oneshot --from <run folder>

The first form runs the experiment (any ``fedsim run`` overrides) and then
writes ``oneshot_table.md`` and ``oneshot_table.csv`` into the run folder; the
second only writes the table. ``--variant missing=zero_precision``
(repeatable; several settings joined by commas) adds a row matching the same
local models with other PFNM options (``missing``, ``popularity``, ``sigma2``,
``sigma0_2``, ``gamma``); ``--no-oracle`` skips the central model.

Every accuracy is on the server's test set. When the run chose its
hyperparameters on held-out client data (``strategy.select``), the table also
has the row of the starting setting and lists every tried setting with its
held-out score and widths. The oracle is :func:`fedsim.baselines.central_model`
trained for :func:`fedsim.baselines.reference_epochs` epochs on the union of the
clients' training data.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim import models
from fedsim.baselines import (
    accuracy,
    central_model,
    ensemble_accuracy,
    reference_epochs,
)
from fedsim.checkpoint import load_checkpoint
from fedsim.config import ExperimentConfig, experiment_from_dict
from fedsim.data import ArrayDataset
from fedsim.exceptions import ConfigError, FedsimError
from fedsim.matching.select import GRID_KEYS
from fedsim.node import load_dataset, model_kwargs
from fedsim.results import RESULTS_FILE, atomic_write_text, load_results

__all__ = ["TABLE_CSV", "TABLE_MD", "Row", "cli", "oneshot_table", "write_table"]

TABLE_MD = "oneshot_table.md"
TABLE_CSV = "oneshot_table.csv"
VARIANT_KEYS = ("missing", "popularity", *GRID_KEYS)


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    method: str
    test_accuracy: float
    widths: str  # hidden widths, e.g. "109" or "100-100"; "" when not one model
    num_params: int  # parameters needed at inference (all members of an ensemble)


def _row(
    method: str,
    model: torch.nn.Module,
    test: ArrayDataset,
    score: float | None = None,
) -> Row:
    """A row for one model (its test accuracy unless ``score`` is given)."""
    return Row(
        method=method,
        test_accuracy=accuracy(model, test) if score is None else score,
        widths=_widths(model),
        num_params=_params(model),
    )


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _widths(model: torch.nn.Module) -> str:
    return "-".join(str(w) for w in models.permutation_spec(model).widths().values())


def _model(template: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
    with torch.random.fork_rng(devices=[]):
        model = models.fit_to_state(copy.deepcopy(template), tensors)
    full = {
        **model.state_dict(),
        **{k: v.to(torch.float32) for k, v in tensors.items()},
    }
    model.load_state_dict(full)
    return model.eval()


def _parse_variant(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise ConfigError(
                f"--variant {text!r}: each setting must be key=value with key one of "
                f"{', '.join(VARIANT_KEYS)}."
            )
        out[key] = float(value) if key in GRID_KEYS else value
    return out


def _run_state(folder: Path) -> tuple[ExperimentConfig, Any, dict[str, Any]]:
    if not (folder / RESULTS_FILE).is_file():
        raise ConfigError(f"{str(folder)!r} is not a fedsim run folder.")
    exp = experiment_from_dict(load_results(folder).config)
    ckpt = load_checkpoint(folder)
    strategy = ckpt.strategy
    if not getattr(strategy, "local_models", None):
        raise ConfigError(
            f"the run in {str(folder)!r} kept no local models; the table needs a run "
            "of strategy pfnm with strategy.keep_local_models=true."
        )
    return exp, strategy, ckpt.global_state


def oneshot_table(
    folder: str | Path,
    *,
    variants: Sequence[dict[str, Any]] = (),
    oracle: bool = True,
) -> list[Row]:
    """The rows for the finished ``pfnm`` run in ``folder`` (see module docstring).

    Raises
    ------
    ConfigError
        If ``folder`` holds no run, or its strategy kept no local models.
    """
    exp, strategy, global_state = _run_state(Path(folder))
    splits = load_dataset(exp)
    test = splits.test
    template = models.build(exp.model.name, **model_kwargs(exp, splits))
    clients = [strategy.local_models[p] for p in sorted(strategy.local_models)]
    locals_ = [_model(template, c.state) for c in clients]
    rounds = exp.num_rounds
    rows = []
    pfnm = _model(template, global_state)
    chosen = strategy.hyper
    name = "selected on held-out client data" if strategy.selection else "run"
    rows.append(_row(f"PFNM ({name}: {chosen.label()})", pfnm, test))
    settings = []
    if strategy.selection:
        settings.append({"hyper": strategy.selection[0].hyper})
    for variant in variants:
        hyper = dataclasses.replace(
            chosen, **{k: v for k, v in variant.items() if k in GRID_KEYS}
        )
        options = {k: v for k, v in variant.items() if k not in GRID_KEYS}
        settings.append({"hyper": hyper, **options})
    for setting in settings:
        matched = strategy.match_clients(clients, server_round=rounds, **setting)
        extra = "".join(f" {k}={v}" for k, v in setting.items() if k != "hyper")
        label = f"PFNM ({setting['hyper'].label()}{extra})"
        rows.append(_row(label, _model(template, matched.state), test))
    rows += _reference_rows(exp, clients, locals_, template, test, oracle)
    return rows


def _reference_rows(
    exp: ExperimentConfig,
    clients: Sequence[Any],
    locals_: Sequence[torch.nn.Module],
    template: torch.nn.Module,
    test: ArrayDataset,
    oracle: bool,
) -> list[Row]:
    rows = []
    shapes = {tuple((k, v.shape) for k, v in c.state.items()) for c in clients}
    if len(shapes) == 1:
        weights = np.array([c.num_examples for c in clients], dtype=np.float64)
        weights /= weights.sum()
        avg = {
            k: np.tensordot(weights, np.stack([c.state[k] for c in clients]), axes=1)
            for k in clients[0].state
        }
        net = _model(template, avg)
        rows.append(_row("FedAvg, one-shot (same local models)", net, test))
    scores = [accuracy(m, test) for m in locals_]
    total = sum(_params(m) for m in locals_)
    rows.append(
        Row(
            method=f"Uniform ensemble of the {len(locals_)} local models",
            test_accuracy=ensemble_accuracy(list(locals_), test),
            widths="",
            num_params=total,
        )
    )
    best = int(np.argmax(scores))
    label = f"Best local model (client {clients[best].partition_id})"
    rows.append(_row(label, locals_[best], test, scores[best]))
    rows.append(_row("Mean local model", locals_[0], test, float(np.mean(scores))))
    if oracle:
        epochs = reference_epochs(exp)
        label = f"Central model, all clients' data ({epochs} epochs)"
        rows.append(_row(label, central_model(exp, epochs), test))
    return rows


def _selection_lines(strategy: Any) -> list[str]:
    if not strategy.selection:
        return []
    lines = [
        "",
        "Settings tried on the clients' held-out data (never the test set):",
        "",
        "| setting | global widths | width / widest client | held-out score |",
        "|---|---|---|---|",
    ]
    for c in strategy.selection:
        score = "over the width limit" if c.score is None else f"{c.score:.4f}"
        widths = "-".join(str(w) for w in c.widths.values())
        lines.append(f"| {c.hyper.label()} | {widths} | {c.ratio:.2f} | {score} |")
    return lines


def write_table(folder: str | Path, rows: Sequence[Row]) -> tuple[Path, Path]:
    """Write ``oneshot_table.md`` and ``oneshot_table.csv`` into ``folder``."""
    path = Path(folder)
    _, strategy, _ = _run_state(path)
    lines = [
        f"# One-shot table: {path}",
        "",
        "| method | test accuracy | hidden widths | parameters |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.method} | {r.test_accuracy:.4f} | {r.widths} | {r.num_params} |"
        for r in rows
    ]
    lines += _selection_lines(strategy)
    atomic_write_text(path / TABLE_MD, "\n".join(lines) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([f.name for f in dataclasses.fields(Row)])
    for r in rows:
        writer.writerow([r.method, f"{r.test_accuracy:.6f}", r.widths, r.num_params])
    atomic_write_text(path / TABLE_CSV, buf.getvalue())
    return path / TABLE_MD, path / TABLE_CSV


def cli(args: Sequence[str]) -> int:
    """``python -m fedsim.oneshot [--from FOLDER] [--variant K=V,...] [overrides]``."""
    args = list(args)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    folder: Path | None = None
    variants: list[dict[str, Any]] = []
    oracle = True
    overrides: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("--from", "--variant"):
            value = next(it, None)
            if value is None:
                raise ConfigError(f"{arg} needs a value.")
            if arg == "--from":
                folder = Path(value)
            else:
                variants.append(_parse_variant(value))
        elif arg == "--no-oracle":
            oracle = False
        else:
            overrides.append(arg)
    if folder is None:
        from fedsim.runner import run

        folder = run(overrides).output_dir
    elif overrides:
        raise ConfigError(f"--from takes no overrides; got {overrides[0]!r}.")
    md, _ = write_table(folder, oneshot_table(folder, variants=variants, oracle=oracle))
    print(md.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedsim.oneshot``: :func:`cli`, bad input as one sentence (exit 2)."""
    try:
        return cli(sys.argv[1:] if argv is None else argv)
    except FedsimError as err:
        print(f"fedsim oneshot: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
