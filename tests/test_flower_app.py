"""`flwr run .` runs a fedsim experiment through Flower's own launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._processes import pids_mentioning

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("flwr") is None:
        pytest.skip("the flwr command is not installed")
    home = tmp_path / "flwr-home"
    try:
        yield home
    finally:
        # `flwr run` leaves its local SuperLink running, detached in its own
        # session: stop that session (and only it)
        for pid in pids_mentioning("flower-superlink", str(home)):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except OSError:
                pass


def test_flwr_run_runs_the_experiment(flwr_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "flwr-out"
    overrides = f"dataset=digits model.hidden=[16] output_dir={out}"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [
            "flwr",
            "run",
            ".",
            "--stream",
            "--run-config",
            f"num_clients=2 num_rounds=2 overrides='{overrides}'",
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "completed"
    assert data["config"]["dataset"]["name"] == "digits"
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    assert all(r["num_replies"] == 2 for r in data["rounds"][1:])
    assert "round   2/2" in proc.stdout
