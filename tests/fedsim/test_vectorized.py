"""The vectorized engine against the per-client path: shards, whole runs, fall-backs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from clients.client_app import build_client_app
from fedsim import node
from fedsim._cohort_shard import ShardJob, run_shard, split_evenly
from fedsim.config import ExperimentConfig, VectorizedConfig, compose, from_dictconfig
from fedsim.exceptions import ConfigError
from fedsim.params import state_to_record
from fedsim.runner import run
from fedsim.vectorized import VectorizedGrid

ROOT = Path(__file__).resolve().parents[2]
SMALL = {
    "mlp": ["model.hidden=[16]"],
    "cnn": ["model.channels=[4,8]", "model.hidden=[12]"],
}


def _exp(*overrides: str) -> ExperimentConfig:
    return from_dictconfig(
        compose(
            [
                "dataset=digits",
                "partition=dirichlet",  # clients of different sizes
                "num_clients=6",
                "client.batch_size=16",
                "client.epochs=2",
                *overrides,
            ]
        )
    )


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("client", ["sgd", "adam"])
def test_shard_updates_equal_train_client(model: str, client: str) -> None:
    exp = _exp(f"model={model}", f"client={client}", *SMALL[model])
    splits = node.load_dataset(exp)
    state = node.build_global_model(exp, splits).state_dict()
    pids = [0, 2, 3, 5]
    sizes = {int(node.node_data(exp, p).x_train.shape[0]) for p in pids}
    assert len(sizes) == len(pids)  # really different sizes
    rnd, mu = 3, (0.0, 0.2, 0.0, 0.05)
    lrs = tuple(exp.client.lr * f for f in (1.0, 1.0, 0.5, 1.0))
    job = ShardJob(
        partition_ids=tuple(pids),
        rounds=(rnd,) * 4,
        states=(state,),
        state_of=(0,) * 4,
        lrs=lrs,
        mus=mu,
        max_chunk=3,
    )
    got = run_shard(exp, job)
    for row, pid in enumerate(pids):
        config = {"server-round": rnd, "lr": lrs[row], "proximal-mu": mu[row]}
        alone = node.train_client(
            exp, node.node_data(exp, pid), state, server_round=rnd, config=config
        )
        assert got.num_examples[row] == alone.metrics["num-examples"]
        assert got.num_steps[row] == alone.metrics["num-steps"]
        assert got.train_loss[row] == pytest.approx(alone.metrics["train_loss"], 1e-5)
        trained = got.state(row)
        assert list(trained) == list(alone.state)
        for key, value in alone.state.items():
            torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6)


def _run(tmp_path: Path, name: str, *overrides: str) -> dict[str, Any]:
    out = tmp_path / name
    run(
        [
            "dataset=digits",
            "num_clients=5",
            "num_rounds=2",
            "client.batch_size=16",
            f"output_dir={out}",
            *overrides,
        ],
        progress=lambda r: None,
    )
    return json.loads((out / "results.json").read_text())


TIMING = ("seconds",)


def _assert_same_records(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["status"] == b["status"] == "completed"
    assert len(a["rounds"]) == len(b["rounds"])
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        keys = {k for k in ra if not any(t in k for t in TIMING)}
        assert keys == {k for k in rb if not any(t in k for t in TIMING)}
        for key in keys:
            if isinstance(ra[key], float):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
            else:
                assert ra[key] == rb[key], key


@pytest.mark.parametrize(
    "setup",
    [
        ["model=mlp", "model.hidden=[16]", "strategy=fedprox", "client=adam"],
        ["model=cnn", *SMALL["cnn"], "evaluation=federated", "fraction_train=0.6"],
    ],
    ids=["mlp-fedprox-adam", "cnn-federated-eval"],
)
def test_whole_run_matches_inprocess(
    tmp_path: Path, setup: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    a = _run(tmp_path, "inprocess", "simulation.engine=inprocess", *setup)
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        b = _run(tmp_path, "vectorized", "simulation.engine=vectorized", *setup)
    assert "vectorized engine" not in caplog.text  # nothing fell back
    _assert_same_records(a, b)
    assert b["rounds"][-1]["test_accuracy"] > b["rounds"][0]["test_accuracy"]


def test_model_that_cannot_be_batched_falls_back_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # gen keeps its node positions client-local (tensor role "local")
    setup = ["model=gen", "model.grid=2", "model.steps=1", "num_clients=3"]
    setup += ["num_rounds=1"]
    a = _run(tmp_path, "inprocess", "simulation.engine=inprocess", *setup)
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        b = _run(tmp_path, "vectorized", "simulation.engine=vectorized", *setup)
    said = [r.getMessage() for r in caplog.records if "vectorized engine" in r.message]
    assert len(said) == 1 and "client-local tensors ['positions']" in said[0]
    _assert_same_records(a, b)


def test_faulty_clients_go_alone_and_the_rest_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = ["model=mlp", "model.hidden=[16]", "simulation.faults.crash=0.4"]
    a = _run(tmp_path, "inprocess", "simulation.engine=inprocess", *setup)
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        b = _run(tmp_path, "vectorized", "simulation.engine=vectorized", *setup)
    said = [r.getMessage() for r in caplog.records if "vectorized engine" in r.message]
    assert len(said) == 1 and "fedsim.fault" in said[0]
    assert [r.get("num_failures") for r in b["rounds"][1:]] == [2, 2]
    _assert_same_records(a, b)


def test_round_timeout_drops_stragglers_not_the_batch(tmp_path: Path) -> None:
    # the first round pays the engine's one-time set-up (probe, data stacking),
    # which must not make the batched clients miss the deadline
    setup = ["model=mlp", "model.hidden=[16]", "simulation.faults.straggle=0.2"]
    setup += ["simulation.faults.straggle_seconds=1.3", "simulation.round_timeout=1"]
    a = _run(tmp_path, "inprocess", "simulation.engine=inprocess", *setup)
    b = _run(tmp_path, "vectorized", "simulation.engine=vectorized", *setup)
    assert [r["num_timeouts"] for r in b["rounds"][1:]] == [1, 1]
    _assert_same_records(a, b)


def _train_message(grid: VectorizedGrid, node_id: int, state: dict) -> Message:
    content = RecordDict(
        {"arrays": state_to_record(state), "config": ConfigRecord({"server-round": 1})}
    )
    return Message(content, node_id, "train")


def test_clients_of_different_widths_fall_back_to_the_client_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exp = _exp("model=mlp", "model.hidden=[16]", "num_clients=3")
    splits = node.load_dataset(exp)
    narrow = node.build_global_model(exp, splits).state_dict()
    wide = node.build_global_model(
        _exp("model=mlp", "model.hidden=[20]", "num_clients=3"), splits
    ).state_dict()
    grid = VectorizedGrid(build_client_app(exp), exp)
    messages = [
        _train_message(grid, grid.node_ids[0], narrow),
        _train_message(grid, grid.node_ids[1], wide),
    ]
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        replies = grid.send_and_receive(messages)
    assert grid.fallbacks == ["the clients start from models of different widths"]
    assert [r.has_error() for r in replies] == [False, False]
    widths = [r.content["arrays"]["layers.0.weight"].shape[0] for r in replies]
    assert widths == [16, 20]
    # the same messages batch once the widths agree
    again = VectorizedGrid(build_client_app(exp), exp)
    same = [_train_message(again, n, narrow) for n in again.node_ids[:2]]
    assert len(again.send_and_receive(same)) == 2 and again.fallbacks == []


def test_shards_get_balanced_work_and_every_client_once() -> None:
    steps = [5, 1, 1, 1, 1, 1, 2, 2]
    groups = split_evenly(steps, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(steps)))
    assert all(g == sorted(g) for g in groups)
    loads = sorted(sum(steps[i] for i in g) for g in groups)
    assert loads == [4, 5, 5]  # longest first, each to the least-loaded shard
    assert split_evenly([3, 3], 5) == [[0], [1]]  # no empty shards


def test_auto_chunk_fits_memory_and_cpu_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedsim._cohort_shard as shard

    exp = _exp("model=mlp")  # 64-200-200-10: 160 kB for the largest weight
    state = node.build_global_model(exp, node.load_dataset(exp)).state_dict()
    trainer = shard.trainer_for(exp, state, torch.device("cpu"))
    sample = node.node_data(exp, 0).x_train[:8]
    need = trainer.footprint(sample)
    assert need.largest >= 200 * 200 * 4 and need.total > 10 * need.largest
    cap = shard.CPU_CHUNK_TENSOR_BYTES // need.largest
    assert shard.auto_chunk(trainer, sample, memory_fraction=0.5) == cap
    monkeypatch.setattr(shard, "memory_budget", lambda device, f: 3 * need.total)
    assert shard.auto_chunk(trainer, sample, memory_fraction=0.5) == 3


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"simulation\.vectorized\.shards=-1"):
        from_dictconfig(compose(["simulation.vectorized.shards=-1"]))
    with pytest.raises(ConfigError, match="memory_fraction=0"):
        VectorizedConfig(memory_fraction=0)


@pytest.mark.ray
def test_two_ray_shards_give_the_in_process_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = ["model=mlp", "model.hidden=[16]", "partition=iid"]
    a = _run(tmp_path, "one", "simulation.engine=vectorized", *setup)
    b = _run(
        tmp_path,
        "two",
        "simulation.engine=vectorized",
        "simulation.vectorized.shards=2",
        "simulation.vectorized.shard_cpus=1",
        *setup,
    )
    _assert_same_records(a, b)


# -- the benchmark scripts run on CPU -----------------------------------------------
BLOCK = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"flwr", "ray", "hydra", "omegaconf"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _script(*args: str, block: bool = False) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", BLOCK] if block else [sys.executable]
    done = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return [json.loads(ln) for ln in lines]


def test_gpu_check_script_runs_on_cpu_without_flower_ray_or_hydra() -> None:
    rows = _script(
        "benchmarks/gpu_cohort_check.py",
        "--device=cpu",
        "--clients=3",
        "--steps=4",
        "--repeats=1",
        block=True,
    )
    assert {r["model"] for r in rows} == {"mlp", "cnn"}
    for row in rows:
        assert row["device"] == "cpu" and row["max_abs_diff"] < 1e-4
        assert row["sequential_s"] > 0 and row["batched_s"] > 0


def _benchmark_rows(
    script: str,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> list[dict[str, Any]]:
    """Run ``benchmarks/<script>`` with ``argv``; the JSON lines it printed."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *argv])
    before = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    finally:
        torch.set_num_threads(before)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return [json.loads(ln) for ln in lines]


