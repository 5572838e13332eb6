"""A tabular data set's public schema: label, feature columns, scaling and missing values.

Every number that shapes the features (each numeric column's value range, each
categorical column's categories, the constant a missing value is imputed with) is
written in the schema by someone who knows the *domain* of the variable (age 0..120,
the loan grades a lender publishes), never computed from the private records. So
encoding a record costs no privacy, and every node encodes identically.

The schema is a TOML file (comments allowed; ``tomllib`` is in the standard library):

.. code-block:: toml

    ignore = ["rownames"]            # columns present in the data but not used
    missing-values = ["", "NA"]      # cell texts that mean "missing" (this default)

    [label]
    column = "Class"
    classes = ["good", "bad"]        # label i = classes[i]; binary: classes[1] is positive

    [site]                           # optional: one institution per record
    column = "hospital"
    values = ["A", "B", "C"]         # site id i = values[i]

    [columns.age]
    type = "numeric"
    range = [0, 120]                 # values are clipped to it, then scaled to 0..1
    missing = "refuse"               # or "impute" (with fill) or "indicator"

    [columns.income]
    type = "numeric"
    range = [0, 1e6]
    transform = "log1p"              # scale log1p(value) between log1p(lo), log1p(hi)
    missing = "indicator"            # fill (default lo) plus a 0/1 'income=missing' feature

    [columns.home]
    type = "categorical"
    categories = ["owner", "rent"]   # one-hot, in this order
    missing = "impute"
    fill = "rent"

    [columns.smoker]
    type = "boolean"                 # 1/0, true/false, yes/no, t/f, y/n (any case)
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMN_TYPES = ("numeric", "categorical", "boolean")
MISSING_POLICIES = ("refuse", "impute", "indicator")
TRANSFORMS = ("none", "log1p")
DEFAULT_MISSING_VALUES = ("", "NA")
BOOLEAN_TRUE = ("1", "true", "yes", "t", "y")
BOOLEAN_FALSE = ("0", "false", "no", "f", "n")


class SchemaError(ValueError):
    """A schema that cannot be used; the message names the offending key."""


def _fail(key: str, problem: str) -> SchemaError:
    return SchemaError(f"tabular schema key '{key}': {problem}")


def _is_number(value: Any) -> bool:
    """An int or float (TOML gives both), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names(values: Any, key: str) -> tuple[str, ...]:
    """A non-empty tuple of distinct, non-empty strings (or refuse, naming ``key``)."""
    if not isinstance(values, (list, tuple)) or not values:
        raise _fail(key, f"must be a non-empty list of strings, got {values!r}")
    if not all(isinstance(v, str) and v.strip() for v in values):
        raise _fail(key, f"every entry must be a non-empty string, got {values!r}")
    if len(set(values)) != len(values):
        raise _fail(key, f"entries must be distinct, got {values!r}")
    return tuple(values)


