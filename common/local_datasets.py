"""An edge device's own labelled data: ``.npz``, ``.csv`` or an IDX directory.

Images are raw pixels in the run dataset's native range (0..16 for digits,
0..255 for the 28x28 sets), shaped ``(N, H, W)``, ``(N, 1, H, W)`` or ``(N, H*W)``;
labels are integers ``0..9``. They are normalised exactly like the server's data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.datasets import IMAGE_SIDE, DatasetError, normalise_images, read_idx

LABEL_COLUMN = "label"


def _images(name: str, x: np.ndarray, source: Path) -> np.ndarray:
    side = IMAGE_SIDE[name]
    if x.ndim == 2 and x.shape[1] == side * side:
        x = x.reshape(-1, side, side)
    elif x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (side, side):
        raise DatasetError(
            f"node config key 'data-path': {source} has images shaped {x.shape}; "
            f"dataset '{name}' needs (N, {side}, {side}), (N, 1, {side}, {side}) "
            f"or (N, {side * side})"
        )
    return normalise_images(name, x)


def _labels(y: np.ndarray, n: int, source: Path) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise DatasetError(f"{source}: {n} images but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y)):
        raise DatasetError(f"{source}: labels must be integers 0..9")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{source}: labels must be in 0..9, found {y.min()}..{y.max()}")
    return y


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DatasetError(f"{path}: an .npz needs arrays 'x' and 'y'")
            return data["x"], data["y"]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, encoding="utf-8") as fh:
            header = fh.readline().strip().split(",")
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    if LABEL_COLUMN not in header:
        raise DatasetError(f"{path}: the header needs a '{LABEL_COLUMN}' column")
    col = header.index(LABEL_COLUMN)
    return np.delete(table, col, axis=1), table[:, col]


def _read_idx_dir(path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (
        path / "train-images-idx3-ubyte.gz",
        path / "train-labels-idx1-ubyte.gz",
    )
    for f in (images, labels):
        if not f.is_file():
            raise DatasetError(f"node config key 'data-path': {path} lacks {f.name}")
    return read_idx(images), read_idx(labels)


def load_local_arrays(path_text: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images ``(N, 1, H, W)`` and int64 labels from a local data path."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        x, y = _read_idx_dir(path)
    elif path.suffix == ".npz" and path.is_file():
        x, y = _read_npz(path)
    elif path.suffix == ".csv" and path.is_file():
        x, y = _read_csv(path)
    else:
        raise DatasetError(
            f"node config key 'data-path': {path} is not an existing .npz file, "
            ".csv file or IDX directory"
        )
    images = _images(dataset, np.asarray(x), path)
    labels = _labels(y, len(images), path)
    if len(images) == 0:
        raise DatasetError(f"node config key 'data-path': {path} holds no examples")
    return images, labels
