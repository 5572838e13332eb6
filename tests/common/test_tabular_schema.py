"""A tabular schema is refused on creation, naming the key, when it cannot be used."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from common.data.tabular.schema import (
    Column,
    SchemaError,
    TabularSchema,
    load_schema,
    schema_from_dict,
)

GOOD: dict[str, Any] = {
    "ignore": ["id"],
    "label": {"column": "y", "classes": ["no", "yes"]},
    "site": {"column": "hospital", "values": ["A", "B"]},
    "columns": {
        "age": {"type": "numeric", "range": [0, 120]},
        "income": {
            "type": "numeric", "range": [0, 1e6], "transform": "log1p",
            "missing": "indicator",
        },
        "home": {
            "type": "categorical", "categories": ["own", "rent"],
            "missing": "impute", "fill": "rent",
        },
        "smoker": {"type": "boolean"},
    },
}  # fmt: skip


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    raw = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return raw


def test_a_good_schema_lists_features_in_order() -> None:
    schema = schema_from_dict(GOOD)
    assert schema.feature_names == (
        "age", "income", "income=missing", "home=own", "home=rent", "smoker",
    )  # fmt: skip
    assert schema.num_classes == 2 and schema.site is not None
    assert schema.known_columns == {
        "id",
        "y",
        "hospital",
        "age",
        "income",
        "home",
        "smoker",
    }


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("label", ..., "label"),
        ("label.classes", ["only"], "label.classes"),
        ("label.classes", ["a", "a"], "label.classes"),
        ("columns", {}, "columns"),
        ("columns.age.type", "text", "columns.age.type"),
        ("columns.age.range", [120, 0], "columns.age.range"),
        ("columns.age.range", [0, float("inf")], "columns.age.range"),
        ("columns.age.range", ..., "columns.age.range"),
        ("columns.age.missing", "drop", "columns.age.missing"),
        ("columns.age.fill", 40, "columns.age.fill"),  # fill needs impute/indicator
        ("columns.age.transform", "log1p", None),  # fine: lo = 0
        ("columns.age.bins", 3, "columns.age.bins"),
        ("columns.income.fill", 2e6, "columns.income.fill"),  # outside the range
        ("columns.home.categories", [], "columns.home.categories"),
        ("columns.home.fill", "hotel", "columns.home.fill"),
        ("columns.home.missing", "impute", None),
        ("columns.home.transform", "log1p", "columns.home.transform"),
        ("columns.smoker.range", [0, 1], "columns.smoker"),
        ("site.values", ["A", "A"], "site.values"),
        ("ignore", ["age"], "columns"),  # a column named twice
        ("colums", {}, "colums"),  # an unknown top-level key
        ("missing-values", ["", "rent"], "columns.home.categories"),  # ambiguous
    ],
)
def test_each_bad_key_is_named(path: str, value: Any, key: str | None) -> None:
    if key is None:
        schema_from_dict(_with(path, value))
        return
    with pytest.raises(SchemaError, match=f"key '{key}'"):
        schema_from_dict(_with(path, value))


def test_impute_without_a_fill_is_refused() -> None:
    with pytest.raises(SchemaError, match="columns.age.fill"):
        Column("age", "numeric", range=(0, 120), missing="impute")


def test_a_dataclass_built_in_code_is_validated_too() -> None:
    with pytest.raises(SchemaError, match="label.classes"):
        TabularSchema("y", ("yes",), (Column("age", "numeric", range=(0, 1)),))


def test_schema_files_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[label\n")
    with pytest.raises(SchemaError, match="broken.toml: not valid TOML"):
        load_schema(broken)
    with pytest.raises(SchemaError, match="no such file"):
        load_schema(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[label]\ncolumn = "y"\nclasses = ["a", "b"]\n[columns.x]\ntype = "nope"\n'
    )
    with pytest.raises(SchemaError, match=r"bad\.toml: .*columns\.x\.type"):
        load_schema(bad)
