"""The project's front page and packaging: the README's set-up block and the build metadata."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_set_up_block_holds_exactly_the_demo_and_the_test_command() -> None:
    """The README's first code block is what a new user runs from a fresh clone: the two commands, nothing else."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]
    assert commands == ["./dev demo", "./dev test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "./dev test" in ci  # CI runs the README's test command


def test_the_license_is_an_spdx_expression() -> None:
    """``license = { text = ... }`` is deprecated by setuptools (the build warns); the SPDX string form is not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "MIT"
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
