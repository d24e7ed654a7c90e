"""The README's set-up commands, CI, and the Flower app config stay consistent."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from fedsim.config import compose, experiment_from_run_config, from_dictconfig

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    head = text.split("## ")[0]
    blocks = re.findall(r"```bash\n(.+?)\n```", head)
    assert len(blocks) == 2
    assert blocks[0].endswith("fedsim run")
    assert "[test]" in blocks[1] and blocks[1].endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_flower_run_config_is_the_default_experiment() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert all(isinstance(v, bool | int | float | str) for v in run_config.values())
    assert experiment_from_run_config(run_config) == from_dictconfig(compose([]))


def test_contents_lists_every_section() -> None:
    text = (ROOT / "README.md").read_text()
    heads = [h for h in re.findall(r"^## (.+)$", text, flags=re.M) if h != "Contents"]
    listed = re.findall(r"^- \[(.+?)\]\(#", text.split("## Contents")[1], flags=re.M)
    assert listed[: len(heads)] == heads