@dataclass(frozen=True)
class Column:
    """One feature column and how it becomes model inputs."""

    name: str
    type: str
    range: tuple[float, float] | None = None  # numeric: public value range
    categories: tuple[str, ...] = ()  # categorical: public categories
    missing: str = "refuse"
    fill: float | str | bool | None = None  # the public constant a missing value takes
    transform: str = "none"

    def __post_init__(self) -> None:
        key = f"columns.{self.name}"
        if self.type not in COLUMN_TYPES:
            raise _fail(f"{key}.type", f"must be one of {COLUMN_TYPES}, got {self.type!r}")
        if self.missing not in MISSING_POLICIES:
            raise _fail(
                f"{key}.missing", f"must be one of {MISSING_POLICIES}, got {self.missing!r}"
            )
        if self.transform not in TRANSFORMS:
            raise _fail(
                f"{key}.transform", f"must be one of {TRANSFORMS}, got {self.transform!r}"
            )
        if self.type != "numeric" and self.transform != "none":
            raise _fail(f"{key}.transform", "only numeric columns take a transform")
        check = {
            "numeric": self._check_numeric,
            "categorical": self._check_categorical,
            "boolean": self._check_boolean,
        }[self.type]
        check(key)
        if self.missing == "impute" and self.fill is None:
            raise _fail(f"{key}.fill", "missing = 'impute' needs a public fill value")
        if self.missing == "refuse" and self.fill is not None:
            raise _fail(f"{key}.fill", "a fill needs missing = 'impute' or 'indicator'")

    def _check_numeric(self, key: str) -> None:
        if self.categories:
            raise _fail(f"{key}.categories", "a numeric column has a range, not categories")
        bounds = self.range
        if (
            bounds is None
            or len(bounds) != 2
            or not all(_is_number(b) for b in bounds)
            or not all(math.isfinite(b) for b in bounds)
            or not bounds[0] < bounds[1]
        ):
            raise _fail(
                f"{key}.range", f"must be finite numbers [lo, hi], lo < hi: {bounds!r}"
            )
        if self.transform == "log1p" and bounds[0] < 0:
            raise _fail(f"{key}.range", "a log1p column needs lo >= 0")
        if self.fill is not None and (
            isinstance(self.fill, (bool, str)) or not bounds[0] <= self.fill <= bounds[1]
        ):
            raise _fail(f"{key}.fill", f"must be a number in {bounds[0]}..{bounds[1]}")

    def _check_categorical(self, key: str) -> None:
        if self.range is not None:
            raise _fail(f"{key}.range", "a categorical column has categories, not a range")
        _names(list(self.categories), f"{key}.categories")
        if self.fill is not None and self.fill not in self.categories:
            raise _fail(f"{key}.fill", f"must be one of the categories {self.categories}")

    def _check_boolean(self, key: str) -> None:
        if self.range is not None or self.categories:
            raise _fail(key, "a boolean column takes neither range nor categories")
        if self.fill is not None and not isinstance(self.fill, bool):
            raise _fail(f"{key}.fill", "must be true or false")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The model inputs this column becomes, in order."""
        if self.type == "categorical":
            names = tuple(f"{self.name}={c}" for c in self.categories)
        else:
            names = (self.name,)
        return names + ((f"{self.name}=missing",) if self.missing == "indicator" else ())


@dataclass(frozen=True)
class Site:
    """The column naming each record's institution, and the institutions in id order."""

    column: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column.strip():
            raise _fail("site.column", f"must be a column name, got {self.column!r}")
        _names(list(self.values), "site.values")


@dataclass(frozen=True)
class TabularSchema:
    """Label, optional site, feature columns (in feature order) and missing-value texts."""

    label_column: str
    classes: tuple[str, ...]
    columns: tuple[Column, ...]
    site: Site | None = None
    ignore: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = DEFAULT_MISSING_VALUES
    source: str = "<schema>"  # where it was read from, for messages

    def __post_init__(self) -> None:
        if not isinstance(self.label_column, str) or not self.label_column.strip():
            raise _fail("label.column", f"must be a column name, got {self.label_column!r}")
        if len(_names(list(self.classes), "label.classes")) < 2:
            raise _fail("label.classes", "needs at least two classes")
        if not self.columns:
            raise _fail("columns", "needs at least one feature column")
        site = [self.site.column] if self.site else []
        used = [self.label_column, *site, *(c.name for c in self.columns), *self.ignore]
        twice = sorted({name for name in used if used.count(name) > 1})
        if twice:
            raise _fail(
                "columns", f"column {twice[0]!r} is named twice (label/site/feature/ignore)"
            )
        if not all(isinstance(m, str) for m in self.missing_values):
            raise _fail("missing-values", "must be a list of strings")
        named = {"label.classes": self.classes}
        named |= {f"columns.{c.name}.categories": c.categories for c in self.columns}
        named |= {"site.values": self.site.values} if self.site else {}
        for key, values in named.items():
            clash = sorted(set(values) & set(self.missing_values))
            if clash:
                raise _fail(key, f"{clash[0]!r} is also a missing-value text")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every model input, in order (one-hot slots and missing indicators included)."""
        return tuple(n for column in self.columns for n in column.feature_names)

    @property
    def num_features(self) -> int:
        """Width of the encoded feature matrix."""
        return len(self.feature_names)

    @property
    def num_classes(self) -> int:
        """Labels are ``0..num_classes-1``."""
        return len(self.classes)

    @property
    def known_columns(self) -> frozenset[str]:
        """Every column a data file may hold: label, site, features and ignored ones."""
        site = (self.site.column,) if self.site else ()
        return frozenset((self.label_column, *site, *self.ignore, *self.names))

    @property
    def names(self) -> tuple[str, ...]:
        """The feature columns' names, in order."""
        return tuple(c.name for c in self.columns)


