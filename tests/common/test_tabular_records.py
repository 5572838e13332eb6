"""Tabular records are encoded from the public schema alone; bad cells are refused by line.

The expected features are computed by hand from the schema's constants: a reader
that scaled by the file's own min/max, or dropped a bad row, fails here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data.checks import DataFileError
from common.data.tabular.csv_records import encode_frame, read_csv_records

SCHEMA = """\
ignore = ["id"]
[label]
column = "y"
classes = ["no", "yes"]
[site]
column = "hospital"
values = ["A", "B"]
[columns.age]
type = "numeric"
range = [0, 100]
[columns.income]
type = "numeric"
range = [0, 999]
transform = "log1p"
missing = "indicator"
[columns.home]
type = "categorical"
categories = ["own", "rent"]
missing = "impute"
fill = "rent"
[columns.smoker]
type = "boolean"
"""
HEADER = "id,y,hospital,age,income,home,smoker"
GOOD_ROWS = ["1,no,A,50,0,own,yes", "2,yes,B,150,,,N", "", '3,no,A," 25",999,rent,0']


@pytest.fixture
def schema(tmp_path: Path) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(SCHEMA)
    return path


def _csv(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    path = tmp_path / "records.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_records_are_encoded_exactly_from_the_schema(tmp_path: Path, schema: Path) -> None:
    got = read_csv_records(_csv(tmp_path, *GOOD_ROWS), schema)
    assert got.feature_names == (
        "age", "income", "income=missing", "home=own", "home=rent", "smoker",
    )  # fmt: skip
    expected = np.array(
        [
            # age 50 of 0..100; income log1p(0)/log1p(999); home own; smoker yes
            [0.5, 0.0, 0.0, 1.0, 0.0, 1.0],
            # age 150 clipped to 100; income missing -> lo (0) + indicator; home -> rent
            [1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
            [0.25, 1.0, 0.0, 0.0, 1.0, 0.0],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(got.x, expected)
    assert got.x.dtype == np.float32
    assert got.y.tolist() == [0, 1, 0] and got.y.dtype == np.int64
    assert got.sites is not None and got.sites.tolist() == [0, 1, 0]


def test_log1p_scales_between_the_transformed_bounds(tmp_path: Path, schema: Path) -> None:
    got = read_csv_records(_csv(tmp_path, "1,no,A,0,99,own,0"), schema)
    assert got.x[0, 1] == pytest.approx(math.log1p(99) / math.log1p(999), rel=1e-6)


# Each bad cell sits on line 4 of the file (header = line 1, a blank line 3 skipped).
@pytest.mark.parametrize(
    ("row", "column", "problem", "value"),
    [
        ("9,no,A,50,1,hotel,0", "home", "not a category of the schema", "hotel"),
        ("9,no,A,fifty,1,own,0", "age", "not a number", "fifty"),
        ("9,no,A,inf,1,own,0", "age", "not a number", "inf"),
        ("9,no,A,,1,own,0", "age", "a value is missing", ""),
        ("9,,A,50,1,own,0", "y", "the label is missing", ""),
        ("9,maybe,A,50,1,own,0", "y", "the label is unknown", "maybe"),
        ("9,no,C,50,1,own,0", "hospital", "the site is unknown", "C"),
        ("9,no,A,50,1,own,perhaps", "smoker", "not a boolean", "perhaps"),
    ],
)
def test_a_bad_cell_is_refused_with_file_line_column_value_and_rule(
    tmp_path: Path, schema: Path, row: str, column: str, problem: str, value: str
) -> None:
    path = _csv(tmp_path, "1,no,A,50,0,own,yes", "", row)
    with pytest.raises(DataFileError) as caught:
        read_csv_records(path, schema)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert f"column '{column}': " in message and problem in message
    assert f"line 4, column '{column}': {value!r}" in message
    assert "takes" in message  # what the column allows
    public = caught.value.public_reason
    assert "records.csv" in public and f"column '{column}'" in public
    assert "line 4" not in public and (not value or repr(value) not in public)


def test_line_numbers_count_quoted_newlines(tmp_path: Path, schema: Path) -> None:
    path = _csv(tmp_path, '"multi\nline id",no,A,50,0,own,yes', "9,no,A,x,1,own,0")
    with pytest.raises(DataFileError, match=r"line 4, column 'age': 'x'"):
        read_csv_records(path, schema)


def test_a_missing_required_column_is_refused(tmp_path: Path, schema: Path) -> None:
    path = _csv(tmp_path, "1,no,A,0,own,yes", header="id,y,hospital,income,home,smoker")
    with pytest.raises(DataFileError, match=r"required column 'age' is missing.*line 1"):
        read_csv_records(path, schema)


def test_an_unknown_extra_column_is_refused(tmp_path: Path, schema: Path) -> None:
    path = _csv(tmp_path, "1,no,A,50,0,own,yes,123-45", header=f"{HEADER},ssn")
    with pytest.raises(DataFileError, match=r"column 'ssn' is not in the schema.*'ignore'"):
        read_csv_records(path, schema)


def test_a_short_record_is_refused_by_line(tmp_path: Path, schema: Path) -> None:
    with pytest.raises(DataFileError, match=r"wrong number of fields \(line 3: 3 fields"):
        read_csv_records(_csv(tmp_path, "1,no,A,50,0,own,yes", "2,no,A"), schema)


def test_a_csv_without_a_schema_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(DataFileError) as caught:
        read_csv_records(_csv(tmp_path, *GOOD_ROWS), None)
    assert re.search(r"statistics of the private data", str(caught.value))


def test_a_table_in_memory_goes_through_the_same_checks(schema: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": [1, 2], "y": ["no", "yes"], "hospital": ["A", "B"],
            "age": [50, 150], "income": [0.0, np.nan], "home": ["own", None],
            "smoker": [True, False],
        }
    )  # fmt: skip
    got = encode_frame(frame, schema, "in-memory")
    np.testing.assert_array_equal(got.x[:, :3], [[0.5, 0, 0], [1.0, 0, 1.0]])
    assert got.x[:, 3:].tolist() == [[1, 0, 1], [0, 1, 0]]
    frame.loc[1, "home"] = "hotel"
    with pytest.raises(
        DataFileError, match=r"in-memory: .*record 2, column 'home': 'hotel'"
    ):
        encode_frame(frame, schema, "in-memory")
