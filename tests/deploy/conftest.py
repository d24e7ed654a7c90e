"""Deployment tests: the ``deploy`` marker and a federation that always stops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.federation import Federation


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "deploy: starts a real SuperLink and SuperNodes on 127.0.0.1 (slow)",
    )


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """Certificates and keys from ``fedsim certs``; every process it starts is
    stopped when the test ends, passed or failed."""
    fed = Federation(tmp_path, num_keys=3)
    try:
        yield fed
    finally:
        fed.stop()
