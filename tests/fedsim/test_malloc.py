"""fedsim.malloc: glibc's settings applied to a running process, the user's win."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fedsim import malloc

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt settings are glibc's",
)

PROBE = (
    "import json; from fedsim.malloc import tune_this_process as t; "
    "print(json.dumps([t(), t()]))"
)


def _tune_in_fresh_process(env: dict[str, str]) -> list[list[str]]:
    clean = {k: v for k, v in os.environ.items() if k not in malloc.SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_every_setting_is_accepted_by_glibc_once() -> None:
    first, second = _tune_in_fresh_process({})
    # mallopt reported success for each
    assert sorted(first) == sorted(malloc.SETTINGS)
    assert second == []  # idempotent


def test_a_setting_the_user_exported_is_left_to_glibc() -> None:
    first, _ = _tune_in_fresh_process({"MALLOC_TOP_PAD_": "4096"})
    assert sorted(first) == sorted(set(malloc.SETTINGS) - {"MALLOC_TOP_PAD_"})