_TOP_KEYS = {"label", "site", "columns", "ignore", "missing-values"}
_COLUMN_KEYS = {"type", "range", "categories", "missing", "fill", "transform"}


def _column(name: str, raw: Any) -> Column:
    key = f"columns.{name}"
    if not isinstance(raw, dict):
        raise _fail(key, "must be a table")
    unknown = set(raw) - _COLUMN_KEYS
    if unknown:
        allowed = sorted(_COLUMN_KEYS)
        raise _fail(f"{key}.{sorted(unknown)[0]}", f"unknown key; allowed {allowed}")
    if "type" not in raw:
        raise _fail(f"{key}.type", f"is required, one of {COLUMN_TYPES}")
    bounds = raw.get("range")
    if bounds is not None and not isinstance(bounds, list):
        raise _fail(f"{key}.range", f"must be [lo, hi], got {bounds!r}")
    categories = raw.get("categories", ())
    if not isinstance(categories, (list, tuple)):
        raise _fail(f"{key}.categories", f"must be a list of strings, got {categories!r}")
    return Column(
        name=name,
        type=raw["type"],
        range=tuple(bounds) if bounds is not None else None,  # type: ignore[arg-type]
        categories=tuple(categories),
        missing=raw.get("missing", "refuse"),
        fill=raw.get("fill"),
        transform=raw.get("transform", "none"),
    )


def schema_from_dict(raw: dict[str, Any], source: str = "<schema>") -> TabularSchema:
    """A validated schema from the parsed TOML table (see the module docstring)."""
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise _fail(sorted(unknown)[0], f"unknown key; allowed {sorted(_TOP_KEYS)}")
    label = raw.get("label")
    if not isinstance(label, dict) or "column" not in label or "classes" not in label:
        raise _fail("label", "is required: a table with 'column' and 'classes'")
    columns = raw.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise _fail("columns", "is required: one table per feature column")
    site_raw = raw.get("site")
    site = None
    if site_raw is not None:
        if not isinstance(site_raw, dict) or set(site_raw) != {"column", "values"}:
            raise _fail("site", "must be a table with exactly 'column' and 'values'")
        site = Site(site_raw["column"], tuple(_names(site_raw["values"], "site.values")))
    ignore = raw.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise _fail("ignore", f"must be a list of column names, got {ignore!r}")
    missing_values = raw.get("missing-values", list(DEFAULT_MISSING_VALUES))
    if not isinstance(missing_values, list):
        raise _fail("missing-values", f"must be a list of strings, got {missing_values!r}")
    return TabularSchema(
        label_column=label["column"],
        classes=_names(label["classes"], "label.classes"),
        columns=tuple(_column(name, spec) for name, spec in columns.items()),
        site=site,
        ignore=tuple(ignore),
        missing_values=tuple(missing_values),
        source=source,
    )


def load_schema(path: Path | str) -> TabularSchema:
    """Read and validate a TOML schema file; errors name the file and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SchemaError(f"tabular schema {path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"tabular schema {path}: not valid TOML ({exc})") from exc
    try:
        return schema_from_dict(raw, source=str(path))
    except SchemaError as exc:
        raise SchemaError(f"{path}: {exc}") from exc