def test_cohort_benchmark_prints_one_json_line_per_case(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--clients", "4", "--repeats", "1"]
    rows = _benchmark_rows("cohort_engine.py", argv, capsys, monkeypatch)
    assert [(r["model"], r["clients"]) for r in rows] == [("mlp", 4), ("cnn", 4)]
    for row in rows:
        assert row["speedup"] == pytest.approx(
            row["per_client_s"] / row["vectorized_s"]
        )
        assert row["device"] == "cpu" and row["threads"] == 1
        assert row["max_abs_diff"] < 1e-5  # both paths trained the same weights


def test_overhead_benchmark_reports_the_ratio_to_its_ideal(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    argv = ["--clients", "6", "--rounds", "3", "--engines", "vectorized"]
    argv += ["--out", str(tmp_path)]
    (row,) = _benchmark_rows("sim_overhead.py", argv, capsys, monkeypatch)
    assert (row["engine"], row["clients"], row["cohort"]) == ("vectorized", 6, 6)
    assert row["ideal_round_s"] > 0 and row["round_s"] > 0
    # (both rounded in the JSON line)
    assert row["ratio"] == pytest.approx(row["round_s"] / row["ideal_round_s"], 0.05)
    assert row["client_s"] <= row["round_s"]  # the client phase is part of it
    assert row["peak_rss_gib"] > 0
    assert len(list(tmp_path.glob("sim_overhead_6_vectorized_*/results.json"))) == 1


def test_overhead_benchmark_refuses_a_bad_case_before_running_any(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    argv = ["--clients", "4", "--rounds", "2", "--engines", "vectorized", "bogus"]
    argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        _benchmark_rows("sim_overhead.py", argv, capsys, monkeypatch)
    assert stop.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == (
        "sim_overhead.py: error: simulation.engine='bogus' is not allowed; it "
        "must be one of: flower, sharded, inprocess, vectorized"
    )
    assert not (tmp_path / "out").exists()  # the good case did not run either
