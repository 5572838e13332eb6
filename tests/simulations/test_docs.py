"""The README matches the code: run keys, defaults and the results-loading snippet."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from common.config import RULES, RunConfig

REPO = Path(__file__).resolve().parents[2]
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


def test_readme_what_leaves_a_client_is_the_declared_contract() -> None:
    """README's table lists exactly the declared reply fields, with what protects each."""
    from common.wire.reply import EVALUATE_FIELDS, TRAIN_FIELDS

    section = README.split("### What leaves a client", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(
        r"^\| (train|evaluate) \| `([a-z0-9-]+)` \| ([^|]+?) \| ([^|]+?) \|",
        section,
        flags=re.MULTILINE,
    )
    documented = {(reply, key, cover, when) for reply, key, cover, when in rows}
    declared = {
        (
            reply,
            f.key,
            f.coverage.value + (f" (`{f.released_by}`)" if f.released_by else ""),
            ", ".join(s.value for s in f.statuses),
        )
        for reply, fields in (("train", TRAIN_FIELDS), ("evaluate", EVALUATE_FIELDS))
        for f in fields
    }
    assert len(rows) == len(documented) == len(declared)
    assert documented == declared


def test_readme_secure_aggregation_stage_fields_are_the_declared_ones() -> None:
    """The stage table under "What leaves a client" is the protocol module's."""
    from common.secure_aggregation.protocol import STAGE_FIELDS

    section = README.split("### What leaves a client", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(
        r"^\| (secagg_[a-z_]+) \| `([a-z0-9-]+)` \| ([^|]+?) \| ([^|]+?) \|",
        section,
        flags=re.MULTILINE,
    )
    declared = [
        (stage.value, f.key, f"{f.coverage.value} (`{f.released_by}`)",
         ", ".join(s.value for s in f.statuses))
        for stage, fields in STAGE_FIELDS.items()
        for f in fields
    ]  # fmt: skip
    assert rows == declared


def test_readme_lists_every_policy_key() -> None:
    """The privacy-policy table documents exactly the keys the node reads."""
    from client.privacy.policy import POLICY_KEYS

    section = README.split("### Privacy policy", 1)[1].split("\n### ", 1)[0]
    keys = re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.MULTILINE)
    assert keys == list(POLICY_KEYS)
