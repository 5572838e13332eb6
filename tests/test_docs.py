"""The README matches the code: run keys, defaults and the results-loading snippet."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from common.config import RULES, RunConfig

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _key_table() -> dict[str, str]:
    section = README.split("## Run keys", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| `([^`]*)` \|", section, flags=re.MULTILINE)
    return dict(rows)


def test_readme_lists_every_run_key_with_its_default() -> None:
    """Every key in RULES is documented with the default the code uses."""
    table = _key_table()
    assert set(table) == set(RULES)
    defaults = RunConfig().to_run_config()
    for key, shown in table.items():
        assert tomllib.loads(f"v = {shown}")["v"] == defaults[key], key


def test_readme_has_exactly_two_setup_commands() -> None:
    """The set-up section gives `make run` and `make test` and nothing else."""
    section = README.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in section.strip().splitlines()]
    assert commands == ["make run", "make test"]


def readme_python_snippet() -> str:
    """The README's results-loading example."""
    return README.split("```python", 1)[1].split("```", 1)[0]
