"""Data sources: the embedded digits set and IDX (Fashion-)MNIST directories.

Each loader returns a :class:`DatasetArrays` with float32 images shaped
``(N, 1, H, W)`` (normalised with fixed per-dataset constants, never statistics
of the private data) and int64 labels. The test split stays on the server.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.data.checks import (
    DataFileError,
    DatasetError,
    check_images,
    check_labels,
    reader_said,
)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_TEST_FRACTION = 0.2

# Fixed normalisation constants (published means/stds of the training sets).
_NORMALISATION = {
    "digits": (0.3, 0.4),
    "fashion-mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
}
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(frozen=True)
class DatasetArrays:
    """A train/test split held in memory."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise DatasetError(f"{self.name}: images and labels differ in length")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])


# Raw pixel range of each dataset (digits 0..16, IDX images 0..255).
PIXEL_SCALE = {"digits": 16.0, "fashion-mnist": 255.0, "mnist": 255.0}
IMAGE_SIDE = {"digits": 8, "fashion-mnist": 28, "mnist": 28}
NUM_CLASSES = 10  # every dataset here has ten classes, labelled 0..9


def normalisation(name: str) -> tuple[float, float, float]:
    """``(pixel scale, mean, std)``: x -> (x / scale - mean) / std."""
    mean, std = _NORMALISATION[name]
    return PIXEL_SCALE[name], mean, std


