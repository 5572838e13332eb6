"""Data sources: digits split, IDX reading, clear errors, real Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from common.data.datasets import DatasetError, load_arrays
from common.data.idx import read_idx, resolve_idx_dir
from common.tasks.fashion_mnist import DEFAULT_DIR as DEFAULT_FASHION_MNIST_DIR

FILES = {
    "train-images-idx3-ubyte.gz": (3, (20, 28, 28)),
    "train-labels-idx1-ubyte.gz": (1, (20,)),
    "t10k-images-idx3-ubyte.gz": (3, (6, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (1, (6,)),
}


def _write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(f">4B{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as fh:
        fh.write(data)


def _idx_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, (_, shape) in FILES.items():
        high = 10 if len(shape) == 1 else 256
        _write_idx(tmp_path / name, rng.integers(0, high, size=shape))
    return tmp_path


def test_digits_split_is_stratified_and_seeded() -> None:
    """1,797 digits, 80/20, every class in both splits, same split per seed."""
    a, b, c = (
        load_arrays("digits", "", 0),
        load_arrays("digits", "", 0),
        load_arrays("digits", "", 1),
    )
    assert len(a.y_train) + len(a.y_test) == 1797
    assert len(a.y_test) == 360
    assert set(a.y_test.tolist()) == set(range(10))
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.dtype == np.float32
    assert np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_train, c.y_train)


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    """Both compressed and plain IDX files read back exactly."""
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    _write_idx(tmp_path / "a.gz", array)
    _write_idx(tmp_path / "a.idx", array, compress=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "a.idx"), array)


def test_truncated_or_foreign_files_fail(tmp_path: Path) -> None:
    """A truncated file or a non-IDX file is a DatasetError naming it."""
    _write_idx(tmp_path / "t.idx", np.zeros((4, 4)), compress=False)
    data = (tmp_path / "t.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(data[:-3])
    with pytest.raises(DatasetError, match="t.idx"):
        read_idx(tmp_path / "t.idx")
    (tmp_path / "x.idx").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DatasetError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "x.idx")
    (tmp_path / "cut.idx").write_bytes(bytes([0, 0, 8, 3]) + b"\x00" * 6)
    with pytest.raises(DatasetError, match="truncated inside its IDX header"):
        read_idx(tmp_path / "cut.idx")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_idx_directory_loads_normalised_arrays(tmp_path: Path) -> None:
    """The four IDX files give (N, 1, 28, 28) float32 images and int64 labels."""
    data = load_arrays("mnist", str(_idx_dir(tmp_path)), 0)
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_train.dtype == np.float32
    assert data.x_test.shape == (6, 1, 28, 28) and data.y_test.dtype == np.int64
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    expected = (raw[0] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(data.x_train[0, 0], expected, rtol=1e-5)


def test_missing_files_are_named(tmp_path: Path) -> None:
    """A directory without every file fails naming 'data-dir' and what is missing."""
    _idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="'data-dir'.*t10k-labels-idx1-ubyte.gz"):
        load_arrays("fashion-mnist", str(tmp_path), 0)


def test_no_directory_says_how_to_get_the_files() -> None:
    """MNIST without data-dir fails with instructions, never another dataset."""
    with pytest.raises(DatasetError, match="'data-dir'"):
        resolve_idx_dir("mnist", "")


@pytest.mark.skipif(
    not DEFAULT_FASHION_MNIST_DIR.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)
def test_real_fashion_mnist_from_the_default_directory() -> None:
    """The real Fashion-MNIST IDX files load: 60,000 train and 10,000 test, 10 classes."""
    data = load_arrays("fashion-mnist", "", 0)
    assert data.x_train.shape == (60000, 1, 28, 28)
    assert data.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert abs(float(data.x_train.mean())) < 0.05  # the fixed constants centre it
