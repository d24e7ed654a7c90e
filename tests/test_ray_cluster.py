"""Attach to an existing Ray cluster (`ray start --head`) instead of starting one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsim.runner import run
from tests._processes import pids_mentioning

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_processes_mentioning(marker: str) -> None:
    """Stop only the Ray processes of this test's cluster (not `ray stop`, which
    would stop every Ray cluster of this user)."""
    for pid in pids_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def ray_head() -> Iterator[str]:
    ray = shutil.which("ray")
    if ray is None:
        pytest.skip("the ray command is not installed")
    temp_dir = tempfile.mkdtemp(prefix="rayf_", dir="/tmp")
    port = _free_port()
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _kill_processes_mentioning(temp_dir)
        time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_run_attaches_to_a_running_cluster(ray_head: str, tmp_path: Path) -> None:
    import ray

    seen: list[str] = []

    def progress(record: dict) -> None:
        # called by the server loop during the run: Ray must be this cluster
        seen.append(ray.get_runtime_context().gcs_address)

    results = run(
        [
            "dataset=digits",
            "model.hidden=[16]",
            "num_clients=2",
            "num_rounds=2",
            f"simulation.ray_address={ray_head}",
            f"output_dir={tmp_path / 'cluster'}",
        ],
        progress=progress,
    )
    assert results.status == "completed"
    assert [r["num_replies"] for r in results.rounds[1:]] == [2, 2]
    assert len(seen) == 3 and all(
        addr.endswith(ray_head.split(":")[1]) for addr in seen
    )
    if ray.is_initialized():
        ray.shutdown()
