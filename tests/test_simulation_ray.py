"""One real Flower + Ray simulation end to end (2 clients, 2 rounds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsim.runner import run

pytestmark = pytest.mark.ray


def test_ray_simulation_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "ray"
    results = run(
        [
            "dataset=digits",
            "model.hidden=[32]",
            "num_clients=2",
            "num_rounds=2",
            "partition=iid",
            f"output_dir={out}",
        ],
        progress=lambda r: None,
    )
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "completed"
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    for rec in data["rounds"][1:]:
        assert rec["num_replies"] == 2
        assert rec["num_failures"] == 0
        assert rec["clients"] == [0, 1]
        assert rec["bytes_sent"] > 0 and rec["round_seconds"] > 0
        assert 0.0 <= rec["test_accuracy"] <= 1.0
    assert data["rounds"][2]["test_accuracy"] > data["rounds"][0]["test_accuracy"]
    assert data["final"]["test_accuracy"] == results.final["test_accuracy"]
    # the same experiment in-process gives the same model: engines agree
    same = run(
        [
            "dataset=digits",
            "model.hidden=[32]",
            "num_clients=2",
            "num_rounds=2",
            "partition=iid",
            "simulation.engine=inprocess",
            f"output_dir={tmp_path / 'inprocess'}",
        ],
        progress=lambda r: None,
    )
    assert same.final["test_accuracy"] == pytest.approx(results.final["test_accuracy"])
    assert same.final["test_loss"] == pytest.approx(
        results.final["test_loss"], rel=1e-5
    )


def test_sharded_engine_equals_the_in_process_engine(tmp_path: Path) -> None:
    setup = [
        "dataset=digits",
        "model.hidden=[16]",
        "num_clients=5",
        "num_rounds=2",
        "fraction_train=0.6",
    ]
    sharded = run(
        [*setup, "simulation.engine=sharded", f"output_dir={tmp_path / 's'}"],
        progress=lambda r: None,
    )
    local = run(
        [*setup, "simulation.engine=inprocess", f"output_dir={tmp_path / 'i'}"],
        progress=lambda r: None,
    )
    for a, b in zip(sharded.rounds, local.rounds, strict=True):
        assert a.get("clients") == b.get("clients")
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)
    assert [r["num_replies"] for r in sharded.rounds[1:]] == [3, 3]


def test_ray_workers_get_the_malloc_settings_unless_the_user_set_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedsim import malloc, simulation
    from fedsim.config import compose, from_dictconfig

    monkeypatch.setenv("MALLOC_TOP_PAD_", "12345")  # the user's own choice
    exp = from_dictconfig(compose(["num_clients=2"]))
    ray, started = simulation._open_ray(exp)
    assert started
    try:

        @ray.remote(num_cpus=1)
        def environment() -> dict[str, str | None]:
            import os

            return {key: os.environ.get(key) for key in malloc.SETTINGS}

        seen = ray.get(environment.remote())
    finally:
        ray.shutdown()
    expected = dict(malloc.SETTINGS, MALLOC_TOP_PAD_="12345")
    assert seen == expected
