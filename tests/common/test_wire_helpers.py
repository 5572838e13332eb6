"""The fast paths on the wire give what Flower's own calls give, or step aside."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.wire.flat_arrays import vector_array, vector_of
from common.wire.records import keys_of, record_of

DTYPES = (np.uint8, np.int8, np.float16, np.float32, np.float64, np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [0, 1, 7, 3000])
def test_a_vector_is_written_and_read_as_np_save_and_np_load_do(
    dtype: type, length: int
) -> None:
    vector = (np.arange(length) % 11).astype(dtype)
    ours, flowers = vector_array(vector), Array(vector)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype, flowers.shape, flowers.stype, flowers.data,
    )  # fmt: skip
    read = vector_of(flowers, np.dtype(dtype), length)
    assert read is not None and read.dtype == vector.dtype
    np.testing.assert_array_equal(read, flowers.numpy())


def test_anything_but_the_exact_layout_is_left_to_numpy() -> None:
    """Another length, dtype, shape, header version, stype or trailing bytes: ``None``,
    so that the caller's ``Array.numpy()`` reads it (and raises what it raises)."""
    vector = np.arange(12, dtype=np.uint8)
    exact = Array(vector)
    assert vector_of(exact, np.dtype(np.uint8), 13) is None
    assert vector_of(exact, np.dtype(np.int8), 12) is None
    assert vector_of(Array(vector.reshape(3, 4)), np.dtype(np.uint8), 12) is None
    version2 = io.BytesIO()
    np.lib.format.write_array(version2, vector, version=(2, 0))
    as_v2 = Array(dtype="uint8", shape=(12,), stype=exact.stype, data=version2.getvalue())
    assert vector_of(as_v2, np.dtype(np.uint8), 12) is None
    np.testing.assert_array_equal(as_v2.numpy(), vector)  # numpy still reads it
    longer = Array(dtype="uint8", shape=(12,), stype=exact.stype, data=exact.data + b"\0")
    assert vector_of(longer, np.dtype(np.uint8), 12) is None
    other = Array(dtype="uint8", shape=(12,), stype="raw", data=exact.data)
    assert vector_of(other, np.dtype(np.uint8), 12) is None
    with pytest.raises(ValueError, match="flat numeric vector"):
        vector_array(vector.reshape(3, 4))


def test_a_record_is_read_by_name_and_kind_as_flowers_views_read_it() -> None:
    config, arrays = ConfigRecord({"a": 1}), ArrayRecord({"x": Array(np.zeros(2))})
    content = RecordDict({"report": config, "update": arrays, "m": MetricRecord({"v": 1})})
    assert record_of(content, "report", ConfigRecord) is content.config_records["report"]
    assert record_of(content, "update", ArrayRecord) is content.array_records["update"]
    assert record_of(content, "update", ConfigRecord) is None  # another kind
    assert record_of(content, "missing", ConfigRecord) is None
    assert keys_of(content, ArrayRecord) == set(content.array_records) == {"update"}
    assert keys_of(content, MetricRecord) == {"m"}
