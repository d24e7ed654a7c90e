"""The one-shot PFNM table: every row recomputed independently."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim import models
from fedsim.baselines import accuracy, ensemble_accuracy
from fedsim.checkpoint import load_checkpoint
from fedsim.config import experiment_from_dict
from fedsim.exceptions import ConfigError
from fedsim.node import load_dataset
from fedsim.oneshot import TABLE_CSV, TABLE_MD, Row, main, oneshot_table, write_table
from fedsim.results import load_results
from fedsim.runner import run

TINY = [
    "dataset=digits",
    "model.hidden=[16]",
    "num_clients=3",
    "num_rounds=1",
    "client.lr=0.1",
    "client.epochs=2",
    "simulation.engine=inprocess",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("oneshot") / "run"
    results = run(
        [*TINY, "strategy=pfnm", "strategy.gamma=3.0", f"output_dir={folder}"],
        progress=lambda r: None,
    )
    return folder, results


def as_model(state: dict[str, np.ndarray]) -> torch.nn.Module:
    tensors = {k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}
    model = models.build("mlp", input_shape=[1, 8, 8], num_classes=10, hidden=[16])
    model = models.fit_to_state(model, tensors)
    model.load_state_dict(tensors)
    return model.eval()


def row(rows: list[Row], method: str) -> Row:
    """The one row whose method starts with ``method``."""
    found = [r for r in rows if r.method.startswith(method)]
    assert len(found) == 1, [r.method for r in rows]
    return found[0]


def test_every_row_matches_an_independent_computation(finished) -> None:
    folder, results = finished
    variants = [{"gamma": 3.0}, {"popularity": "consistent"}]
    rows = oneshot_table(folder, variants=variants)
    exp = experiment_from_dict(load_results(folder).config)
    test = load_dataset(exp).test
    strat = load_checkpoint(folder).strategy
    clients = [strat.local_models[p] for p in sorted(strat.local_models)]
    assert [c.partition_id for c in clients] == [0, 1, 2]
    first = rows[0]
    assert first.method == "PFNM (run: sigma2=1 sigma0_2=1 gamma=3)"
    assert first.test_accuracy == pytest.approx(results.final["test_accuracy"])
    assert first.widths == str(results.rounds[-1]["widths"]["hidden.0"])
    # re-matching the kept local models with the run's settings is the run
    again = row(rows, "PFNM (sigma2=1 sigma0_2=1 gamma=3)")
    assert (again.test_accuracy, again.widths) == (first.test_accuracy, first.widths)
    row(rows, "PFNM (sigma2=1 sigma0_2=1 gamma=3 popularity=consistent)")
    locals_ = [as_model(c.state) for c in clients]
    share = np.array([c.num_examples for c in clients])
    share = share / share.sum()
    avg = {}
    for k in clients[0].state:
        avg[k] = sum(
            share[j] * c.state[k].astype(np.float64) for j, c in enumerate(clients)
        )
    fedavg = row(rows, "FedAvg, one-shot").test_accuracy
    assert fedavg == pytest.approx(accuracy(as_model(avg), test))
    ensemble = row(rows, "Uniform ensemble of the 3 local models").test_accuracy
    assert ensemble == pytest.approx(ensemble_accuracy(locals_, test))
    scores = [accuracy(m, test) for m in locals_]
    assert row(rows, "Best local model").test_accuracy == max(scores)
    assert row(rows, "Mean local model").test_accuracy == pytest.approx(np.mean(scores))
    assert row(rows, "Central model").test_accuracy > np.mean(scores)


def test_tables_are_written_as_markdown_and_csv(finished) -> None:
    folder, _ = finished
    rows = oneshot_table(folder, oracle=False)
    md, table = write_table(folder, rows)
    assert md == folder / TABLE_MD and table == folder / TABLE_CSV
    text = md.read_text()
    assert all(r.method in text for r in rows)
    with table.open() as f:
        read = list(csv.DictReader(f))
    assert [r["method"] for r in read] == [r.method for r in rows]
    assert [float(r["test_accuracy"]) for r in read] == pytest.approx(
        [r.test_accuracy for r in rows]
    )


def test_bad_input_is_one_sentence(tmp_path: Path, finished, capsys) -> None:
    folder, _ = finished
    assert main(["--from", str(tmp_path)]) == 2
    assert "is not a fedsim run folder" in capsys.readouterr().err
    assert main(["--from", str(folder), "--variant", "lr=1"]) == 2
    assert "key one of missing, popularity" in capsys.readouterr().err
    assert main(["--from", str(folder), "seed=3"]) == 2
    assert "--from takes no overrides" in capsys.readouterr().err
    other = tmp_path / "fedavg"
    run([*TINY, f"output_dir={other}"], progress=lambda r: None)
    with pytest.raises(ConfigError, match="kept no local models"):
        oneshot_table(other)
