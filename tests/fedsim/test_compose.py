"""fedsim.compose and fedsim.config split cleanly: same functions, either import order.

``fedsim.config`` holds the dataclasses and re-exports the composition
functions of ``fedsim.compose``, which imports the dataclasses back; each
module must import on its own in a fresh interpreter and register the Hydra
schemas that composing needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedsim.compose
import fedsim.config

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: import one module alone, then report which
# schemas Hydra holds and compose an experiment through both import paths.
SCRIPT = """
import json, sys
import {module}
from hydra.core.config_store import ConfigStore
repo = ConfigStore.instance().repo
schemas = sorted(g for g in ("client", "simulation", "evaluation")
                 if f"base_{{g}}.yaml" in repo.get(g, {{}}))
import fedsim.compose as p
import fedsim.config as c
exp = c.from_dictconfig(p.compose(["num_rounds=3", "client.lr=0.25"]))
print(json.dumps({{"schemas": schemas, "rounds": exp.num_rounds,
                  "lr": exp.client.lr, "same": c.compose is p.compose}}))
"""


def test_config_reexports_every_compose_function_as_the_same_object() -> None:
    assert fedsim.compose.__all__
    for name in fedsim.compose.__all__:
        assert name in fedsim.config.__all__
        assert getattr(fedsim.config, name) is getattr(fedsim.compose, name)


def test_every_name_in_all_exists() -> None:
    for module in (fedsim.config, fedsim.compose):
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert missing == []


@pytest.mark.parametrize("module", ["fedsim.config", "fedsim.compose"])
def test_either_module_imports_first_and_registers_the_schemas(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(module=module)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "schemas": ["client", "evaluation", "simulation"],
        "rounds": 3,
        "lr": 0.25,
        "same": True,
    }
