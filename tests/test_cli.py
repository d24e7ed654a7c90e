"""The command line as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FAST = [
    "dataset=digits",
    "model.hidden=[16]",
    "num_clients=2",
    "num_rounds=1",
    "simulation.engine=inprocess",
]


def fedsim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_unknown_strategy_is_one_sentence_exit_2_and_no_folder(tmp_path: Path) -> None:
    res = fedsim("run", "strategy=fedmagic", cwd=tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln]
    assert lines == [lines[0]] and "unknown strategy 'fedmagic'" in lines[0]
    assert "fedavg" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "outputs").exists()


def test_impossible_setting_exit_2(tmp_path: Path) -> None:
    res = fedsim("run", *FAST, "num_clients=5000", cwd=tmp_path)
    assert res.returncode == 2
    assert "num_clients" in res.stderr and "Traceback" not in res.stderr
    res = fedsim("run", *FAST, "partition.alpha=0", cwd=tmp_path)
    assert res.returncode == 2 and "alpha" in res.stderr
    assert not (tmp_path / "outputs").exists()


def test_unknown_command(tmp_path: Path) -> None:
    res = fedsim("fly", cwd=tmp_path)
    assert res.returncode == 2 and "unknown command 'fly'" in res.stderr


def test_run_help_lists_groups_and_options(tmp_path: Path) -> None:
    res = fedsim("run", "--help", cwd=tmp_path)
    assert res.returncode == 0
    for word in (
        "strategy",
        "fedprox",
        "dataset",
        "mnist5k",
        "partition",
        "hetero_dir",
    ):
        assert word in res.stdout


def test_run_then_plot(tmp_path: Path) -> None:
    res = fedsim("run", *FAST, "output_dir=r", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "round   1/1" in res.stdout
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert data["status"] == "completed"
    (tmp_path / "r" / "accuracy.png").unlink()
    res = fedsim("plot", "r", cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "r" / "accuracy.png").is_file()
    res = fedsim("plot", "nowhere", cwd=tmp_path)
    assert res.returncode == 2 and "not a fedsim run folder" in res.stderr


def test_multirun_sweeps_into_separate_folders(tmp_path: Path) -> None:
    res = fedsim(
        "run", "-m", "strategy=fedavg,fedprox", "seed=0,1", *FAST, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    found = sorted(tmp_path.glob("multirun/*/*/*/results.json"))
    assert len(found) == 4
    combos = set()
    for path in found:
        cfg = json.loads(path.read_text())["config"]
        combos.add((cfg["strategy"]["name"], cfg["seed"]))
    assert combos == {("fedavg", 0), ("fedavg", 1), ("fedprox", 0), ("fedprox", 1)}
