"""The README and docs/ match the code: run keys, defaults, reply fields, links."""

from __future__ import annotations

import re
import tomllib

from common.config import RunConfig
from common.run_keys import RULES
from tests.helpers.docs import DOCS, README, REPO, doc, section


def _key_table() -> dict[str, str]:
    text = section(doc("run-keys.md"), "# Run keys")
    rows = re.findall(r"^\| `([a-z-]+)` \| `([^`]*)` \|", text, flags=re.MULTILINE)
    return dict(rows)


def test_docs_list_every_run_key_with_its_default() -> None:
    """Every key in RULES is documented (docs/run-keys.md) with the default the code
    uses."""
    table = _key_table()
    assert set(table) == set(RULES)
    defaults = RunConfig().to_run_config()
    for key, shown in table.items():
        assert tomllib.loads(f"v = {shown}")["v"] == defaults[key], key


def test_readme_has_exactly_two_setup_commands() -> None:
    """The set-up section gives `make run` and `make test` and nothing else."""
    setup = README.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_docs_what_leaves_a_client_is_the_declared_contract() -> None:
    """docs/privacy-model.md's table lists exactly the declared reply fields, with what
    protects each."""
    from common.wire.reply_fields import EVALUATE_FIELDS, TRAIN_FIELDS

    text = section(doc("privacy-model.md"), "## What leaves a client")
    rows = re.findall(
        r"^\| (train|evaluate) \| `([a-z0-9-]+)` \| ([^|]+?) \| ([^|]+?) \|",
        text,
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


def test_docs_secure_aggregation_stage_fields_are_the_declared_ones() -> None:
    """The stage table under "What leaves a client" (docs/privacy-model.md) is the
    protocol module's."""
    from common.secure_aggregation.protocol import STAGE_FIELDS

    text = section(doc("privacy-model.md"), "## What leaves a client")
    rows = re.findall(
        r"^\| (secagg_[a-z_]+) \| `([a-z0-9-]+)` \| ([^|]+?) \| ([^|]+?) \|",
        text,
        flags=re.MULTILINE,
    )
    declared = [
        (stage.value, f.key, f"{f.coverage.value} (`{f.released_by}`)",
         ", ".join(s.value for s in f.statuses))
        for stage, fields in STAGE_FIELDS.items()
        for f in fields
    ]  # fmt: skip
    assert rows == declared


def test_docs_list_every_policy_key() -> None:
    """The privacy-policy table (docs/privacy-model.md) documents exactly the keys the node
    reads."""
    from client.privacy.policy import POLICY_KEYS

    text = section(doc("privacy-model.md"), "## Privacy policy")
    keys = re.findall(r"^\| `([a-z-]+)` \|", text, flags=re.MULTILINE)
    assert keys == list(POLICY_KEYS)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    fence, found = False, set()
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"^#+ (.*)$", line)):
            found.add(_anchor(match.group(1)))
    return found


def test_readme_is_short_and_every_relative_link_resolves() -> None:
    """README.md stays a newcomer's page (at most 300 lines), and every relative link in
    it and in docs/*.md names a file that exists (and a heading there, for `#anchor`)."""
    assert len(README.splitlines()) <= 300
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 1
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # an absolute URL (https:, mailto:)
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
