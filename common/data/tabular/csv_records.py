"""Tabular records (a CSV file or an in-memory table) encoded by a public schema.

Encoding uses only the schema (:mod:`common.data.tabular.schema`): numeric values are
clipped to the column's public range and scaled to 0..1, categories become one-hot
slots in the schema's order, booleans 0/1, and a missing value is refused, imputed
with the schema's constant, or imputed plus a 0/1 missing indicator. No mean, std,
min, max or category list is taken from the records, so encoding costs no privacy.

Anything the schema does not allow is refused with a :class:`DataFileError` whose
message names the file, the line (1-based, the header is line 1), the column, the
value and what the column allows. Its public reason (what a node may tell the
server) keeps only the file name, the column and the rule. A column the schema does
not name is refused too: it may be a private identifier, or a sign that the file and
the schema disagree; list it under ``ignore`` to drop it on purpose.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.data.checks import DataFileError, reader_said
from common.data.tabular.schema import (
    BOOLEAN_FALSE,
    BOOLEAN_TRUE,
    Column,
    TabularSchema,
    load_schema,
)

if TYPE_CHECKING:
    import pandas as pd

NO_SCHEMA_REASON = (
    "a tabular CSV is read only with a public schema file (common/data/tabular/schema.py"
    " and docs/tabular.md): scaling numeric columns and encoding categories without one "
    "would need statistics of the private data (min/max, mean, the categories present)"
)


@dataclass(frozen=True)
class TabularRecords:
    """Encoded records: float32 features ``(N, F)``, int64 labels, optional site ids."""

    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    sites: np.ndarray | None = None  # int64 index into the schema's site values

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape[1] != len(self.feature_names):
            raise ValueError(f"features {self.x.shape} do not match {self.feature_names}")
        if len(self.y) != len(self.x) or (
            self.sites is not None and len(self.sites) != len(self.x)
        ):
            raise ValueError("features, labels and sites differ in length")


# A record index -> where it is, for messages: "line 7" or "record 7".
Locator = Callable[[int], str]


class _Table:
    """Cell texts by column, their missing masks, and how to name a record."""

    def __init__(
        self,
        text: Mapping[str, np.ndarray],
        missing: Mapping[str, np.ndarray],
        source: Path | str,
        locate: Locator,
    ) -> None:
        self.text, self.missing, self.source, self.locate = text, missing, source, locate

    def refuse(self, column: str, bad: np.ndarray, problem: str, allowed: str) -> None:
        """Raise for the first True of ``bad`` (if any), naming line, column and value."""
        if bad.any():
            i = int(np.argmax(bad))
            raise DataFileError(
                self.source,
                f"column '{column}': {problem}",
                allowed,
                f"{self.locate(i)}, column '{column}': {str(self.text[column][i])!r}",
            )


def _missing_rule(column: Column) -> str:
    if column.missing == "refuse":
        return "a missing value is refused"
    fill = f"imputed with {column.fill!r}" if column.fill is not None else "imputed"
    extra = " plus a missing indicator" if column.missing == "indicator" else ""
    return f"a missing value is {fill}{extra}"


def _allowed(column: Column, schema: TabularSchema) -> str:
    if column.type == "numeric":
        lo, hi = column.range  # type: ignore[misc]
        rule = f"a number (clipped to {lo:g}..{hi:g})"
    elif column.type == "categorical":
        rule = f"one of {list(column.categories)}"
    else:
        rule = f"a boolean: one of {list(BOOLEAN_TRUE + BOOLEAN_FALSE)} (any case)"
    return (
        f"column '{column.name}' takes {rule}; {_missing_rule(column)} "
        f"(schema {Path(schema.source).name}; missing texts {list(schema.missing_values)})"
    )


def _parse_numbers(text: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """float64 of each present cell; NaN where missing or not a number."""
    cells = np.where(missing, "nan", text)
    try:
        return cells.astype(np.float64)  # numpy's own parser, all at once
    except ValueError:  # some cell is not a number: parse one by one to find it
        out = np.full(len(cells), np.nan)
        for i, cell in enumerate(cells):
            try:
                out[i] = float(cell)
            except ValueError:
                pass
        return out


def _encode_column(table: _Table, column: Column, schema: TabularSchema) -> np.ndarray:
    """``(N, k)`` float64 inputs of one column (k = its feature names)."""
    text, missing = table.text[column.name], table.missing[column.name]
    allowed = _allowed(column, schema)
    if column.missing == "refuse":
        table.refuse(column.name, missing, "a value is missing", allowed)
    if column.type == "numeric":
        lo, hi = column.range  # type: ignore[misc]
        parsed = _parse_numbers(text, missing)
        table.refuse(
            column.name, ~missing & ~np.isfinite(parsed), "a value is not a number", allowed
        )
        fill = lo if column.fill is None else float(column.fill)  # type: ignore[arg-type]
        values = np.clip(np.where(missing, fill, parsed), lo, hi)
        if column.transform == "log1p":
            values, lo, hi = np.log1p(values), np.log1p(lo), np.log1p(hi)
        out = ((values - lo) / (hi - lo))[:, None]
    elif column.type == "categorical":
        categories = np.array(column.categories)
        table.refuse(
            column.name,
            ~missing & ~np.isin(text, categories),
            "a value is not a category of the schema",
            allowed,
        )
        filled = np.where(missing, column.fill if column.fill is not None else "", text)
        out = (filled[:, None] == categories[None, :]).astype(np.float64)
    else:
        lowered = np.char.lower(text.astype(str))
        truth, falsity = np.isin(lowered, BOOLEAN_TRUE), np.isin(lowered, BOOLEAN_FALSE)
        table.refuse(
            column.name, ~missing & ~truth & ~falsity, "a value is not a boolean", allowed
        )
        out = np.where(missing, float(bool(column.fill)), truth.astype(np.float64))[:, None]
    if column.missing == "indicator":
        out = np.hstack([out, missing.astype(np.float64)[:, None]])
    return out


def _indices(table: _Table, column: str, values: tuple[str, ...], what: str) -> np.ndarray:
    """int64 position of each cell in ``values``; a missing or unknown one is refused."""
    allowed = f"column '{column}' ({what}) takes one of {list(values)}, never missing"
    table.refuse(column, table.missing[column], f"the {what} is missing", allowed)
    text = table.text[column]
    table.refuse(
        column, ~np.isin(text, np.array(values)), f"the {what} is unknown", allowed
    )
    lookup = {value: i for i, value in enumerate(values)}
    return np.fromiter((lookup[t] for t in text), dtype=np.int64, count=len(text))


def _check_columns(
    present: list[str], schema: TabularSchema, source: Path | str, where: str
) -> None:
    """Refuse a duplicate, an unknown (extra) or a missing required column."""
    twice = sorted({name for name in present if present.count(name) > 1})
    if twice:
        raise DataFileError(
            source, f"column '{twice[0]}' appears twice", "each column once", where
        )
    extra = [name for name in present if name not in schema.known_columns]
    if extra:
        raise DataFileError(
            source,
            f"column '{extra[0]}' is not in the schema",
            f"the schema {Path(schema.source).name} names every column (label, site, "
            "features, ignore); list it under 'ignore' to drop it",
            f"{where}, columns {extra}",
        )
    needed = [schema.label_column, *(c.name for c in schema.columns)]
    needed += [schema.site.column] if schema.site else []
    absent = [name for name in needed if name not in present]
    if absent:
        raise DataFileError(
            source,
            f"required column '{absent[0]}' is missing",
            f"the schema {Path(schema.source).name} needs columns {needed}",
            f"{where}, missing {absent}",
        )


def encode_table(
    text: Mapping[str, np.ndarray],
    missing: Mapping[str, np.ndarray],
    schema: TabularSchema,
    source: Path | str,
    locate: Locator,
) -> TabularRecords:
    """Encode cell texts (already checked for unknown/missing columns) by ``schema``."""
    table = _Table(text, missing, source, locate)
    y = _indices(table, schema.label_column, schema.classes, "label")
    sites = None
    if schema.site is not None:
        sites = _indices(table, schema.site.column, schema.site.values, "site")
    blocks = [_encode_column(table, column, schema) for column in schema.columns]
    x = (
        np.hstack(blocks).astype(np.float32)
        if len(y)
        else np.zeros((0, schema.num_features))
    )
    return TabularRecords(x.astype(np.float32), y, schema.feature_names, sites)


def _resolve(
    schema: TabularSchema | Path | str | None, source: Path | str
) -> TabularSchema:
    if schema is None:
        raise DataFileError(source, "no public schema was given", NO_SCHEMA_REASON)
    return schema if isinstance(schema, TabularSchema) else load_schema(schema)


def read_csv_records(
    path: Path | str, schema: TabularSchema | Path | str | None
) -> TabularRecords:
    """Read and encode a CSV file (header line 1) by its public ``schema``.

    ``schema`` is a :class:`TabularSchema` or the path of its TOML file; ``None`` is
    refused (see :data:`NO_SCHEMA_REASON`). Cells are stripped of surrounding blanks;
    blank lines are skipped. Errors name the record's first line in the file.
    """
    path = Path(path)
    resolved = _resolve(schema, path)
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise DataFileError(
                    path, "the file is empty", "a header line, then records"
                )
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataFileError(
                        path,
                        "a record has the wrong number of fields",
                        f"every record has the header's {len(header)} fields",
                        f"line {start}: {len(row)} fields",
                    )
                rows.append([cell.strip() for cell in row])
                lines.append(start)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataFileError(
            path, "the file cannot be read as CSV", "a UTF-8 CSV file", reader_said(exc)
        ) from exc
    _check_columns(header, resolved, path, "header (line 1)")
    if not rows:
        raise DataFileError(path, "the file holds no records", "at least one record")
    cells = np.array(rows, dtype=str)
    text = {name: cells[:, j] for j, name in enumerate(header)}
    blanks = np.array(resolved.missing_values, dtype=str)
    missing = {name: np.isin(column, blanks) for name, column in text.items()}
    return encode_table(text, missing, resolved, path, lambda i: f"line {lines[i]}")


def _cell_texts(series: pd.Series) -> np.ndarray:
    """A column's cells as text: integral numbers without '.0', missing as ''.

    Vectorised: a packaged table has hundreds of thousands of rows (flights), where
    one Python call per cell costs seconds in every process that loads it.
    """
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return np.where(series.to_numpy(), "true", "false").astype(str)
    if pd.api.types.is_float_dtype(series):
        values = series.to_numpy(np.float64)
        nan = np.isnan(values)
        small = np.where(nan, np.inf, np.abs(values)) < 2.0**53  # exact as int64
        whole = small & (values == np.round(values))
        texts = np.where(whole, values, 0).astype(np.int64).astype(str).astype(object)
        texts[nan] = ""
        rest = np.flatnonzero(~whole & ~nan)  # fractions, huge numbers, infinities
        texts[rest] = [
            str(int(v)) if np.isfinite(v) and v == round(v) else repr(float(v))
            for v in values[rest]
        ]
        return texts.astype(str)
    missing = series.isna().to_numpy()
    return np.where(missing, "", series.astype(str).to_numpy().astype(str))


def encode_frame(
    frame: pd.DataFrame, schema: TabularSchema | Path | str | None, source: str
) -> TabularRecords:
    """Encode an in-memory table (e.g. a packaged data set) by its public ``schema``.

    The same checks and encoding as :func:`read_csv_records`; a NaN/None cell is
    missing. Records are named ``record i`` (1-based) in errors.
    """
    resolved = _resolve(schema, source)
    present = [str(name) for name in frame.columns]
    _check_columns(present, resolved, source, "table columns")
    blanks = np.array(resolved.missing_values, dtype=str)
    text, missing = {}, {}
    read = set(present) - set(resolved.ignore)  # ignored columns are never encoded
    for name in sorted(read):
        text[name] = _cell_texts(frame[name])
        missing[name] = frame[name].isna().to_numpy() | np.isin(text[name], blanks)
    return encode_table(text, missing, resolved, source, lambda i: f"record {i + 1}")