def checked_raw(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    source: Path | str,
    first_line: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(N, H, W)`` pixels and int64 labels of ``name``, checked (common.data.checks).

    ``first_line`` is the file line of record 0 (a CSV), so errors can name lines.
    """
    x = check_images(
        images, source, dataset=name, side=IMAGE_SIDE[name],
        max_value=PIXEL_SCALE[name], first_line=first_line,
    )  # fmt: skip
    y = check_labels(labels, len(x), source, num_classes=NUM_CLASSES, first_line=first_line)
    return x, y


def normalise_images(name: str, images: np.ndarray) -> np.ndarray:
    """Raw ``(N, H, W)`` pixels to normalised float32 ``(N, 1, H, W)``."""
    scale, mean, std = normalisation(name)
    x = images.astype(np.float32) / scale
    return ((x - mean) / std)[:, None, :, :].astype(np.float32)


def _digits_raw_split(
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw checked digits (0..16), split 80/20 by ``seed``: x_tr, x_te, y_tr, y_te."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, labels = checked_raw(
        "digits", bunch.images, bunch.target, "scikit-learn load_digits()"
    )
    return tuple(  # type: ignore[return-value]
        train_test_split(
            images,
            labels,
            test_size=DIGITS_TEST_FRACTION,
            random_state=seed,
            stratify=labels,
        )
    )


def load_digits_arrays(seed: int) -> DatasetArrays:
    """scikit-learn's 1,797 8x8 digits, split 80/20 stratified by ``seed``."""
    x_tr, x_te, y_tr, y_te = _digits_raw_split(seed)
    return DatasetArrays(
        name="digits",
        x_train=normalise_images("digits", x_tr),
        y_train=y_tr,
        x_test=normalise_images("digits", x_te),
        y_test=y_te,
        num_classes=NUM_CLASSES,
    )


def digits_file() -> Path:
    """The file ``load_digits()`` reads, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz" if locations else None
    if path is None or not path.is_file():
        raise DatasetError(
            "dataset 'digits' needs scikit-learn's embedded digits.csv.gz, which the "
            f"installed scikit-learn lacks (looked for {path})"
        )
    return path


_IDX_RULE = "an IDX file (optionally gzipped) of unsigned bytes, as its header says"


def read_idx(path: Path) -> np.ndarray:
    """Read one (optionally gzipped) IDX file into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFileError(
            path, "cannot read IDX file: corrupt or truncated", _IDX_RULE,
            reader_said(exc),
        ) from exc  # fmt: skip
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataFileError(path, "is not an unsigned-byte IDX file", _IDX_RULE)
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(path, "truncated inside its IDX header", _IDX_RULE)
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataFileError(
            path, "its size does not match its IDX header", _IDX_RULE,
            f"header says {expected} values, file holds {len(data) - header}",
        )  # fmt: skip
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(name: str, images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw images and labels of ``name`` from two IDX files, each checked and named."""
    x = check_images(
        read_idx(images), images, dataset=name, side=IMAGE_SIDE[name],
        max_value=PIXEL_SCALE[name],
    )  # fmt: skip
    return x, check_labels(read_idx(labels), len(x), labels, num_classes=NUM_CLASSES)


def resolve_idx_dir(name: str, data_dir: str) -> Path:
    """The directory holding the IDX files for ``name``; fail clearly if missing."""
    if data_dir:
        directory = Path(data_dir).expanduser()
    elif name == "fashion-mnist" and DEFAULT_FASHION_MNIST_DIR.is_dir():
        directory = DEFAULT_FASHION_MNIST_DIR
    else:
        hint = (
            "install Debian's 'dataset-fashion-mnist' package (it puts the files in "
            f"{DEFAULT_FASHION_MNIST_DIR}) or download them, then set 'data-dir'"
            if name == "fashion-mnist"
            else "download the four MNIST IDX .gz files and set 'data-dir' to "
            "their directory"
        )
        raise DatasetError(f"dataset '{name}' needs its IDX files: {hint}")
    missing = [f for f in _IDX_FILES.values() if not (directory / f).is_file()]
    if missing:
        raise DatasetError(
            f"run config key 'data-dir': {directory} lacks {', '.join(missing)} "
            f"(dataset '{name}' needs {', '.join(_IDX_FILES.values())})"
        )
    return directory


def _idx_part(name: str, directory: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw checked images and labels of the ``train`` or ``test`` IDX pair."""
    return read_idx_pair(
        name, directory / _IDX_FILES[f"x_{part}"], directory / _IDX_FILES[f"y_{part}"]
    )


def load_idx_arrays(name: str, data_dir: str) -> DatasetArrays:
    """Fashion-MNIST or MNIST from a directory of the four IDX ``.gz`` files."""
    directory = resolve_idx_dir(name, data_dir)
    split = {}
    for part in ("train", "test"):
        x, y = _idx_part(name, directory, part)
        split[part] = (normalise_images(name, x), y)
    return DatasetArrays(
        name=name,
        x_train=split["train"][0],
        y_train=split["train"][1],
        x_test=split["test"][0],
        y_test=split["test"][1],
        num_classes=NUM_CLASSES,
    )


def training_sources(name: str, data_dir: str) -> tuple[Path, ...]:
    """The files the training split of ``name`` is read from (what a client uses)."""
    if name == "digits":
        return (digits_file(),)
    if name in ("fashion-mnist", "mnist"):
        directory = resolve_idx_dir(name, data_dir)
        return (directory / _IDX_FILES["x_train"], directory / _IDX_FILES["y_train"])
    raise DatasetError(f"run config key 'dataset': unknown dataset {name!r}")


@lru_cache(maxsize=2)
def load_raw_training(name: str, data_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training split's checked raw pixels ``(N, H, W)`` and int64 labels.

    Exactly ``load_dataset(...)``'s ``x_train`` before :func:`normalise_images` (and
    its ``y_train``), without reading or normalising the test split: a client
    normalises only its own shard's rows. Read-only (cached and shared).
    """
    if name == "digits":
        x, _, y, _ = _digits_raw_split(seed)
    elif name in ("fashion-mnist", "mnist"):
        x, y = _idx_part(name, resolve_idx_dir(name, data_dir), "train")
    else:
        raise DatasetError(f"run config key 'dataset': unknown dataset {name!r}")
    x, y = np.asarray(x), np.asarray(y)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str, seed: int) -> DatasetArrays:
    """Load (once per process) the dataset a run config names."""
    if name == "digits":
        return load_digits_arrays(seed)
    if name in ("fashion-mnist", "mnist"):
        return load_idx_arrays(name, data_dir)
    raise DatasetError(f"run config key 'dataset': unknown dataset {name!r}")
