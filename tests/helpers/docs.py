"""Reading the README and docs/ in tests: a document, a section under a heading."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
DOCS = REPO / "docs"


def doc(name: str) -> str:
    """The text of ``docs/<name>``."""
    return (DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The body under the heading line starting with `heading`, up to the next heading
    of the same or a higher level (lines inside code fences are not headings)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, body, inside, fence = text.splitlines(), [], False, False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        match = None if fence else re.match(r"^(#+) ", line)
        if inside and match and len(match.group(1)) <= level:
            break
        if inside:
            body.append(line)
        elif match and line.startswith(heading):
            inside = True
    assert inside, heading
    return "\n".join(body)


def results_python_snippet() -> str:
    """The results-loading example of docs/results-format.md."""
    return doc("results-format.md").split("```python", 1)[1].split("```", 1)[0]
