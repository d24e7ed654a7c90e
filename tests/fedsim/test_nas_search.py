"""NAS-Bench-101 random search: sampled cells, federated runs, the ranking."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fedsim import models
from fedsim.exceptions import ConfigError
from fedsim.models.nasbench import NASBenchNet, sample_specs, spec_hash
from fedsim.nas_search import CellResult, cli, rank, search

TINY = [
    "num_clients=2",
    "num_rounds=1",
    "model.stem_channels=4",
    "model.channels=4",
    "model.num_stacks=2",
    "nas.cells=2",
    "nas.seed=3",
]


def test_the_sample_option_builds_the_sampled_cell() -> None:
    specs = sample_specs(4, 7)
    for i in (0, 3):
        model = models.build(
            "nasbench", input_shape=(1, 8, 8), num_classes=10, sample=i, sample_seed=7
        )
        assert isinstance(model, NASBenchNet)
        assert model.spec == specs[i]
        assert model.spec.hash() == spec_hash(specs[i].matrix, specs[i].ops)
    built = [
        models.build("nasbench", input_shape=(1, 8, 8), num_classes=10, sample=i)
        for i in range(3)
    ]
    assert len({m.spec.hash() for m in built if isinstance(m, NASBenchNet)}) == 3
    with pytest.raises(ConfigError, match="nasbench sample must be null or a cell"):
        models.build("nasbench", input_shape=(1, 8, 8), num_classes=10, sample=-1)


def test_bn_momentum_reaches_every_batchnorm() -> None:
    model = models.build(
        "nasbench", input_shape=(1, 8, 8), num_classes=10, bn_momentum=0.1
    )
    momenta = {
        m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
    }
    assert momenta == {0.1}
    with pytest.raises(ConfigError, match=r"bn_momentum must lie in \(0, 1\]"):
        models.build("nasbench", input_shape=(1, 8, 8), num_classes=10, bn_momentum=0)


def _cell(index: int, value: float, higher: bool = True) -> CellResult:
    return CellResult(
        index=index,
        hash=f"h{index}",
        num_params=1,
        metric="accuracy",
        value=value,
        best_value=value,
        higher_is_better=higher,
        vertices=3,
        edges=2,
        ops=("maxpool3x3",),
        folder=Path("."),
    )


def test_rank_orders_by_value_then_index() -> None:
    cells = [_cell(0, 0.5), _cell(1, 0.9), _cell(2, 0.5), _cell(3, float("nan"))]
    assert [c.index for c in rank(cells)] == [1, 0, 2, 3]
    lower = [_cell(0, 0.5, False), _cell(1, 0.2, False)]
    assert [c.index for c in rank(lower)] == [1, 0]


def test_search_trains_ranks_and_resumes(tmp_path: Path) -> None:
    folder = tmp_path / "nas"
    seen: list[tuple[int, bool]] = []
    out, ranked = search(
        [*TINY, f"output_dir={folder}"],
        progress=lambda r: None,
        on_cell=lambda cell, trained: seen.append((cell.index, trained)),
    )
    assert out == folder and seen == [(0, True), (1, True)]
    specs = sample_specs(2, 3)
    by_index = {cell.index: cell for cell in ranked}
    for i, spec in enumerate(specs):
        cell = by_index[i]
        assert cell.hash == spec.hash()
        results = json.loads((folder / f"cell_{i}" / "results.json").read_text())
        assert results["status"] == "completed"
        assert results["config"]["model"]["options"]["sample"] == i
        assert cell.value == results["final"]["test_accuracy"]
        built = models.build(
            "nasbench",
            input_shape=(1, 8, 8),
            num_classes=10,
            stem_channels=4,
            channels=4,
            num_stacks=2,
            sample=i,
            sample_seed=3,
        )
        assert cell.num_params == sum(p.numel() for p in built.parameters())
    values = [cell.value for cell in ranked]
    assert values == sorted(values, reverse=True)
    rows = list(csv.DictReader((folder / "ranking.csv").open()))
    assert [int(r["rank"]) for r in rows] == [1, 2]
    assert [r["hash"] for r in rows] == [cell.hash for cell in ranked]
    assert [int(r["num_params"]) for r in rows] == [c.num_params for c in ranked]
    markdown = (folder / "ranking.md").read_text()
    assert all(cell.hash in markdown for cell in ranked)

    # a second call reads the finished cells back; an unfinished one is retrained
    stamp = (folder / "cell_0" / "results.json").stat().st_mtime_ns
    partial = folder / "cell_1" / "results.json"
    record = json.loads(partial.read_text())
    record["status"] = "running"
    partial.write_text(json.dumps(record))
    seen.clear()
    _, again = search(
        [*TINY, f"output_dir={folder}"],
        progress=lambda r: None,
        on_cell=lambda cell, trained: seen.append((cell.index, trained)),
    )
    assert seen == [(0, False), (1, True)]
    assert (folder / "cell_0" / "results.json").stat().st_mtime_ns == stamp
    assert [c.hash for c in again] == [c.hash for c in ranked]
    assert json.loads(partial.read_text())["status"] == "completed"

    # the folder belongs to this search: another seed is refused
    with pytest.raises(ConfigError, match="holds cell 0 of seed 3, not cell 0"):
        search([*TINY, "nas.seed=4", f"output_dir={folder}"], progress=lambda r: None)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nas\.cells must be an integer >= 1"):
        search(["nas.cells=0", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="searches nasbench cells, but model='cnn'"):
        search(["model=cnn", f"output_dir={tmp_path}"])


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["--help"]) == 0
    assert "usage: fedsim nas" in capsys.readouterr().out
